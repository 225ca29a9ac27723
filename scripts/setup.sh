#!/bin/sh
# One install script for every way the project is set up: `make test`,
# `make demo` and the Dockerfiles all run this, so they cannot drift apart.
#   scripts/setup.sh VENV [EXTRAS] [CONSTRAINTS]
# VENV     a virtualenv to create/use, or "-" for the current python3 (containers)
# EXTRAS   comma-separated extras, e.g. "test" (default) or "" for none
# CONSTRAINTS  defaults to constraints/cpu.txt (torch==2.13.0, the CPU wheel);
#          "none" on a machine that brings its own (CUDA) torch.
set -eu
venv=${1:-.venv}
extras=${2-test}
constraints=${3:-constraints/cpu.txt}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ "$venv" = "-" ]; then
    py=python3
else
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    py="$venv/bin/python"
fi
target=.
[ -z "$extras" ] || target=".[$extras]"
set -- --disable-pip-version-check -q
[ "$constraints" = "none" ] || set -- "$@" -c "$constraints"
[ "$venv" = "-" ] && editable="" || editable="-e"
# shellcheck disable=SC2086
"$py" -m pip install "$@" $editable "$target"
