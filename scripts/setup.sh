#!/bin/sh
# One install script for every way the project is set up: `make test`,
# `make demo` and the Dockerfiles all run this, so they cannot drift apart.
#   scripts/setup.sh VENV [EXTRAS] [CONSTRAINTS]
# VENV=- installs into the current interpreter (used inside containers).
# CONSTRAINTS defaults to constraints/cpu.txt; pass "none" on a machine that
# brings its own (CUDA) torch.
set -eu
venv=${1:-.venv}
extras=${2:-test}
constraints=${3:-constraints/cpu.txt}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ "$venv" = "-" ]; then
    py=python3
else
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    py="$venv/bin/python"
fi
set -- --disable-pip-version-check -q
[ "$constraints" = "none" ] || set -- "$@" -c "$constraints"
"$py" -m pip install "$@" -e ".[$extras]"
