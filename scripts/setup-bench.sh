#!/bin/sh
# Extra set-up for `make bench`: Open MPI from Debian and mpi4py built against
# it, for the MPI baseline. Best effort: without root/apt the benchmark runs
# without the MPI column and says so.
set -u
venv=${1:-.venv}
if ! command -v mpicc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            libopenmpi-dev openmpi-bin >/dev/null || echo "setup-bench: could not install Open MPI"
    else
        echo "setup-bench: no mpicc and no apt-get as root; MPI baseline will be skipped"
    fi
fi
if command -v mpicc >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-binary mpi4py "mpi4py>=3.1" \
        || echo "setup-bench: mpi4py did not build; MPI baseline will be skipped"
fi
exit 0
