#!/bin/sh
# Test hosts on one machine (network namespaces on a bridge; tests/hosts.py says what each has):
#   scripts/testhosts.sh up NAME [--hosts 3]     make them, print them as JSON
#   scripts/testhosts.sh run NAME HOST -- CMD    run CMD on one of them
#   scripts/testhosts.sh down NAME               tear them down
# Needs root. The bridge's route is checked before anything is sent (see tests/hosts.py).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3
cd "$here"
exec "$py" -m tests.hosts "$@"
