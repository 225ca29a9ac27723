#!/bin/sh
# make compose-test: the compose dev stack really started, on a real Docker engine.
#   1. Debian's docker.io and debootstrap (installed as root if missing);
#   2. a private dockerd (its own socket, data root and exec root; overlay2; no iptables:
#      the stack's containers talk on their own bridge, and the REST port is published by
#      docker-proxy);
#   3. a base image made locally (no registry can be pulled from here): a minimal Debian
#      bookworm root with Python 3.11 and pip (debootstrap), `docker import`ed, then the
#      project's Dockerfile FROM it (--build-arg BASE), every wheel fetched here first (with
#      this machine's pip set-up: torch's CPU wheel from its disk) and served on loopback to a
#      build that uses no index (PIP_NO_INDEX, PIP_FIND_LINKS);
#   4. docker/compose.yaml up (broker and one worker per stage), a job through the REST API
#      with the admin key the broker made, the video checked;
#   5. everything torn down: the stack and its volumes, dockerd and the wheel server (by PID).
# Exit 3 (and a line "compose-test: UNAVAILABLE: why") when Debian's packages cannot be reached.
# Prints the time of each step. Set KEEP_IMAGES=1 to keep the images and wheels (faster re-runs);
# the logs stay in /var/lib/onepiece-compose-test.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
[ "$(id -u)" = 0 ] || { echo "compose-test: needs root (dockerd)" >&2; exit 2; }
py="$here/.venv/bin/python"
state=/var/lib/onepiece-compose-test
run=/run/onepiece-compose-test
sock="$run/docker.sock"
project=onepiece-ct
mkdir -p "$state" "$run"
t0=$(date +%s)
step() { echo "compose-test: [$(( $(date +%s) - t0 )) s] $*"; }

need=""
command -v dockerd >/dev/null || need="$need docker.io"
command -v debootstrap >/dev/null || need="$need debootstrap"
command -v docker-compose >/dev/null || need="$need docker-compose"
if [ -n "$need" ]; then
    step "installing$need"
    # only the programs: no service started at install (this script runs its own dockerd)
    had_policy=1; [ -e /usr/sbin/policy-rc.d ] || { had_policy=0; printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
    installed=0
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need; }
    } >"$state/apt.log" 2>&1 || installed=$?
    [ "$had_policy" = 1 ] || rm -f /usr/sbin/policy-rc.d
    if [ "$installed" != 0 ]; then
        tail -5 "$state/apt.log"
        echo "compose-test: UNAVAILABLE: cannot install$need from Debian's packages"
        exit 3
    fi
fi

dockerd_pid="" server_pid=""
cleanup() {
    code=$?
    if [ -S "$sock" ]; then
        DOCKER_HOST="unix://$sock" docker-compose -p "$project" -f docker/compose.yaml down -v --remove-orphans \
            >/dev/null 2>&1 || true
    fi
    [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null || true
        i=0; while kill -0 "$dockerd_pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
    fi
    # what dockerd left mounted (its network namespaces), then its directories
    grep -o " $run[^ ]*" /proc/mounts | sort -r | while read -r m; do umount "$m" 2>/dev/null || true; done
    [ -n "${KEEP_IMAGES:-}" ] || rm -rf "$state/docker" "$state/wheels"  # the logs stay, for a look after
    rm -rf "$run"
    step "torn down (exit $code)"
}
trap cleanup EXIT INT TERM

step "starting a private dockerd"
dockerd --host "unix://$sock" --data-root "$state/docker" --exec-root "$run/exec" --pidfile "$run/dockerd.pid" \
    --storage-driver overlay2 --iptables=false --ip-masq=false >"$state/dockerd.log" 2>&1 &
dockerd_pid=$!
export DOCKER_HOST="unix://$sock" DOCKER_SOCKET="$sock"
i=0
until docker info >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 150 ] || { tail -20 "$state/dockerd.log"; exit 1; }
    kill -0 "$dockerd_pid" 2>/dev/null || { tail -20 "$state/dockerd.log"; exit 1; }
    sleep 0.2
done
step "dockerd up ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"

if ! docker image inspect onepiece-base:bookworm >/dev/null 2>&1; then
    root="$state/rootfs"
    rm -rf "$root"
    step "debootstrap: a minimal Debian bookworm with Python 3.11"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >"$state/debootstrap.log" 2>&1 || {
        tail -20 "$state/debootstrap.log"
        if grep -qiE "Failed getting release file|Couldn't download|Temporary failure|Could not resolve" \
                "$state/debootstrap.log"; then
            echo "compose-test: UNAVAILABLE: Debian's package mirror cannot be reached for the base image"; exit 3
        fi
        exit 1; }
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED  # an image's own Python: pip installs into it
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import - onepiece-base:bookworm >/dev/null
    rm -rf "$root"
fi
step "base image onepiece-base:bookworm ready"

# Every wheel the image needs, fetched here through this machine's own pip set-up (its
# registries, its CA, torch's CPU wheel from its disk), then served on loopback to the build,
# which uses no index at all
step "fetching the image's wheels"
"$py" -m pip download -q -d "$state/wheels" -c constraints/cpu.txt ".[s3]" "setuptools>=68" wheel \
    >"$state/download.log" 2>&1 || { tail -20 "$state/download.log"; exit 1; }
port=$("$py" -c 'from onepiece.ports import free_port; print(free_port())')
"$py" -m http.server --bind 127.0.0.1 "$port" --directory "$state/wheels" >/dev/null 2>&1 &
server_pid=$!
step "building onepiece:cpu from docker/Dockerfile"
docker build -q --network host --build-arg BASE=onepiece-base:bookworm --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/" -t onepiece:cpu -f docker/Dockerfile . \
    >"$state/build.log" 2>&1 || { tail -30 "$state/build.log"; exit 1; }
kill "$server_pid"; server_pid=""
step "image built ($(docker image inspect onepiece:cpu --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"

step "docker-compose up: the broker and one worker per stage"
docker-compose -p "$project" -f docker/compose.yaml up -d --no-build \
    broker text_encode image_encode vae_encode denoise vae_decode video_encode >/dev/null 2>"$state/compose.log" \
    || { cat "$state/compose.log"; docker-compose -p "$project" -f docker/compose.yaml logs --tail 40 broker;
         docker inspect --format '{{json .State.Health}}' "${project}_broker_1"; exit 1; }
i=0
until token=$(docker-compose -p "$project" -f docker/compose.yaml exec -T broker cat /keys/admin.token 2>/dev/null) \
        && [ -n "$token" ]; do
    i=$((i + 1)); [ $i -lt 300 ] || { docker-compose -p "$project" -f docker/compose.yaml logs --tail 30; exit 1; }
    sleep 0.5
done
step "broker up; submitting a job with its admin key"
ONEPIECE_API_KEY="$token" "$py" - <<'EOF'
import asyncio, sys, time
import aiohttp
from onepiece import client

URL = "http://127.0.0.1:8000"


async def main() -> None:
    async with client.session(None) as session:
        deadline = time.monotonic() + 600
        while True:  # every stage has a worker
            async with session.get(f"{URL}/readyz") as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                sys.exit("compose-test: the stack did not become ready in 600 s")
            await asyncio.sleep(1)
        start = time.monotonic()
        job = await client.submit(session, URL, open("stages/assets/sample.png", "rb").read(), prompt="a boat",
                                  seed=1, height=64, width=96, num_frames=9, steps=4)
        await client.wait(session, URL, job)
        size = await client.download(session, URL, job, __import__("pathlib").Path("/tmp/onepiece-compose-test.mp4"))
        data = open("/tmp/onepiece-compose-test.mp4", "rb").read()
        assert data[4:8] == b"ftyp", data[:16]
        print(f"compose-test: job {job} succeeded in {time.monotonic() - start:.1f} s; its mp4: {size} bytes")


asyncio.run(main())
EOF
rm -f /tmp/onepiece-compose-test.mp4
step "PASS"
