"""OnePiece across hosts: three test hosts made of namespaces on a bridge (tests/hosts.py), each
with its own address, hostname, /etc/hosts, /dev/shm, data directory and PID namespace. The
broker (REST with a key, the control socket with CURVE) runs on h1, workers on h2 and h3, all
as real processes talking over real kernel networking. The test process reaches the REST API
from the bridge's address; nothing leaves the test subnet (its route is checked first).

Skipped, saying why, where test hosts cannot be made (not root); CI runs as root.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from broker import auth
from broker.curve import init_dir
from onepiece import client

from .hosts import TestHosts, available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(available() is not None, reason=str(available()))]

ROOT = Path(__file__).resolve().parents[1]
REST_PORT, CONTROL_PORT, S3_PORT = 8000, 5555, 5000
ENV = {**os.environ, "ONEPIECE_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class Cluster:
    """The processes of one test on its hosts; every one dies with its host at the end."""

    def __init__(self, hosts: TestHosts):
        self.hosts = hosts
        self.h1, self.h2, self.h3 = (hosts.host(n) for n in ("h1", "h2", "h3"))
        keys = hosts.state_dir / "keys"  # made here, copied to each host by the shared filesystem
        self.curve = init_dir(keys / "curve")
        self.token = auth.add_key(keys / "api.json", ["admin"], "test")[1]
        self.api_keys = keys / "api.json"
        self.logs = hosts.state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.url = f"http://{self.h1.address}:{REST_PORT}"
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.env = dict(ENV)
        self.scratch: list[Path] = []  # directories outside the hosts' own, removed at close

    def close(self) -> None:
        """Every host torn down (its processes with it), then each Popen (nsenter) reaped."""
        self.hosts.down()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)

    def _start(self, host, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = host.popen(argv, cwd=str(ROOT), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        return proc

    def broker(self, workflows: list[str], *extra: str) -> None:
        self._start(self.h1, "broker", [
            sys.executable, "-m", "onepiece.cli", "broker", "--workflows", *workflows,
            "--control", f"tcp://{self.h1.address}:{CONTROL_PORT}", "--rest-host", self.h1.address,
            "--rest-port", str(REST_PORT), "--data-dir", self.h1.data_dir, "--heartbeat-s", "0.5",
            "--liveness", "3", "--api-keys", str(self.api_keys),
            "--curve-secret", str(self.curve["broker_secret"]), "--curve-allow", str(self.curve["allow"]), *extra])

    def worker(self, host, workflow: str, stage: str, *extra: str) -> str:
        worker_id = f"{stage}-{host.name}"
        self._start(host, worker_id, [
            sys.executable, "-m", "onepiece.cli", "worker", "--workflow", workflow, "--stage", stage,
            "--worker-id", worker_id, "--control", f"tcp://h1:{CONTROL_PORT}", "--transport", "auto",
            "--data-host", "0.0.0.0", "--advertise-host", host.name, "--data-dir", host.data_dir,
            "--heartbeat-s", "0.5", "--liveness", "3", "--curve-secret", str(self.curve["worker_secret"]),
            "--curve-broker", str(self.curve["broker_public"]), *extra])
        return worker_id

    async def get(self, session, path: str) -> dict:
        async with session.get(f"{self.url}{path}") as resp:
            assert resp.status == 200, (path, resp.status, await resp.text())
            return await resp.json()

    async def workers(self, session) -> set[str]:
        try:
            stages = (await self.get(session, "/v1/stages"))["stages"]
        except aiohttp.ClientError:
            return set()
        return {w["id"] for s in stages.values() for w in s["workers"]}

    async def until_workers(self, session, want: set[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not want <= (have := await self.workers(session)):
            if time.monotonic() > deadline:
                raise AssertionError(f"workers {sorted(want - have)} did not register in {timeout} s; "
                                     f"registered: {sorted(have)}\n{self.tail()}")
            await asyncio.sleep(0.2)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:] for p in sorted(self.logs.iterdir()))

    async def submit(self, session, body: dict) -> str:
        async with session.post(f"{self.url}/v1/jobs", json=body) as resp:
            assert resp.status == 201, await resp.text()
            return (await resp.json())["id"]

    async def events(self, session, job: str, on_event=None, timeout: float = 300) -> list[dict]:
        seen = []
        async with asyncio.timeout(timeout):
            async for e in client.events(session, self.url, job):
                seen.append(e)
                if on_event is not None:
                    await on_event(e)
                if e["type"] in ("succeeded", "failed", "cancelled"):
                    return seen
        raise AssertionError(f"the event stream of {job} ended early: {seen[-3:]}")


@pytest.fixture
def hosts():
    made = TestHosts(f"t{os.getpid() % 100000:05d}")
    made.up()
    try:
        yield made
    finally:
        made.down()


@pytest.fixture
def cluster(hosts):
    made = Cluster(hosts)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
async def session(cluster):
    # every request carries the admin key, as a REST client's would (a redirect elsewhere drops it)
    async with aiohttp.ClientSession(headers=cluster.headers,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as s:
        yield s


def metric(text: str, name: str) -> dict[str, float]:
    return {labels: float(value) for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}}) (\S+)$", text, re.M)}


async def test_a_job_spans_three_hosts_auto_picks_shm_on_a_host_and_tcp_across_and_s3_carries_the_video(
        hosts, cluster, session):
    boto3 = pytest.importorskip("boto3")
    c = cluster
    # the result store: an S3 server (moto, an emulator) on h1; the video is made on h3, whose
    # data directory nobody else sees, so it can only reach the broker through the network
    c._start(c.h1, "s3", [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(S3_PORT)])
    endpoint = f"http://{c.h1.address}:{S3_PORT}"
    deadline = time.monotonic() + 60
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                      aws_secret_access_key="s")
    while True:
        try:
            s3.create_bucket(Bucket="videos")
            break
        except Exception:
            assert time.monotonic() < deadline, c.tail()
            await asyncio.sleep(0.2)
    store = ["--results", "s3://videos/onepiece", "--s3-endpoint", endpoint]
    c.env.update(ONEPIECE_S3_ACCESS_KEY_ID="k", ONEPIECE_S3_SECRET_ACCESS_KEY="s")
    c.broker(["wan_i2v"], *store)
    ids = {c.worker(c.h2, "wan_i2v", stage) for stage in ("text_encode", "image_encode", "vae_encode")}
    ids |= {c.worker(c.h3, "wan_i2v", stage, *store) for stage in ("denoise", "vae_decode", "video_encode")}
    await c.until_workers(session, ids)

    from onepiece.demo import SAMPLE
    job = await client.submit(session, c.url, SAMPLE.read_bytes(), prompt="three hosts", seed=3, height=64,
                              width=96, num_frames=5, steps=2)
    seen = await c.events(session, job)
    assert seen[-1]["type"] == "succeeded", (seen[-1], c.tail())
    ran_on = {e["data"]["stage"]: e["data"]["worker"] for e in seen if e["type"] == "stage_finished"}
    assert ran_on == {"text_encode": "text_encode-h2", "image_encode": "image_encode-h2",
                      "vae_encode": "vae_encode-h2", "denoise": "denoise-h3", "vae_decode": "vae_decode-h3",
                      "video_encode": "video_encode-h3"}
    out = hosts.state_dir / "v.mp4"
    size = await client.download(session, c.url, job, out)  # a 307 to the presigned URL on h1's S3
    assert size > 0 and out.read_bytes()[4:8] == b"ftyp"
    listed = c.h1.run(["ls", "-A", f"{c.h1.data_dir}/results"])  # the broker's own directory, on h1
    assert listed.stdout.strip() == "", listed.stdout
    # auto: shm where producer and consumer share a host (and its /dev/shm), tcp across hosts
    async with session.get(f"{c.url}/metrics") as resp:
        text = await resp.text()
    choices = metric(text, "onepiece_transport_choices_total")
    for stage in ("text_encode", "image_encode", "vae_encode"):  # h2 -> denoise on h3
        assert choices.get(f'{{stage="{stage}",transport="tcp"}}') == 1.0, choices
    for stage in ("denoise", "vae_decode"):  # h3 -> h3
        assert choices.get(f'{{stage="{stage}",transport="shm"}}') == 1.0, choices
    assert not any("rdma" in k for k in choices)
    print(f"job {job} across h1 (broker, S3), h2 (encoders), h3 (denoise, decode, mp4): {size} bytes via S3; "
          f"auto's choices: {choices}")


def synthetic_job(b_seconds: float) -> dict:
    return {"workflow": "synthetic3", "steps": 20, "work": {"b": b_seconds / 0.2}}


async def test_every_process_of_a_host_killed_mid_job_its_work_recovers_on_another(cluster, session):
    c = cluster
    c.broker(["synthetic3"])
    await c.until_workers(session, {c.worker(c.h2, "synthetic3", s) for s in ("a", "b", "c")}
                          | {c.worker(c.h3, "synthetic3", s) for s in ("a", "c")})
    job = await c.submit(session, synthetic_job(6.0))
    killed = asyncio.Event()

    async def on_event(e):
        if e["type"] == "stage_started" and e["data"]["stage"] == "b" and not killed.is_set():
            assert e["data"]["worker"] == "b-h2"  # the only b worker so far
            c.worker(c.h3, "synthetic3", "b")  # the capacity that will take over (it starts meanwhile)
        if e["type"] == "progress" and e["data"].get("step", 0) >= 3 and not killed.is_set():
            killed.set()
            c.h2.kill_all()  # a, b and c of h2 at once, b mid-task and a's outputs with it

    seen = await c.events(session, job, on_event)
    assert killed.is_set() and seen[-1]["type"] == "succeeded", (seen[-1], c.tail())
    finished = [(e["data"]["stage"], e["data"]["worker"]) for e in seen if e["type"] == "stage_finished"]
    assert finished[-2:] == [("b", "b-h3"), ("c", "c-h3")], finished
    assert await c.workers(session) == {"a-h3", "b-h3", "c-h3"}  # h2's are gone, not waited for
    print(f"h2 killed at b's step 3: stages finished {finished}")


async def test_a_host_cut_off_mid_job_is_recovered_from_and_rejoins_without_repeating_work(hosts, cluster,
                                                                                             session):
    c = cluster
    c.broker(["synthetic3"])
    await c.until_workers(session, {c.worker(c.h2, "synthetic3", s) for s in ("a", "c")}
                          | {c.worker(c.h3, "synthetic3", "b")})
    job = await c.submit(session, synthetic_job(6.0))
    cut = asyncio.Event()

    async def on_event(e):
        if e["type"] == "stage_started" and e["data"]["stage"] == "b" and not cut.is_set():
            assert e["data"]["worker"] == "b-h3"
            c.worker(c.h2, "synthetic3", "b")
        if e["type"] == "progress" and e["data"].get("step", 0) >= 3 and not cut.is_set():
            cut.set()
            c.h3.link(up=False)  # h3 goes on working, unheard: its heartbeats stop reaching h1

    try:
        seen = await c.events(session, job, on_event)
    finally:
        c.h3.link(up=True)
    assert cut.is_set() and seen[-1]["type"] == "succeeded", (seen[-1], c.tail())
    finished = [(e["data"]["stage"], e["data"]["worker"]) for e in seen if e["type"] == "stage_finished"]
    assert finished == [("a", "a-h2"), ("b", "b-h2"), ("c", "c-h2")], finished
    # the link is back: h3's worker finds the broker again and registers anew
    await c.until_workers(session, {"a-h2", "b-h2", "c-h2", "b-h3"}, timeout=60)
    await asyncio.sleep(2.0)  # time for anything late from h3's old task to arrive (and be dropped)
    view = await c.get(session, f"/v1/jobs/{job}")
    assert view["state"] == "succeeded" and view["stages"]["b"]["worker"] == "b-h2"
    events = await c.events(session, job)  # the whole history again: nothing was added after the end
    assert [e["type"] for e in events].count("stage_finished") == 3
    assert len((await c.get(session, "/v1/jobs"))["jobs"]) == 1
    log = (hosts.state_dir / "logs" / "b-h3.log").read_text()
    assert log.count("registered with the broker") == 2 and "reconnecting" in log  # a new incarnation
    print("h3 cut off at b's step 3: b re-ran on h2, the job succeeded once; h3's worker re-registered")


def test_test_hosts_send_nothing_unless_their_subnet_routes_through_their_bridge(monkeypatch):
    """The safety check: if ``ip route get`` says a host's address would leave by another
    device, ``up`` sends nothing, raises, and removes what it made."""
    from . import hosts as module

    real = module._ip

    def ip(*args, check=True):
        if args[:2] == ("route", "get"):
            return subprocess.CompletedProcess(args, 0, f"{args[2]} via 192.0.2.1 dev eth0 src 192.0.2.2\n", "")
        return real(*args, check=check)

    monkeypatch.setattr(module, "_ip", ip)
    made = TestHosts(f"s{os.getpid() % 100000:05d}")
    with pytest.raises(RuntimeError, match="would not route through .* sending nothing"):
        made.up()
    assert made.bridge and made.bridge not in real("-br", "link").stdout
    assert not any(h.netns in real("netns", "list").stdout for h in made.hosts)
    assert not made.state_dir.exists()


async def test_the_node_manager_places_workers_through_ray_on_two_nodes_and_survives_losing_one(hosts, cluster,
                                                                                                session):
    """A real Ray cluster: its head on h1 (with the broker and the node manager), a second node on
    h2, each ``ray start --block`` with an explicit --node-ip-address, stopped by PID (with its
    host). The node manager (--launcher ray) starts one worker per stage as Ray actors, spread
    over both nodes; h2 is then lost mid-job (every process of it, Ray's included): the broker
    re-makes the work, the manager starts replacements through Ray on h1, the job succeeds."""
    pytest.importorskip("ray")
    c = cluster
    ray_bin = str(Path(sys.executable).parent / "ray")
    common = ["--num-gpus", "0", "--disable-usage-stats", "--block"]
    scratch = [Path(f"/tmp/oprt-{hosts.name}-{h}") for h in ("h1", "h2")]  # short: Ray's socket paths
    c.scratch += scratch
    c.broker(["synthetic3"])
    # Ray's own token authentication, one token for the nodes and the driver (the node manager),
    # kept with the test's keys (not in ~/.ray)
    token = hosts.state_dir / "keys" / "ray.token"
    token.write_text(secrets.token_hex(32))
    c.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))

    async def ray_start(host, name: str, argv: list[str], attempts: int = 3) -> None:
        """``ray start --block`` on ``host`` until it says it runs (a node that came before the
        head's GCS answered gives up: start it again, a bounded number of times)."""
        for attempt in range(attempts):
            proc = c._start(host, f"{name}-{attempt}", argv)
            deadline = time.monotonic() + 120
            while "Ray runtime started" not in (c.logs / f"{name}-{attempt}.log").read_text(errors="replace"):
                assert time.monotonic() < deadline, c.tail()
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.5)
            else:
                return
        raise AssertionError(f"{name} did not start in {attempts} attempts\n{c.tail()}")

    await ray_start(c.h1, "ray-head", [ray_bin, "start", "--head", "--node-ip-address", c.h1.address, "--port",
                                       "6379", "--num-cpus", "4", "--include-dashboard", "false", "--temp-dir",
                                       str(scratch[0]), *common])
    await ray_start(c.h2, "ray-node", [ray_bin, "start", "--address", f"{c.h1.address}:6379", "--node-ip-address",
                                       c.h2.address, "--num-cpus", "4", "--temp-dir", str(scratch[1]), *common])
    c.env["ONEPIECE_API_KEY"] = c.token
    started = time.monotonic()
    c._start(c.h1, "manager", [
        sys.executable, "-m", "onepiece.cli", "manager", "--launcher", "ray", "--ray-address", f"{c.h1.address}:6379",
        "--broker-url", c.url, "--policy", "static", "--workers", "1", "--workflows", "synthetic3",
        "--control", f"tcp://h1:{CONTROL_PORT}", "--transport", "auto", "--heartbeat-s", "0.5", "--liveness", "3",
        "--curve-secret", str(c.curve["worker_secret"]), "--curve-broker", str(c.curve["broker_public"]),
        "--slots", "8", "--cpu-slots", "8", "--period", "1", "--rest-host", c.h1.address, "--port", "8001"])

    async def placed() -> dict[str, str]:
        try:
            stages = (await c.get(session, "/v1/stages"))["stages"]
        except aiohttp.ClientError:  # the broker is still starting
            return {}
        return {w["id"]: w["info"].get("host") for s in stages.values() for w in s["workers"]}

    deadline = time.monotonic() + 240
    while len(where := await placed()) < 3:
        assert time.monotonic() < deadline, f"workers placed so far: {where}\n{c.tail()}"
        await asyncio.sleep(0.5)
    print(f"ray: 3 workers registered {time.monotonic() - started:.1f} s after the manager started: {where}")
    assert set(where.values()) == {"h1", "h2"}, where  # spread over both nodes
    job = await c.submit(session, synthetic_job(6.0))
    lost = asyncio.Event()

    async def on_event(e):
        if e["type"] == "progress" and e["data"].get("step", 0) >= 3 and not lost.is_set():
            lost.set()
            c.h2.kill_all()  # the second node: its raylet and every worker Ray placed there

    seen = await c.events(session, job, on_event, timeout=400)
    assert lost.is_set() and seen[-1]["type"] == "succeeded", (seen[-1], c.tail())
    deadline = time.monotonic() + 240
    while len(after := await placed()) < 3 or set(after.values()) != {"h1"}:
        assert time.monotonic() < deadline, f"after losing h2: {after}\n{c.tail()}"
        await asyncio.sleep(0.5)
    print(f"ray: h2 lost mid-job; the job succeeded; workers now {after}")
    assert not set(after) & {w for w, h in where.items() if h == "h2"}
