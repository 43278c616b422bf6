"""The code passes the linter: ``ruff check`` over ddptrain/, scripts/ and tests/, with the rules of
pyproject.toml's [tool.ruff], finds nothing. Ruff comes with the test extra; where it is missing the
test is skipped, saying so."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.slow   # it runs ruff


def ruff():
    """Ruff beside this interpreter (the test extra installs it there), else the one on PATH."""
    beside = Path(sys.executable).parent / "ruff"
    return str(beside) if beside.exists() else shutil.which("ruff")


@pytest.mark.skipif(ruff() is None, reason="ruff is not installed (the test extra installs it)")
def test_ruff_finds_nothing_in_the_package_the_scripts_and_the_tests():
    proc = subprocess.run([ruff(), "check", "--no-cache", "ddptrain", "scripts", "tests"],
                          capture_output=True, text=True, timeout=120, cwd=helpers.ROOT)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr
