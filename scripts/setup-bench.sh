#!/bin/sh
# Extra set-up for `make bench`: Open MPI from Debian and mpi4py built against
# it, for the MPI baseline of bench/transport.py. Best effort: without root and
# apt-get the benchmark runs without the MPI row and says so. Building mpi4py
# from source takes a few minutes on 2 cores.
set -u
venv=${1:-.venv}
py="$venv/bin/python"
if ! command -v mpicc >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup-bench: installing Open MPI (libopenmpi-dev openmpi-bin) with apt-get"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            libopenmpi-dev openmpi-bin gcc libc6-dev >/dev/null; } || echo "setup-bench: could not install Open MPI"
    else
        echo "setup-bench: no mpicc/mpirun and no apt-get as root; the MPI baseline will be skipped"
    fi
fi
if command -v mpicc >/dev/null 2>&1 && ! "$py" -c "import mpi4py" 2>/dev/null; then
    echo "setup-bench: building mpi4py against $(command -v mpicc)"
    # --no-binary: a wheel would bring its own MPI; the baseline is the system's Open MPI.
    MPICC=$(command -v mpicc) "$py" -m pip install -q --disable-pip-version-check --no-binary mpi4py "mpi4py>=3.1" \
        || echo "setup-bench: mpi4py did not build; the MPI baseline will be skipped"
fi
if command -v mpirun >/dev/null 2>&1 && "$py" -c "import mpi4py" 2>/dev/null; then
    # Root needs --allow-run-as-root; the benchmark passes it too.
    if timeout 120 mpirun -n 2 --allow-run-as-root "$py" -c \
        "from mpi4py import MPI; c = MPI.COMM_WORLD; assert c.Get_size() == 2; assert c.allreduce(c.Get_rank()) == 1" \
        >/dev/null 2>&1; then
        echo "setup-bench: mpirun -n 2 with mpi4py works ($(mpirun --version 2>/dev/null | head -n 1))"
    else
        echo "setup-bench: mpirun -n 2 with mpi4py failed; the MPI baseline will report the error"
    fi
fi
exit 0
