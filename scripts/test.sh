#!/usr/bin/env bash
# The whole test suite, from a fresh machine: creates .venv (once), installs
# ddptrain with the PyPI MPICH wheel and the test tools, then runs pytest.
# The MPI tests run under mpiexec with 2, 3 and 4 ranks from inside this one
# pytest session (tests/test_mpi.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[mpich,test]'
exec .venv/bin/python -m pytest "$@"
