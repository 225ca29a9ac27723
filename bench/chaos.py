#!/usr/bin/env python
"""Chaos soak: a real stack under Poisson load while workers and the broker are SIGKILLed.

    python bench/chaos.py [--quick] [--minutes M | --seconds S] [--json PATH]
                          [--transport both|shm|tcp] [--workflows synthetic3,wan_i2v]

What runs, per transport (``shm`` then ``tcp`` by default, one fresh stack each):

* the broker as its own OS process (``onepiece broker``: ZeroMQ control plane,
  REST API, SQLite job store in a temporary data dir), on fixed ports, so it
  can be SIGKILLed and started again on the same ports and the same data dir
  (it re-queues the jobs it had not finished);
* the Node Manager as its own process (``onepiece manager --broker-url ...
  --policy static --workers 2``), which starts two workers of every stage of
  ``synthetic3`` and ``wan_i2v`` (tiny model) with its local launcher and
  starts a new one when a worker dies. Should a stage stay short of workers
  for ``--restart-grace`` seconds all the same, the bench starts one itself
  (the table says who restarted how many);
* this process: the clients (REST submit, one server-sent-event stream per
  job, reconnecting when the broker dies), the load generator, the chaos
  and junk tasks and the bookkeeping.

Phases, per transport: start (until every stage has its two workers),
warm-up (a few jobs of each workflow), calibration (first transport only,
unless ``--rate``: a closed loop of ``--calibrate-window`` jobs; the load is
``--load`` (0.5) times its throughput), *baseline* (Poisson arrivals, no
chaos), *chaos* (the same arrivals, plus):

* every ``--kill-every`` seconds (jittered) a worker is SIGKILLed. The chaos
  task walks through every stage, twice each in random order, arming a trap
  for that stage: kill the worker named in the next ``stage_started`` event
  (``worker-running``), or in the next ``stage_finished`` event, while it
  holds outputs its consumer may not have read yet (``worker-finished``; the
  table counts the kills after which the stage had to run again). Only
  fresh events (under 2 s old) spring a trap. A trap that does not fire
  within ``--trap-timeout`` kills a random worker of the stage
  (``worker-idle``). A kill that would leave a stage without a live worker
  is skipped (``--allow-empty`` turns that off);
* ``--broker-kills`` times per transport, evenly spaced, the broker is
  SIGKILLed, left down for a random 0.5 to 2x liveness seconds, and started
  again with the same arguments;
* every ``--junk-every`` seconds a burst of junk on the control port: random
  bytes and an HTTP request over raw TCP, frames that are not msgpack,
  truncated msgpack, maps of the wrong version or kind or with wrong field
  types, and well-formed messages from unregistered DEALERs (HEARTBEATs
  whose ``stats`` are malformed, DONE/STARTED/PROGRESS/FAILED for unknown
  jobs and for real jobs in flight, DISCONNECT, REGISTER for no stage).
  After each burst ``/healthz``, ``/v1/stages`` and ``/metrics`` must
  still answer 200.

Then *drain*: load and chaos stop, the broker stays up, and the bench waits
until every accepted job has ended, at most ``--drain-seconds`` (120).
Then *audit*: every job is read back (``GET /v1/jobs/{id}`` and its whole
event history). Then *stop*: SIGTERM to the manager (it drains its workers)
and to the broker; whatever is still running after that is a leak (and is
then SIGKILLed).

Definitions (the table and the JSON use them):

* *submitted*: ``POST /v1/jobs`` returned an id. Arrivals the broker could
  not take (down) are *refused* and counted apart.
* *lost*: submitted, and not in a terminal state (succeeded, failed,
  cancelled) at the audit after the drain.
* *duplicated*: a job with more than one distinct terminal event (two
  ``succeeded`` are two results), counting both the events seen live and
  those in the stored history. An event is identified by its sequence
  number, type and data, so the same event seen twice (live and replayed
  after a reconnect) counts once. A result stage that finished twice while
  the client got one terminal event (the broker was killed between the two
  events and before its group commit, and re-ran the job) is counted
  apart: work done twice, one result.
* a failure *names a stage* if its reason reads ``stage <name>`` for a
  stage of the job's workflow.
* *latency*: from the client's clock just before ``POST`` to the broker's
  timestamp of the job's first terminal event (one host, one clock), over
  the jobs that succeeded, per phase.
* *leaked*: ``/dev/shm`` names created by our processes (``onepiece-<pid>-``)
  that are still there after the stop; processes we started (the broker,
  the manager and everything in their sessions) still running after the
  orderly stop (SIGTERM, 60 s for the manager, 20 s for the broker).
* a lost job is *stuck* if it had no event for ``--stuck-seconds`` before
  the audit (a hang), else it was still moving (the drain was too short).

Targets (PASS/FAIL, exit status 1 if one fails): lost = 0, duplicated = 0,
leaked = 0, every failure names a stage, p95 under chaos within 3x of the
baseline's, and the REST API answers 200 after every junk burst.

Every process is started in a session of its own (``setpriv --pdeathsig``
where available, so a bench that is killed takes its broker and manager
along) and stopped by PID, also on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onepiece.ports import free_port  # noqa: E402

SHM_DIR = "/dev/shm"
SHM_PREFIX = "onepiece-"
TERMINAL = ("succeeded", "failed", "cancelled")
SAMPLE = ROOT / "stages" / "assets" / "sample.png"
WAN_PARAMS = dict(height=64, width=96, num_frames=9, steps=4, guidance_scale=5.0)
SYNTH_PARAMS = dict(steps=4)  # stage b reports progress per step: 4 events, not the default 40
P95_RATIO = 3.0
STAGE_RE = re.compile(r"\bstage '?([A-Za-z0-9_.-]+?)'?(?=[\s:;,)]|$)")


def log(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# -- processes ------------------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    return rest[0], int(rest[3])  # fields 3 (state) and 6 (session)


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def session_members(sessions: set[int]) -> set[int]:
    """Live (non-zombie) processes in any of ``sessions``."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st[1] in sessions and st[0] not in ("Z", "X"):
                out.add(int(name))
    return out


def shm_names() -> set[str]:
    with contextlib.suppress(OSError):
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    return set()


def shm_pid(name: str) -> int | None:
    with contextlib.suppress(ValueError):
        return int(name[len(SHM_PREFIX):].split("-", 1)[0])
    return None


_SETPRIV = shutil.which("setpriv")


class Proc:
    """A child process in a session of its own, logging to a file."""

    def __init__(self, name: str, cmd: list[str], logfile: Path, env: dict, deathsig: str):
        self.name, self.cmd, self.logfile, self.env, self.deathsig = name, cmd, logfile, env, deathsig
        self.popen: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> int:
        cmd = self.cmd
        if _SETPRIV:  # the child dies (KILL) or drains (TERM) if this process dies, even by SIGKILL
            cmd = [_SETPRIV, "--pdeathsig", self.deathsig, "--", *cmd]
        with open(self.logfile, "ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} start {' '.join(self.cmd)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=self.env, cwd=ROOT, start_new_session=True)
        self.starts += 1
        return self.popen.pid

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)

    async def stop(self, sig: int, timeout: float) -> bool:
        """Signal it and wait; True if it exited within ``timeout``."""
        if not self.running:
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.popen.wait), timeout)
            return True
        except TimeoutError:
            return False


# -- jobs --------------------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    id: str
    workflow: str
    phase: str
    submitted: float  # wall clock, just before the POST
    cancel: bool = False
    seen: set = field(default_factory=set)
    terminals: list = field(default_factory=list)  # (seq, type, ts, data), distinct
    result_finishes: set = field(default_factory=set)
    started_stages: set = field(default_factory=set)
    retries: int = 0
    requeued: int = 0
    reconnects: int = 0
    final_state: str | None = None
    final_reason: str | None = None
    final_stage: str | None = None
    last_event: tuple = (0.0, "")  # (broker ts, "type stage worker (attempt n)") of the newest event
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def first_end(self) -> tuple | None:
        return min(self.terminals, key=lambda t: t[2] or 0.0) if self.terminals else None


async def sse_events(resp):
    """Stored events ``{seq, ts, type, data}`` of a server-sent-event response."""
    event: dict = {}
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if "data" in event:
                yield json.loads(event["data"])
            event = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            event[key] = value.lstrip(" ")


# -- one stack -----------------------------------------------------------------------------

class Stack:
    """Broker process + manager process (and its workers) for one transport."""

    def __init__(self, args, transport: str, workdir: Path, workflows: list[str]):
        from stages.workflow import load_workflow

        self.args, self.transport, self.dir, self.workflows = args, transport, workdir, workflows
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.wf = {w: load_workflow(w) for w in workflows}
        self.stages = [s for w in self.wf.values() for s in w.stages]
        self.gpu_stages = [s for w in self.wf.values() for s, spec in w.stages.items() if spec.gpu]
        self.ctl_port, self.rest_port, self.mgr_port = free_port(), free_port(), free_port()
        while len({self.ctl_port, self.rest_port, self.mgr_port}) < 3:
            self.mgr_port = free_port()
        self.control = f"tcp://127.0.0.1:{self.ctl_port}"
        self.url = f"http://127.0.0.1:{self.rest_port}"
        env = {**os.environ, "ONEPIECE_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        env.pop("ONEPIECE_CONFIG", None)
        common = ["--heartbeat-s", str(args.heartbeat_s), "--liveness", str(args.liveness)]
        py = [sys.executable, "-m", "onepiece.cli"]
        self.broker = Proc("broker", py + ["--log-level", "WARNING", "broker", "--control", self.control,
                                           "--rest-port", str(self.rest_port), "--data-dir", str(self.data),
                                           "--max-attempts", str(args.max_attempts),
                                           "--workflows", *workflows, *common, *args.broker_arg],
                           self.dir / "broker.log", env, "KILL")
        n = args.workers
        self.manager = Proc("manager", py + ["--log-level", "INFO", "manager", "--broker-url", self.url,
                                             "--control", self.control, "--data-dir", str(self.data),
                                             "--transport", transport, "--model", "tiny",
                                             "--workflows", *workflows, "--policy", "static",
                                             "--workers", str(n), "--slots", str(max(1, n * len(self.gpu_stages))),
                                             "--cpu-slots", str(n * (len(self.stages) - len(self.gpu_stages)) + n),
                                             "--period", "1", "--port", str(self.mgr_port), *common],
                            self.dir / "manager.log", env, "TERM")
        self.worker_cmd = py + ["worker", "--control", self.control, "--transport", transport, "--model", "tiny",
                                "--data-dir", str(self.data), *common]
        self.env = env
        self.extra: list[Proc] = []  # workers the bench's own supervisor started
        self.sessions: set[int] = set()
        self.pids: set[int] = set()  # every process of ours seen so far

    def all_procs(self) -> list[Proc]:
        return [self.broker, self.manager, *self.extra]

    def start_broker(self) -> None:
        pid = self.broker.start()
        self.sessions.add(pid)
        self.pids.add(pid)

    def start_manager(self) -> None:
        pid = self.manager.start()
        self.sessions.add(pid)
        self.pids.add(pid)

    def start_worker(self, stage: str) -> str:
        wf = next(w for w, spec in self.wf.items() if stage in spec.stages)
        wid = f"bench-{stage}-{os.urandom(4).hex()}"
        p = Proc(f"worker {wid}", self.worker_cmd + ["--workflow", wf, "--stage", stage, "--worker-id", wid],
                 self.dir / "workers-bench.log", self.env, "TERM")
        pid = p.start()
        self.extra.append(p)
        self.sessions.add(pid)
        self.pids.add(pid)
        return wid

    def scan(self) -> set[int]:
        members = session_members(self.sessions)
        self.pids |= members
        return members

    def ours(self, pid: int) -> bool:
        st = proc_stat(pid)
        return st is not None and st[1] in self.sessions and st[0] not in ("Z", "X")

    def kill_all(self) -> None:
        """Last resort: SIGKILL every process of ours, by PID."""
        for p in self.all_procs():
            p.kill()
        for pid in self.scan() | {p for p in self.pids if self.ours(p)}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in self.all_procs():
            if p.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(5)


# -- one transport's run ------------------------------------------------------------------------

class Run:
    def __init__(self, args, stack: Stack, rate: float | None, seed: int):
        self.args, self.stack = args, stack
        self.rate = rate
        self.rng = random.Random(seed)
        self.url = stack.url
        self.jobs: dict[str, Job] = {}
        self.refused: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.tasks: set[asyncio.Task] = set()
        self.trackers: set[asyncio.Task] = set()
        self.broker_up = False
        self.snapshot: dict = {}
        self.pid_of: dict[str, int] = {}
        self.worker_ids: set[str] = set()
        self.initial_ids: set[str] = set()
        self.bench_started: list[dict] = []
        self.killed: set[int] = set()
        self.kills: list[dict] = []
        self.skipped: collections.Counter = collections.Counter()
        self.junk: list[dict] = []
        self.broker_kills: list[dict] = []
        self.trap: dict | None = None
        self.phase_s: dict[str, float] = {}
        self.loadavg: dict[str, float] = {}  # the machine's 1-minute load average at the end of each phase
        self.phase_window: dict[str, tuple[float, float]] = {}
        self.result_stage = {name: wf.result for name, wf in stack.wf.items()}
        self.stages_of = {name: set(wf.stages) for name, wf in stack.wf.items()}
        self.image_b64 = base64.b64encode(SAMPLE.read_bytes()).decode()
        self.http = None  # control requests
        self.sse = None  # event streams (own connection pool: they must not starve submissions)
        self.zctx = None
        self.audited = False
        self.supervisor_since: dict[str, float] = {}
        self.calibrated: float | None = None
        self.capacity: dict[str, float] = {}
        self.audit_at = time.time()

    # -- helpers -------------------------------------------------------------------------
    def spawn(self, coro, tracker: bool = False) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        bag = self.trackers if tracker else self.tasks
        bag.add(t)
        t.add_done_callback(bag.discard)
        return t

    async def get_json(self, path: str, timeout: float = 5.0):
        import aiohttp

        async with self.http.get(self.url + path, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, (await resp.json() if resp.content_type == "application/json" else None)

    async def wait_healthy(self, timeout: float) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout
        while True:
            if not self.stack.broker.running:
                raise RuntimeError(f"the broker exited (code {self.stack.broker.popen.returncode}); "
                                   f"see {self.stack.broker.logfile}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                status, _ = await self.get_json("/healthz", 2.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not answer /healthz within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    # -- pollers -------------------------------------------------------------------------
    async def poll_stages(self) -> None:
        import aiohttp

        while True:
            if self.broker_up:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
                    status, body = await self.get_json("/v1/stages", 3.0)
                    if status == 200:
                        self.absorb_stages(body["stages"])
            await asyncio.sleep(0.5)

    def absorb_stages(self, stages: dict) -> None:
        self.snapshot = stages
        for stage, s in stages.items():
            for w in s["workers"]:
                pid = (w.get("info") or {}).get("pid")
                if isinstance(pid, int):
                    self.pid_of[w["id"]] = pid
                    if self.stack.ours(pid):
                        self.stack.pids.add(pid)
                self.worker_ids.add(w["id"])

    async def poll_procs(self) -> None:
        while True:  # the scan runs in a thread; the set is only changed on the loop's thread
            self.stack.pids |= await asyncio.to_thread(session_members, set(self.stack.sessions))
            await asyncio.sleep(2.0)

    def live_workers(self, stage: str) -> list[str]:
        """Workers of a stage the broker lists, whose process runs and that we have not killed."""
        out = []
        for w in self.snapshot.get(stage, {}).get("workers", []):
            pid = self.pid_of.get(w["id"])
            if not w.get("draining") and pid is not None and pid not in self.killed and alive(pid):
                out.append(w["id"])
        return out

    async def manager_starting(self) -> dict[str, int]:
        """Workers the node manager has launched that have not registered yet, per stage."""
        import aiohttp

        url = f"http://127.0.0.1:{self.stack.mgr_port}/v1/allocation"
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
            async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as resp:
                body = await resp.json()
                return {s: int(a.get("starting", 0)) for s, a in body["allocation"].items()}
        return {}

    async def supervise(self) -> None:
        """Start a worker ourselves if a stage stays short of workers, counting those the node
        manager is starting, for ``--restart-grace`` seconds (the manager should see to it)."""
        while True:
            await asyncio.sleep(2.0)
            if not self.broker_up or not self.snapshot:
                self.supervisor_since.clear()
                continue
            now = time.monotonic()
            starting = await self.manager_starting()
            for stage in self.stack.stages:
                n = len(self.live_workers(stage))
                if n + starting.get(stage, 0) >= self.args.workers:
                    self.supervisor_since.pop(stage, None)
                    continue
                since = self.supervisor_since.setdefault(stage, now)
                if now - since > self.args.restart_grace:
                    wid = self.stack.start_worker(stage)
                    self.bench_started.append({"t": time.time(), "stage": stage, "worker": wid})
                    log(f"{self.stack.transport}: {stage} had {n} live worker(s) for {now - since:.0f} s: "
                        f"the bench started {wid}")
                    self.supervisor_since[stage] = now + 60  # give it time to load

    # -- jobs ------------------------------------------------------------------------------
    async def submit(self, phase: str, workflow: str, cancel: bool = False) -> Job | None:
        import aiohttp

        body = {"prompt": f"chaos {phase}", "workflow": workflow, "seed": self.rng.randrange(1 << 31)}
        body.update(WAN_PARAMS if workflow == "wan_i2v" else SYNTH_PARAMS)
        if workflow == "wan_i2v":
            body["image"] = self.image_b64
        t = time.time()
        try:
            async with self.http.post(self.url + "/v1/jobs", json=body,
                                      timeout=aiohttp.ClientTimeout(total=15)) as resp:
                if resp.status != 201:
                    text = (await resp.text())[:120]
                    self.refused[phase][f"HTTP {resp.status}: {text}"] += 1
                    return None
                job_id = (await resp.json())["id"]
        except TimeoutError:
            self.refused[phase]["no answer within 15 s (the job may exist)"] += 1
            return None
        except (aiohttp.ClientError, OSError):
            self.refused[phase]["broker unreachable"] += 1
            return None
        job = Job(job_id, workflow, phase, t, cancel)
        self.jobs[job_id] = job
        self.spawn(self.track(job), tracker=True)
        if cancel:
            self.spawn(self.cancel_later(job))
        return job

    async def cancel_later(self, job: Job) -> None:
        import aiohttp

        await asyncio.sleep(self.rng.uniform(0.05, 1.0))
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with self.http.delete(f"{self.url}/v1/jobs/{job.id}", timeout=aiohttp.ClientTimeout(total=5)):
                pass

    def absorb(self, job: Job, ev: dict) -> bool:
        """Record one stored event of a job; False if it was seen before."""
        data = ev.get("data") or {}
        key = (ev.get("seq"), ev.get("type"), json.dumps(data, sort_keys=True, default=str))
        if key in job.seen:
            return False
        job.seen.add(key)
        t = ev.get("type")
        ts = ev.get("ts") or 0.0
        if ts >= job.last_event[0]:
            what = " ".join(str(x) for x in (t, data.get("stage"), data.get("worker")) if x)
            job.last_event = (ts, what + (f" (attempt {data['attempt']})" if "attempt" in data else ""))
        if t in TERMINAL:
            job.terminals.append((ev.get("seq"), t, ev.get("ts"), data))
            job.ended.set()
        elif t == "stage_finished" and data.get("stage") == self.result_stage.get(job.workflow):
            job.result_finishes.add(ev.get("seq"))
        elif t == "stage_started":
            job.started_stages.add(data.get("stage"))
        elif t == "stage_retry":
            job.retries += 1
        elif t == "requeued":
            job.requeued += 1
        return True

    async def track(self, job: Job) -> None:
        """Follow a job's events until its terminal one, reconnecting through broker restarts.
        Each connection replays the history; events already seen are skipped."""
        import aiohttp

        url = f"{self.url}/v1/jobs/{job.id}/events"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
        while True:
            try:
                async with self.sse.get(url, timeout=timeout) as resp:
                    if resp.status == 200:
                        async for ev in sse_events(resp):
                            if self.absorb(job, ev):
                                self.on_live_event(job, ev)
                            if ev.get("type") in TERMINAL:
                                return
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                pass
            job.reconnects += 1
            await asyncio.sleep(0.5)

    # -- chaos: workers ------------------------------------------------------------------------
    def on_live_event(self, job: Job, ev: dict) -> None:
        trap = self.trap
        if trap is None or trap["fut"].done():
            return
        data = ev.get("data") or {}
        want = "stage_started" if trap["kind"] == "worker-running" else "stage_finished"
        if ev.get("type") != want or data.get("stage") != trap["stage"]:
            return
        lag = time.time() - (ev.get("ts") or 0.0)
        if lag > 2.0:  # replayed after a reconnect: the worker has moved on
            return
        note = {"job": job.id, "event_seq": ev.get("seq"), "event_lag_s": round(lag, 4)}
        if self.kill_worker(data.get("worker"), trap["stage"], trap["kind"], note):
            trap["fut"].set_result(True)

    def can_kill(self, stage: str, wid: str) -> bool:
        if self.args.allow_empty:
            return True
        return len([w for w in self.live_workers(stage) if w != wid]) >= 1

    def kill_worker(self, wid: str | None, stage: str, kind: str, note: dict | None = None) -> bool:
        pid = self.pid_of.get(wid) if wid else None
        if pid is None or pid in self.killed or not self.stack.ours(pid):
            return False
        if not self.can_kill(stage, wid):
            self.skipped[f"{stage}: would leave no live worker"] += 1
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.killed.add(pid)
        rec = {"t": round(time.time() - self.phase_window["chaos"][0], 3), "kind": kind, "stage": stage,
               "worker": wid, "pid": pid, **(note or {})}
        self.kills.append(rec)
        log(f"{self.stack.transport}: SIGKILL {kind} {wid} (pid {pid})"
            + (f" (job ...{note['job'][-8:]})" if note and "job" in note else ""))
        return True

    def kill_idle(self, stage: str) -> bool:
        candidates = self.live_workers(stage)
        if not candidates:
            self.skipped[f"{stage}: no live worker"] += 1
            return False
        return self.kill_worker(self.rng.choice(candidates), stage, "worker-idle")

    # -- chaos: broker ---------------------------------------------------------------------------
    async def kill_broker(self) -> None:
        b = self.stack.broker
        self.broker_up = False
        t0 = time.time()
        in_flight = sum(1 for j in self.jobs.values() if not j.terminals)
        b.kill()
        await asyncio.to_thread(b.popen.wait)
        down = self.rng.uniform(0.5, 2 * self.args.heartbeat_s * self.args.liveness)
        log(f"{self.stack.transport}: SIGKILL broker (pid {b.pid}, {in_flight} job(s) in flight); "
            f"restarting in {down:.1f} s")
        await asyncio.sleep(down)
        for attempt in range(5):
            self.stack.start_broker()
            try:
                await self.wait_healthy(60)
                break
            except RuntimeError as exc:
                if attempt == 4:
                    raise
                log(f"{self.stack.transport}: broker restart failed ({exc}); trying again")
                await asyncio.sleep(1.0)
        self.snapshot = {}
        self.broker_up = True
        self.broker_kills.append({"t": round(t0 - self.phase_window["chaos"][0], 3),
                                  "down_s": round(time.time() - t0, 3), "planned_down_s": round(down, 3),
                                  "jobs_in_flight": in_flight})

    async def chaos(self, seconds: float) -> None:
        a = self.args
        start = time.monotonic()
        end = start + seconds
        broker_at = [start + seconds * (i + 1) / (a.broker_kills + 1) for i in range(a.broker_kills)]
        plan: list[tuple[str, str]] = []
        loop = asyncio.get_running_loop()
        while (now := time.monotonic()) < end:
            if broker_at and now >= broker_at[0]:
                broker_at.pop(0)
                await self.kill_broker()
                continue
            if not plan:
                plan = [(s, k) for s in self.stack.stages for k in ("worker-running", "worker-finished")]
                self.rng.shuffle(plan)
            stage, kind = plan.pop()
            limit = min([end, *broker_at[:1]])
            fut = loop.create_future()
            self.trap = {"stage": stage, "kind": kind, "fut": fut}
            try:
                await asyncio.wait_for(asyncio.shield(fut), max(0.1, min(a.trap_timeout, limit - time.monotonic())))
            except TimeoutError:
                if time.monotonic() < limit:
                    self.kill_idle(stage)
                else:
                    continue
            finally:
                self.trap = None
            pause = self.rng.uniform(0.5, 1.5) * a.kill_every
            await asyncio.sleep(max(0.0, min(pause, min([end, *broker_at[:1]]) - time.monotonic())))

    # -- chaos: junk -----------------------------------------------------------------------------
    async def junk_loop(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.args.junk_every)
            if time.monotonic() >= end:
                return
            if self.broker_up:
                await self.junk_burst()

    def junk_frames(self) -> list[list[bytes]]:
        import msgpack

        from broker import protocol

        v = protocol.VERSION
        live = [j for j in self.jobs.values() if not j.terminals]
        real = self.rng.choice(live) if live else None
        fake = os.urandom(16).hex()
        stage = self.rng.choice(self.stack.stages)
        bad_stats = [[1, 2, 3], "stats", 7, None, {"bytes_sent": "lots", "bytes_received": [1]},
                     {"auto_choices": [1, 2]}, {"auto_choices": {"shm": "many"}}, {"transport": {"x": [1]}},
                     {"bytes_sent": 1e308}, {str(i): i for i in range(200)}]
        frames = [
            [os.urandom(self.rng.randint(1, 512))],
            [b"\xc1"],  # a byte msgpack never uses
            [msgpack.packb({"v": v, "k": "DONE", "job": fake, "stage": stage})[:-5]],  # truncated
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"v": 99, "k": "REGISTER"})],
            [msgpack.packb({"v": v, "k": "NOPE"})],
            [msgpack.packb({"v": v, "k": "DONE", "job": 5, "stage": None})],
            [msgpack.packb({"v": v, "k": "REGISTER", "stage": stage, "capacity": "lots", "descriptor": []})],
            [b"a", b"b", b"c"],
            [msgpack.packb([{"v": v, "k": "DONE", "job": 5}, "not a map", {"v": v, "k": "HEARTBEAT"}])],
            *[[protocol.pack("HEARTBEAT", load=self.rng.choice([3, -1, "x", None]), stats=s)] for s in bad_stats],
            [protocol.pack("DONE", job=fake, stage=stage, timings={"run_s": "x"}, result={"path": "/etc/passwd"})],
            [protocol.pack("STARTED", job=fake, stage=stage)],
            [protocol.pack("PROGRESS", job=fake, stage=stage, step=1, total=0)],
            [protocol.pack("FAILED", job=fake, stage=stage, reason="junk", retryable=False)],
            [protocol.pack("REGISTER", stage="no-such-stage", capacity=1, descriptor={})],
            [protocol.pack("DISCONNECT")],
        ]
        if real is not None:
            for s in sorted(self.stages_of[real.workflow]):
                frames.append([protocol.pack("DONE", job=real.id, stage=s, result={"path": "/etc/passwd"})])
                frames.append([protocol.pack("FAILED", job=real.id, stage=s, reason="junk", retryable=False)])
        return frames

    async def junk_burst(self) -> None:
        import aiohttp
        import zmq

        t0 = time.time()
        rec = {"t": round(t0 - self.phase_window["chaos"][0], 3), "raw_tcp": 0, "frames": 0, "replies": 0}
        for blob in (os.urandom(self.rng.randint(1, 4096)), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"\xff" * 10 + os.urandom(64), b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f" + os.urandom(600)):
            with contextlib.suppress(OSError, TimeoutError):
                _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.stack.ctl_port), 2)
                w.write(blob)
                await w.drain()
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
                rec["raw_tcp"] += 1
        dealer = self.zctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, f"junk-{os.urandom(6).hex()}".encode())
        dealer.connect(self.stack.control)
        try:
            for frames in self.junk_frames():
                await dealer.send_multipart(frames)
                rec["frames"] += 1
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                if await dealer.poll(50):
                    await dealer.recv_multipart()
                    rec["replies"] += 1
        finally:
            dealer.close(0)
        await asyncio.sleep(0.1)
        rec["rest"] = {}
        for path in ("/healthz", "/v1/stages", "/metrics"):
            try:
                async with self.http.get(self.url + path, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    await resp.read()
                    rec["rest"][path] = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                rec["rest"][path] = f"{type(exc).__name__}" if self.broker_up else "broker down"
        self.junk.append(rec)
        bad = {p: s for p, s in rec["rest"].items() if s != 200 and s != "broker down"}
        if bad:
            log(f"{self.stack.transport}: after a junk burst: {bad}")

    # -- load ----------------------------------------------------------------------------------
    def shares(self) -> dict[str, float]:
        """The offered mix: wan_i2v gets --wan-fraction, the other workflows the rest, evenly."""
        wfs = self.stack.workflows
        if len(wfs) == 1:
            return {wfs[0]: 1.0}
        if "wan_i2v" in wfs:
            rest = [w for w in wfs if w != "wan_i2v"]
            other = (1 - self.args.wan_fraction) / len(rest)
            return {"wan_i2v": self.args.wan_fraction, **{w: other for w in rest}}
        return {w: 1 / len(wfs) for w in wfs}

    def pick_workflow(self) -> str:
        x, acc = self.rng.random(), 0.0
        for wf, share in self.shares().items():
            acc += share
            if x < acc:
                return wf
        return self.stack.workflows[-1]

    async def poisson(self, phase: str, seconds: float, rate: float) -> None:
        t = time.monotonic()
        end = t + seconds
        while True:
            t += self.rng.expovariate(rate)
            if t >= end:
                break
            await asyncio.sleep(max(0.0, t - time.monotonic()))
            self.spawn(self.submit(phase, self.pick_workflow(), self.rng.random() < self.args.cancel_fraction))
        await asyncio.sleep(max(0.0, end - time.monotonic()))

    async def closed_loop(self, phase: str, workflow: str, seconds: float, window: int, ramp: float) -> float:
        """Keep ``window`` jobs of ``workflow`` in flight for ``seconds``; jobs/s that ended after ``ramp``."""
        t0 = time.monotonic()
        ends: list[float] = []

        async def lane() -> None:
            while time.monotonic() - t0 < seconds:
                job = await self.submit(phase, workflow)
                if job is None:
                    await asyncio.sleep(0.5)
                    continue
                try:
                    await asyncio.wait_for(job.ended.wait(), max(0.1, seconds - (time.monotonic() - t0)))
                except TimeoutError:
                    return
                ends.append(time.monotonic() - t0)

        await asyncio.gather(*(lane() for _ in range(window)))
        n = sum(1 for e in ends if ramp <= e <= seconds)
        return n / max(1e-9, seconds - ramp)

    async def wait_ended(self, jobs: list[Job], timeout: float) -> int:
        """Wait until every job has a terminal event (or ``timeout``); how many have not."""
        deadline = time.monotonic() + timeout
        while True:
            left = sum(1 for j in jobs if not j.terminals)
            if not left or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(0.25)

    # -- phases ----------------------------------------------------------------------------------
    async def wait_workers(self, timeout: float) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout
        want = self.args.workers
        while True:
            if not self.stack.manager.running:
                raise RuntimeError(f"the node manager exited (code {self.stack.manager.popen.returncode}); "
                                   f"see {self.stack.manager.logfile}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
                status, body = await self.get_json("/v1/stages", 3.0)
                if status == 200:
                    self.absorb_stages(body["stages"])
                    short = {s: len(self.live_workers(s)) for s in self.stack.stages
                             if len(self.live_workers(s)) < want}
                    if not short:
                        return
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"stages short of workers after {timeout:.0f} s: {short}")
            await asyncio.sleep(0.5)

    def mark(self, name: str, t0: float) -> None:
        self.phase_s[name] = round(time.monotonic() - t0, 1)
        self.loadavg[name] = round(os.getloadavg()[0], 1)

    async def run(self, baseline_s: float, chaos_s: float, calibrate: bool) -> None:
        import aiohttp
        import zmq.asyncio

        a, st = self.args, self.stack
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        self.sse = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.zctx = zmq.asyncio.Context()
        try:
            t0 = time.monotonic()
            st.start_broker()
            await self.wait_healthy(60)
            self.broker_up = True
            st.start_manager()
            self.spawn(self.poll_procs())
            await self.wait_workers(a.ready_timeout)
            self.initial_ids = set(self.worker_ids)
            self.spawn(self.poll_stages())
            self.mark("start", t0)
            log(f"{st.transport}: {sum(len(self.live_workers(s)) for s in st.stages)} workers up in "
                f"{self.phase_s['start']:.0f} s")

            t0 = time.monotonic()
            warm = [await self.submit("warmup", w) for w in st.workflows for _ in range(2)]
            warm += await asyncio.gather(*(self.submit("warmup", w) for w in st.workflows for _ in range(a.workers)))
            left = await self.wait_ended([j for j in warm if j], 180)
            if left:
                log(f"{st.transport}: {left} warm-up job(s) did not end within 180 s")
            self.mark("warmup", t0)

            if calibrate:
                # Each workflow alone in a closed loop gives its capacity X_w; the mix's capacity is
                # 1 / sum(share_w / X_w) (the workflows share the machine's cores). A closed loop over
                # the mix would over-weight the fast jobs: its lanes cycle them while a slow one runs.
                t0 = time.monotonic()
                seconds = a.calibrate_seconds
                shares = self.shares()
                for wf in shares:
                    x = await self.closed_loop("calibrate", wf, seconds, a.calibrate_window, min(3.0, seconds / 3))
                    await self.wait_ended([j for j in self.jobs.values() if j.phase == "calibrate"], 60)
                    if x <= 0:
                        raise RuntimeError(f"calibration finished no {wf} job: the stack does not serve it")
                    self.capacity[wf] = x
                    log(f"{st.transport}: {wf} alone: {x:.2f} jobs/s with {a.calibrate_window} in flight")
                self.calibrated = 1.0 / sum(share / self.capacity[wf] for wf, share in shares.items())
                self.rate = a.load * self.calibrated
                self.mark("calibrate", t0)
                log(f"{st.transport}: mix capacity {self.calibrated:.2f} jobs/s; load {self.rate:.2f} jobs/s")

            t0 = time.monotonic()
            self.phase_window["baseline"] = (time.time(), 0.0)
            log(f"{st.transport}: baseline, {baseline_s:.0f} s at {self.rate:.2f} jobs/s")
            await self.poisson("baseline", baseline_s, self.rate)
            self.phase_window["baseline"] = (self.phase_window["baseline"][0], time.time())
            left = await self.wait_ended([j for j in self.jobs.values() if j.phase == "baseline"], a.drain_seconds)
            if left:
                log(f"{st.transport}: {left} baseline job(s) had not ended {a.drain_seconds:.0f} s after it")
            self.mark("baseline", t0)

            t0 = time.monotonic()
            self.phase_window["chaos"] = (time.time(), 0.0)
            log(f"{st.transport}: chaos, {chaos_s:.0f} s at {self.rate:.2f} jobs/s")
            self.spawn(self.supervise())
            await asyncio.gather(self.poisson("chaos", chaos_s, self.rate), self.chaos(chaos_s),
                                 self.junk_loop(chaos_s))
            self.phase_window["chaos"] = (self.phase_window["chaos"][0], time.time())
            self.mark("chaos", t0)

            t0 = time.monotonic()
            left = await self.wait_ended(list(self.jobs.values()), a.drain_seconds)
            self.mark("drain", t0)
            log(f"{st.transport}: drain: {left} job(s) without a terminal event after {self.phase_s['drain']:.0f} s")

            t0 = time.monotonic()
            await self.audit()
            self.audited = True
            self.mark("audit", t0)
        finally:
            for t in list(self.trackers) + list(self.tasks):
                t.cancel()
            await asyncio.gather(*self.trackers, *self.tasks, return_exceptions=True)
            await self.http.close()
            await self.sse.close()
            self.zctx.term()

    async def audit(self) -> None:
        """Read every job back: its stored state and its whole event history."""
        import aiohttp

        for t in list(self.trackers):
            t.cancel()
        await asyncio.gather(*self.trackers, return_exceptions=True)
        sem = asyncio.Semaphore(8)
        self.audit_at = time.time()

        async def one(job: Job) -> None:
            async with sem:
                for attempt in range(3):
                    try:
                        status, body = await self.get_json(f"/v1/jobs/{job.id}", 10.0)
                        if status == 404:
                            job.final_state = "unknown to the broker"
                            return
                        job.final_state, job.final_reason = body.get("state"), body.get("reason")
                        break
                    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                        await asyncio.sleep(1.0)
                else:
                    job.final_state = "unreadable"
                    return
                # the history: a terminal job's stream ends after it; a live one's would not
                timeout = aiohttp.ClientTimeout(total=20 if job.final_state in TERMINAL else 3)
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    async with self.sse.get(f"{self.url}/v1/jobs/{job.id}/events", timeout=timeout) as resp:
                        async for ev in sse_events(resp):
                            self.absorb(job, ev)
                            if ev.get("type") == "failed" and ev.get("seq") is not None:
                                job.final_stage = (ev.get("data") or {}).get("stage")

        await asyncio.gather(*(one(j) for j in self.jobs.values()))

    # -- results ---------------------------------------------------------------------------------
    def stuck(self, job: Job) -> bool:
        """A lost job with no event for --stuck-seconds: it hangs (else it was still moving, slowly)."""
        return not job.last_event[0] or self.audit_at - job.last_event[0] >= self.args.stuck_seconds

    def names_stage(self, job: Job) -> bool:
        stages = self.stages_of.get(job.workflow, set())
        return any(m in stages for m in STAGE_RE.findall(job.final_reason or ""))

    def held_rerun(self, kill: dict) -> bool | None:
        """For a kill after ``stage_finished``: whether the job ran the stage again afterwards (its
        held outputs were lost before a consumer had them), False if the consumer had them already."""
        job = self.jobs.get(kill.get("job", ""))
        if job is None:
            return None
        return any(type_ == "stage_retry" and seq is not None and seq > kill["event_seq"]
                   and json.loads(data).get("stage") == kill["stage"] for seq, type_, data in job.seen)

    def summary(self) -> dict:
        jobs = list(self.jobs.values())
        for k in self.kills:
            if k["kind"] == "worker-finished":
                k["held_outputs_rerun"] = self.held_rerun(k)
        states = collections.Counter(j.final_state for j in jobs)
        lost = [j for j in jobs if j.final_state not in TERMINAL]
        dup = [j for j in jobs if len(j.terminals) > 1]
        redone = [j for j in jobs if len(j.result_finishes) > 1 and len(j.terminals) <= 1]
        reopened = [j for j in jobs if j.terminals and j.final_state not in TERMINAL]
        failures = [{"job": j.id, "workflow": j.workflow, "phase": j.phase, "reason": j.final_reason,
                     "stage": j.final_stage, "names_stage": self.names_stage(j)}
                    for j in jobs if j.final_state == "failed"]
        latency, raw = {}, {}
        for phase in ("baseline", "chaos"):
            per: dict[str, list[float]] = collections.defaultdict(list)
            for j in jobs:
                end = j.first_end() if j.phase == phase else None
                if end is not None and end[1] == "succeeded" and j.final_state == "succeeded" and end[2]:
                    per["all"].append(end[2] - j.submitted)
                    per[j.workflow].append(end[2] - j.submitted)
            latency[phase] = {k: {"n": len(v), "p50_s": pct(v, 0.5), "p95_s": pct(v, 0.95)} for k, v in per.items()}
            raw[phase] = per["all"]
        kinds = collections.Counter(k["kind"] for k in self.kills)
        kinds["broker"] = len(self.broker_kills)
        by_stage: dict[str, dict] = {s: {} for s in self.stack.stages}
        for k in self.kills:
            by_stage[k["stage"]][k["kind"]] = by_stage[k["stage"]].get(k["kind"], 0) + 1
        new_ids = self.worker_ids - self.initial_ids
        bench_ids = {b["worker"] for b in self.bench_started}
        junk_bad = [{"t": r["t"], "rest": r["rest"]} for r in self.junk
                    if any(s != 200 and s != "broker down" for s in r["rest"].values())]
        return {
            "transport": self.stack.transport,
            "rate_jobs_per_s": round(self.rate or 0.0, 3),
            "phase_seconds": self.phase_s,
            "loadavg_after_phase": self.loadavg,
            "jobs_by_phase": dict(collections.Counter(j.phase for j in jobs)),
            "submitted": len(jobs),
            "succeeded": states.get("succeeded", 0),
            "failed": states.get("failed", 0),
            "cancelled": states.get("cancelled", 0),
            "cancel_requested": sum(1 for j in jobs if j.cancel),
            "lost": len(lost),
            "lost_jobs": [{"job": j.id, "workflow": j.workflow, "phase": j.phase, "state": j.final_state,
                           "retries": j.retries, "requeued": j.requeued, "last_event": j.last_event[1],
                           "idle_s": round(self.audit_at - j.last_event[0], 1) if j.last_event[0] else None,
                           "stuck": self.stuck(j)} for j in lost],
            "lost_stuck": sum(1 for j in lost if self.stuck(j)),
            "duplicated": len(dup),
            "duplicated_jobs": [{"job": j.id, "terminals": [[s, t] for s, t, _, _ in j.terminals],
                                 "result_stage_finishes": len(j.result_finishes), "final": j.final_state}
                                for j in dup],
            "reopened": len(reopened),
            "result_stage_ran_twice": len(redone),
            "result_stage_ran_twice_jobs": [j.id for j in redone],
            "refused": {p: dict(c) for p, c in self.refused.items()},
            "refused_total": sum(sum(c.values()) for c in self.refused.values()),
            "failures": failures,
            "failure_reasons": dict(collections.Counter(normalise(f["reason"]) for f in failures)),
            "retries": sum(j.retries for j in jobs),
            "requeued_by_broker_restart": sum(j.requeued for j in jobs),
            "stream_reconnects": sum(j.reconnects for j in jobs),
            "kills": dict(kinds),
            "kills_by_stage": by_stage,
            "kills_skipped": dict(self.skipped),
            "finished_kills_that_forced_a_rerun": sum(1 for k in self.kills if k.get("held_outputs_rerun")),
            "kill_log": self.kills,
            "broker_kills": self.broker_kills,
            "junk_bursts": len(self.junk),
            "junk_frames": sum(r["frames"] for r in self.junk),
            "junk_rest_errors": junk_bad,
            "workers_restarted_by_manager": len(new_ids - bench_ids),
            "workers_started_by_bench": len(self.bench_started),
            "latency": latency,
            "_latencies": raw,
        }


def normalise(reason: str | None) -> str:
    text = re.sub(r"[0-9a-f]{16,}", "<id>", reason or "(no reason)")
    text = re.sub(r"\b[a-z_]+-[0-9a-f]{8}\b", "<worker>", text)
    text = re.sub(r"\d+\.\d+", "<n>", text)
    return text[:200]


# -- the whole bench ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.keep = args.work_dir is not None
        self.root = Path(args.work_dir) if self.keep else Path(tempfile.mkdtemp(prefix="onepiece-chaos-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.stacks: list[Stack] = []
        self.results: list[dict] = []
        self.leaks: dict[str, dict] = {}
        self.shm_before = shm_names()
        self.rate: float | None = args.rate
        self.calibrated: float | None = None
        self.capacity: dict[str, float] = {}

    async def run_one(self, transport: str, baseline_s: float, chaos_s: float, seed: int) -> None:
        a = self.args
        stack = Stack(a, transport, self.root / transport, a.workflows)
        self.stacks.append(stack)
        run = Run(a, stack, self.rate, seed)
        try:
            await run.run(baseline_s, chaos_s, calibrate=self.rate is None)
            if self.rate is None:
                self.rate, self.calibrated, self.capacity = run.rate, run.calibrated, run.capacity
        finally:
            t0 = time.monotonic()
            self.leaks[transport] = await self.stop(stack)
            run.phase_s["stop"] = round(time.monotonic() - t0, 1)
            if run.audited:  # an interrupted run has no audit: its counts would mean nothing
                res = run.summary()
                res.update(self.leaks[transport])
                self.results.append(res)

    async def stop(self, stack: Stack) -> dict:
        """Orderly stop, then the leak check: what still runs, what is left in /dev/shm."""
        stack.scan()
        # SIGTERM: the manager drains its workers (killing those that take over 30 s), then exits.
        slow = [p.name for p, ok in zip(
            [stack.manager, *stack.extra],
            await asyncio.gather(stack.manager.stop(signal.SIGTERM, 60),
                                 *(p.stop(signal.SIGTERM, 45) for p in stack.extra))) if not ok]
        if not await stack.broker.stop(signal.SIGTERM, 20):
            slow.append("broker")
        await asyncio.sleep(1.0)
        # Whatever still runs now would have been left behind: a leak. Then it is killed.
        left = sorted(stack.scan() | {p for p in stack.pids if stack.ours(p)})
        described = [describe(p) for p in left]
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in stack.all_procs():
            if p.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(p.popen.wait, 5)
        names = shm_names() - self.shm_before
        mine = sorted(n for n in names if shm_pid(n) in stack.pids)
        for n in mine:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, n))
        return {"leaked_processes": len(left), "leaked_process_list": described,
                "leaked_shm": len(mine), "leaked_shm_names": mine,
                "stop_slow": slow, "processes_started": len(stack.pids)}

    def cleanup(self) -> None:
        for stack in self.stacks:
            stack.kill_all()
            for n in shm_names() - self.shm_before:
                if shm_pid(n) in stack.pids:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(SHM_DIR, n))
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def describe(pid: int) -> str:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    return str(pid)


def total(results: list[dict]) -> dict:
    out: dict = {}
    for key in ("submitted", "succeeded", "failed", "cancelled", "cancel_requested", "lost", "lost_stuck", "duplicated",
                "reopened", "result_stage_ran_twice", "refused_total", "retries", "requeued_by_broker_restart", "junk_bursts", "junk_frames",
                "workers_restarted_by_manager", "workers_started_by_bench", "leaked_processes", "leaked_shm"):
        out[key] = sum(r.get(key, 0) for r in results)
    for key in ("failures", "lost_jobs", "duplicated_jobs", "junk_rest_errors"):
        out[key] = [x for r in results for x in r.get(key, [])]
    out["failure_reasons"] = dict(sum((collections.Counter(r["failure_reasons"]) for r in results),
                                      collections.Counter()))
    out["kills"] = dict(sum((collections.Counter(r["kills"]) for r in results), collections.Counter()))
    lat = {}
    for phase in ("baseline", "chaos"):
        xs = [x for r in results for x in r["_latencies"].get(phase, [])]
        lat[phase] = {"n": len(xs), "p50_s": pct(xs, 0.5), "p95_s": pct(xs, 0.95)}
    out["latency"] = lat
    return out


def targets(tot: dict) -> list[dict]:
    b, c = tot["latency"]["baseline"]["p95_s"], tot["latency"]["chaos"]["p95_s"]
    unnamed = [f for f in tot["failures"] if not f["names_stage"]]
    ratio = (c / b) if b and c is not None else None
    leaked = tot["leaked_processes"] + tot["leaked_shm"]
    return [
        {"name": "lost = 0", "value": tot["lost"], "pass": tot["lost"] == 0},
        {"name": "duplicated = 0", "value": tot["duplicated"], "pass": tot["duplicated"] == 0},
        {"name": "leaked = 0 (processes + /dev/shm)", "value": f"{tot['leaked_processes']} + {tot['leaked_shm']}",
         "pass": leaked == 0},
        {"name": "every failure names a stage", "value": f"{len(unnamed)} of {tot['failed']} do not",
         "pass": not unnamed},
        {"name": f"p95 chaos <= {P95_RATIO:g}x p95 baseline",
         "value": (f"{c:.2f} s / {b:.2f} s = {ratio:.1f}x" if ratio is not None else "no samples"),
         "pass": ratio is not None and ratio <= P95_RATIO},
        {"name": "REST answers 200 after every junk burst", "value": f"{len(tot['junk_rest_errors'])} bursts not",
         "pass": not tot["junk_rest_errors"]},
    ]


def fmt_s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def report(args, meta: dict, results: list[dict], tot: dict, tg: list[dict]) -> list[str]:
    cols = [r["transport"] for r in results] + (["total"] if len(results) > 1 else [])
    rows: list[tuple[str, list]] = []

    def add(name, values, total_value=None):
        vals = list(values) + ([total_value] if len(results) > 1 else [])
        rows.append((name, vals))

    def each(key):
        return [r.get(key, 0) for r in results]

    for key in ("start", "warmup", "calibrate", "baseline", "chaos", "drain", "audit", "stop"):
        if any(key in r["phase_seconds"] for r in results):
            add(f"phase {key} (s)", [r["phase_seconds"].get(key, "-") for r in results], "")
    add("load average after baseline/chaos", [f"{r['loadavg_after_phase'].get('baseline', '-')}/"
                                              f"{r['loadavg_after_phase'].get('chaos', '-')}" for r in results], "")
    add("load (jobs/s)", [f"{r['rate_jobs_per_s']:.2f}" for r in results], "")
    for key, label in (("submitted", "jobs submitted"), ("succeeded", "  succeeded"), ("failed", "  failed"),
                       ("cancelled", "  cancelled"), ("lost", "  LOST"),
                       ("lost_stuck", f"    of which stuck ({args.stuck_seconds:g}+ s)"),
                       ("duplicated", "  DUPLICATED"),
                       ("reopened", "  ended, then reopened"),
                       ("result_stage_ran_twice", "  result stage ran twice, 1 result"), ("refused_total", "refused (broker down)"),
                       ("retries", "stage retries"), ("requeued_by_broker_restart", "re-queued by broker restart")):
        add(label, each(key), tot[key])
    for k in ("worker-running", "worker-finished", "worker-idle", "broker"):
        add(f"kills: {k}", [r["kills"].get(k, 0) for r in results], tot["kills"].get(k, 0))
        if k == "worker-finished":
            add("  then the stage ran again", [r["finished_kills_that_forced_a_rerun"] for r in results],
                sum(r["finished_kills_that_forced_a_rerun"] for r in results))
    add("kills skipped (stage kept alive)", [sum(r["kills_skipped"].values()) for r in results],
        sum(sum(r["kills_skipped"].values()) for r in results))
    add("workers restarted: manager", each("workers_restarted_by_manager"), tot["workers_restarted_by_manager"])
    add("workers restarted: bench", each("workers_started_by_bench"), tot["workers_started_by_bench"])
    add("junk bursts (frames)", [f"{r['junk_bursts']} ({r['junk_frames']})" for r in results],
        f"{tot['junk_bursts']} ({tot['junk_frames']})")
    for phase in ("baseline", "chaos"):
        add(f"latency {phase} p50/p95 (s)",
            [f"{fmt_s(r['latency'][phase].get('all', {}).get('p50_s'))}/"
             f"{fmt_s(r['latency'][phase].get('all', {}).get('p95_s'))}" for r in results],
            f"{fmt_s(tot['latency'][phase]['p50_s'])}/{fmt_s(tot['latency'][phase]['p95_s'])}")
        for wf in args.workflows:
            if len(args.workflows) > 1:
                cells = []
                for r in results:
                    lw = r["latency"][phase].get(wf, {})
                    cells.append(f"{fmt_s(lw.get('p50_s'))}/{fmt_s(lw.get('p95_s'))} ({lw.get('n', 0)})")
                add(f"  {wf} p50/p95 (n)", cells, "")
    add("leaked processes", each("leaked_processes"), tot["leaked_processes"])
    add("leaked /dev/shm names", each("leaked_shm"), tot["leaked_shm"])

    w0 = max(len(r[0]) for r in rows) + 2
    w = max(9, *(len(str(v)) + 2 for _, vals in rows for v in vals))
    lines = [f"OnePiece chaos soak: {', '.join(args.workflows)} on {' then '.join(r['transport'] for r in results)}; "
             f"{args.workers} workers per stage; {meta['cpus']} CPU(s); load average {meta['loadavg_start']:.1f} "
             f"at start, {meta['loadavg_end']:.1f} at end; code {meta['code']}",
             f"load: Poisson arrivals, {meta['load_desc']}; wan_i2v share {meta['wan_share']}; "
             f"cancel share {args.cancel_fraction:g}",
             f"chaos: a worker SIGKILLed every ~{args.kill_every:g} s, the broker {args.broker_kills}x per transport, "
             f"junk every ~{args.junk_every:g} s; killed workers restarted by the node manager "
             f"(static policy), the bench's supervisor as a fallback",
             "",
             f"{'':<{w0}}" + "".join(f"{c:>{w}}" for c in cols)]
    for name, vals in rows:
        lines.append(f"{name:<{w0}}" + "".join(f"{str(v):>{w}}" for v in vals))
    lines.append("")
    lines.append("kills by stage (running/finished/idle):")
    for r in results:
        parts = [f"{s} {v.get('worker-running', 0)}/{v.get('worker-finished', 0)}/{v.get('worker-idle', 0)}"
                 for s, v in r["kills_by_stage"].items()]
        lines.append(f"  {r['transport']}: " + ", ".join(parts))
    if tot["failure_reasons"]:
        lines.append("failures (count: reason):")
        for reason, n in sorted(tot["failure_reasons"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n:>4}: {reason}")
    if tot["lost_jobs"]:
        lines.append("lost jobs (first 10: job, workflow, phase, state at audit, last event, seconds since):")
        for j in tot["lost_jobs"][:10]:
            lines.append(f"  {j['job']} {j['workflow']} {j['phase']} {j['state']}, last: {j['last_event']}, "
                         f"{j['idle_s']} s ago{' (stuck)' if j['stuck'] else ''}")
    if tot["duplicated_jobs"]:
        lines.append("duplicated jobs (first 10):")
        for j in tot["duplicated_jobs"][:10]:
            lines.append(f"  {j['job']} terminal events {j['terminals']}, result-stage finishes "
                         f"{j['result_stage_finishes']}, final {j['final']}")
    if tot["junk_rest_errors"]:
        lines.append(f"REST after junk (first 3 of {len(tot['junk_rest_errors'])}): "
                     + "; ".join(str(e['rest']) for e in tot["junk_rest_errors"][:3]))
    for r in results:
        for p in r.get("leaked_process_list", []):
            lines.append(f"  leaked ({r['transport']}): {p}")
        for n in r.get("leaked_shm_names", []):
            lines.append(f"  leaked /dev/shm ({r['transport']}): {n}")
        if r.get("stop_slow"):
            lines.append(f"  {r['transport']}: did not exit on SIGTERM in time: {', '.join(r['stop_slow'])}")
    lines.append("")
    lines.append("targets:")
    for t in tg:
        lines.append(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['name']:<44} {t['value']}")
    return lines


def code_revision() -> str:
    """The commit under test, and whether the tree has changes on top of it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes" if dirty else "")


def plan_times(args, n_transports: int) -> tuple[float, float, float]:
    """(chaos seconds per transport, baseline seconds per transport, total chaos seconds)."""
    if args.seconds is not None:
        chaos_total = float(args.seconds)
    elif args.minutes is not None:
        chaos_total = 60.0 * args.minutes
    else:
        chaos_total = 120.0 if args.quick else 600.0
    chaos = chaos_total / n_transports
    baseline = args.baseline_seconds if args.baseline_seconds is not None else (20.0 if args.quick else 60.0)
    return chaos, baseline, chaos_total


async def amain(args, bench: Bench) -> None:
    transports = ["shm", "tcp"] if args.transport == "both" else [args.transport]
    chaos_s, baseline_s, _ = plan_times(args, len(transports))
    for i, transport in enumerate(transports):
        await bench.run_one(transport, baseline_s, chaos_s, args.seed + i)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help="chaos time in all, split over transports (default 10)")
    p.add_argument("--seconds", type=float, default=None, help="chaos time in all, in seconds (overrides --minutes)")
    p.add_argument("--quick", action="store_true", help="2 minutes of chaos, 20 s baselines, one broker kill each")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--transport", choices=("both", "shm", "tcp"), default="both",
                   help="data plane: both (shm, then tcp, a fresh stack each; default), shm or tcp")
    p.add_argument("--workflows", default="synthetic3,wan_i2v",
                   help="comma-separated workflows to serve and load (default synthetic3,wan_i2v)")
    p.add_argument("--wan-fraction", type=float, default=0.15, help="share of wan_i2v jobs (default 0.15)")
    p.add_argument("--cancel-fraction", type=float, default=0.02, help="share of jobs cancelled soon after submit")
    p.add_argument("--workers", type=int, default=2, help="workers per stage (default 2)")
    p.add_argument("--rate", type=float, default=None, help="arrivals, jobs/s (default: --load x calibrated)")
    p.add_argument("--load", type=float, default=0.5, help="fraction of the calibrated throughput (default 0.5)")
    p.add_argument("--calibrate-seconds", type=float, default=None,
                   help="closed-loop calibration per workflow (default 15, quick 10)")
    p.add_argument("--calibrate-window", type=int, default=8, help="jobs in flight while calibrating (default 8)")
    p.add_argument("--baseline-seconds", type=float, default=None, help="no-chaos phase (default 60, quick 20)")
    p.add_argument("--drain-seconds", type=float, default=120.0,
                   help="how long jobs may take to end after the load stops (default 120)")
    p.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between worker kills (default 3)")
    p.add_argument("--trap-timeout", type=float, default=8.0,
                   help="seconds a trap waits for its event before a random worker of the stage is killed")
    p.add_argument("--broker-kills", type=int, default=None, help="broker SIGKILLs per transport (default 3, quick 1)")
    p.add_argument("--junk-every", type=float, default=5.0, help="mean seconds between junk bursts (default 5)")
    p.add_argument("--allow-empty", action="store_true", help="also kill the last live worker of a stage")
    p.add_argument("--restart-grace", type=float, default=120.0,
                   help="the bench starts a worker itself if a stage is short this long, counting the "
                        "workers the manager is starting (default 120)")
    p.add_argument("--stuck-seconds", type=float, default=30.0,
                   help="a lost job with no event for this long at the audit is called stuck (default 30)")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="heartbeat interval of every process (default 1)")
    p.add_argument("--liveness", type=int, default=3, help="missed heartbeats before a peer is dead (default 3)")
    p.add_argument("--max-attempts", type=int, default=3, help="broker's attempts per stage (default 3)")
    p.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `onepiece broker`, e.g. --broker-arg=--job-deadline-s=90 (repeatable)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds for the stack's workers to register")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work-dir", default=None,
                   help="keep data and logs here (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    args.workflows = [w.strip() for w in args.workflows.split(",") if w.strip()]
    if args.broker_kills is None:
        args.broker_kills = 1 if args.quick else 3
    if args.calibrate_seconds is None:
        args.calibrate_seconds = 10.0 if args.quick else 15.0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    bench = Bench(args)
    started = time.monotonic()
    meta = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0], "code": code_revision()}
    log(f"work dir {bench.root}")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    error = None
    try:
        runner(amain(args, bench))
    except KeyboardInterrupt:
        error = "interrupted"
        log("interrupted: stopping every process started here")
    except Exception as exc:  # noqa: BLE001 - reported, and the processes are still stopped
        error = f"{type(exc).__name__}: {exc}"
        log(f"the soak could not finish: {error}")
    finally:
        bench.cleanup()
    meta["loadavg_end"] = os.getloadavg()[0]
    results = bench.results
    if not results:
        return 130 if error == "interrupted" else 2
    tot = total(results)
    tg = targets(tot)
    if error:
        tg.append({"name": "the run finished", "value": error, "pass": False})
    ok = all(t["pass"] for t in tg)
    wan_share = f"{args.wan_fraction:g}" if {"wan_i2v", "synthetic3"} <= set(args.workflows) else (
        "1" if args.workflows == ["wan_i2v"] else "0")
    meta["wan_share"] = wan_share
    caps = ", ".join(f"{wf} {x:.2f}" for wf, x in bench.capacity.items())
    meta["load_desc"] = (f"{bench.rate:.2f} jobs/s = {args.load:g} x {bench.calibrated:.2f} jobs/s, the mix's capacity "
                         f"from each workflow's alone ({caps} jobs/s, closed loop of {args.calibrate_window})"
                         if bench.calibrated else
                         f"{(bench.rate or 0):.2f} jobs/s (--rate)")
    lines = report(args, meta, results, tot, tg)
    print("\n".join(lines), flush=True)
    log(f"done in {time.monotonic() - started:.0f} s")
    if args.json:
        out = {"config": {k: v for k, v in vars(args).items()}, "machine": meta,
               "rate_jobs_per_s": bench.rate, "calibrated_jobs_per_s": bench.calibrated,
               "capacity_jobs_per_s": bench.capacity,
               "total": tot, "transports": {r["transport"]: {k: v for k, v in r.items() if not k.startswith("_")}
                                             for r in results},
               "targets": tg, "pass": ok, "error": error}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    if error == "interrupted":
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
