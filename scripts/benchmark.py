#!/usr/bin/env python3
"""The benchmark's command: ``python scripts/benchmark.py --help`` says what it measures.

Its code is the package ``bench`` beside this file (scripts/bench/).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/ and time_to_accuracy.py
    from bench.cli import main
    sys.exit(main())
