#!/bin/sh
# Optional system packages for the tests, best effort: Debian's docker-compose
# (validates docker/compose*.yaml without an engine) and python3-pyverbs
# (rdma-core's Python bindings: the rdma transport imports them). Installed
# only as root with apt-get; the tests that need them skip, with the reason,
# where they are missing.
set -u
want=""
command -v docker-compose >/dev/null 2>&1 || want="$want docker-compose"
python3 -c "import pyverbs" >/dev/null 2>&1 || [ -d /usr/lib/python3/dist-packages/pyverbs ] || want="$want python3-pyverbs"
[ -n "$want" ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-system: not root or no apt-get; skipping$want"
    exit 0
fi
echo "setup-system: installing$want with apt-get"
{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $want; } \
    >/dev/null 2>&1 || echo "setup-system: could not install$want (tests that need them will skip)"
exit 0
