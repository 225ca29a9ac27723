#!/usr/bin/env python
"""Elastic capacity on real processes: monolithic pipelines vs OnePiece (static and Node-Manager) on one
profile, at one steady load (bench/elastic.py is the day-long GPU-hours-at-SLO comparison, simulated).

    python bench/elastic_live.py [--quick] [--json PATH] [--profile wan_i2v_480p]
                            [--time-scale S] [--gpu-slots N] [--cpu-slots M] [--load F]

Everything is real except the GPUs: a :class:`broker.service.Broker` runs in
this process (temporary data dir, SQLite job store, ZeroMQ on a free loopback
port), stage workers are separate processes running the stock worker runtime
(``onepiece.cli worker``) through a :class:`manager.launcher.LocalLauncher`,
tensors move worker to worker over shm, and in the managed configuration the
Node Manager (:class:`manager.service.Manager` with
:class:`manager.policy.ProportionalPolicy`) starts and drains workers. Every
stage is ``synthetic``: the worker sleeps for a service time sampled from the
stage profile (``stages/profiles/<name>.toml``, see its citations) times
``--time-scale``, and hands on filler tensors (sizes x ``--bytes-scale``,
default the time scale).

Configurations, all on the same profile, the same pool of GPU slots and the
same arrival traces:

* ``monolithic`` (one row per monolithic variant of the profile: e.g. sp=1 and
  sp=8 for wan_i2v_480p; for wan22_i2v_480p the ways to hold two 14B experts:
  ``resident``, ``swap``, ``fsdp2``, ``fsdp8``): a workflow with ONE synthetic
  ``pipeline`` stage (gpu) whose time is the sum of the stage times, each DiT
  stage divided by its sequence-parallel speedup, plus the variant's host ->
  GPU weight copies; N/k workers, each holding k GPU slots from the first stage
  to the last, one job at a time, as a plain diffusers / xDiT deployment does;
* ``static``: the real DAG (e.g. text_encode, image_encode, vae_encode ->
  denoise -> vae_decode -> video_encode on CPU; for Wan2.2 A14B the DiT is two
  stages, denoise_high -> denoise_low, one expert per worker) with an
  allocation chosen by hand from the profile (see :func:`static_allocation`);
* ``managed``: the same DAG, the Node Manager decides the allocation within the
  same GPU and CPU slot budgets (floors of 1 per stage; the policy's time
  constants, written in real seconds, are scaled like the service times).

Arrivals: Poisson (fixed seeds) at ``--load`` x the smallest capacity the
profile predicts among the configurations, so that every one is busy but
stable; the same traces for all. Phases, on one stack per configuration
(scaled wall-clock; the report converts back to real time):

0. warm-up (managed only): arrivals ramp up to the rate, until the manager has
   settled (nothing starting, no queue, allocation unchanged);
1. steady: the steady trace (standard jobs): p50/p95 of job latency (submit ->
   succeeded), GPU and CPU slot-seconds each job held (its tasks' ``run_s`` x
   the slots the worker holds), jobs per *held* GPU-slot-hour (a fixed
   allocation holds the whole pool, the manager what it has started), the
   model memory of the workers;
2. step (OnePiece configurations), straight after it: the share of long videos
   steps from ``--long-before`` to ``--long-after`` at the same arrival rate;
   p95 after the step, and for the manager the control periods until its
   allocation stopped changing and its reversals;
3. capacity, straight after (no idle gap a manager could scale down in): a
   closed loop keeps ``2 x gpu_slots`` jobs in flight; jobs completed after a
   ramp give jobs per GPU-slot-hour of the pool (an open-loop trace below
   capacity cannot measure this: every stable configuration completes the
   offered rate).

Worker starts. A synthetic worker sleeps ``load_s x time scale`` at start (the
profile's model load) and scales each task by the job's class
(``params['work'][stage]``), as the stock ``Synthetic`` kind does. Workers are forked from a server that has imported everything
once (:func:`forkserver_main`): a process start (Python + torch import, 2-10 s
on this 2-core machine) is not scaled, and at a time scale of 0.0025 it would
stand for 15-60 minutes of real time, against the 49 s the profile gives a DiT
load. The table shows what a start cost (spawn -> registered, wall seconds).

Every process started here is stopped at the end, also on errors and Ctrl-C,
and any /dev/shm name of our workers is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHM_DIR = "/dev/shm"
TARGET_RATIO = 2.0  # managed >= 2x the jobs per GPU-slot-hour of monolithic, at equal or better p95
TARGET_STATIC_GAP = 0.10
TARGET_BETTER_MARGIN = 0.05  # "better" must beat the run-to-run noise of a p95 over ~60 jobs
TARGET_SETTLE_PERIODS = 3
TARGET_REVERSALS = 1


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# == worker side ====================================================================================



def worker_main(argv: list[str]) -> int:
    from onepiece import cli

    return cli.main(argv)


def forkserver_main(path: str) -> int:
    """Imports everything a worker needs once, then forks a worker per request.

    Requests come on the Unix socket ``path``: one JSON list (a worker's command line after
    ``onepiece.cli``) per connection; the reply is the child's pid. The server reaps its children
    and exits when its stdin closes (the bench is done with it). Forked children start in
    milliseconds; see make_launcher() for why that matters here."""
    import selectors
    import socket

    import torch  # noqa: F401 - the expensive part, done once
    import zmq  # noqa: F401

    import onepiece.cli  # noqa: F401
    import stages.worker  # noqa: F401
    import transports  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops us by closing stdin
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is sys.stdin:
                if not sys.stdin.readline():
                    srv.close()
                    return 0
                continue
            conn, _ = srv.accept()
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if not data.strip():
                    continue
                argv = json.loads(data)
                pid = os.fork()
                if pid == 0:  # the worker
                    code = 1
                    try:
                        sel.close()
                        srv.close()
                        conn.close()
                        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
                            signal.signal(sig, signal.SIG_DFL)
                        sys.stdin.close()
                        code = worker_main(argv) or 0
                    except BaseException:  # noqa: BLE001 - report, then leave without running the server's code
                        import traceback

                        traceback.print_exc()
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                conn.sendall(f"{pid}\n".encode())


class _Forked:
    """The bits of asyncio.subprocess.Process a launcher uses, for a process that is not our child
    (the fork server's): pid, returncode, send_signal, kill, wait. The exit status of a process that
    is not our child cannot be read: returncode is 0 once it has gone."""

    def __init__(self, pid: int):
        self.pid = pid
        self._fd = os.pidfd_open(pid)
        self._rc: int | None = None

    @property
    def returncode(self) -> int | None:
        if self._rc is None:
            import select

            if select.select([self._fd], [], [], 0)[0]:
                self._rc = 0
                os.close(self._fd)
        return self._rc

    def send_signal(self, sig) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        while self.returncode is None:
            await asyncio.sleep(0.02)
        return self._rc


def make_launcher(settings, env: dict, pids: list[int], sock: Path):
    """A LocalLauncher whose workers are forked by a fork server (see forkserver_main).

    Why: a process start here (Python + torch import, 2-10 s of this 2-core machine, more when it
    is busy) is not scaled, so at a time scale of 0.0025 it would stand for 15-60 minutes of real
    time, while the profile's model load (e.g. 49 s for the DiT) is what a real start costs and is
    scaled like everything else (the worker sleeps load_s x time scale). A fork of a process that has
    imported everything makes a start cost that: model load plus registration. Everything else is
    the stock worker (``onepiece.cli worker``, with the bench's synthetic kind)."""
    import uuid

    from manager.launcher import LocalLauncher, WorkerHandle

    class ForkLauncher(LocalLauncher):
        server: asyncio.subprocess.Process | None = None

        async def open(self) -> None:
            self.server = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.elastic", "--forkserver", str(sock), stdin=asyncio.subprocess.PIPE,
                env={**os.environ, **(self.env or {})}, cwd=str(ROOT))
            pids.append(self.server.pid)
            deadline = time.monotonic() + 120
            while not sock.exists():
                if self.server.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the worker fork server did not start")
                await asyncio.sleep(0.05)

        async def start(self, workflow: str, stage: str) -> WorkerHandle:
            worker_id = f"{stage}-{uuid.uuid4().hex[:8]}"
            cmd = self.command(workflow, stage, worker_id)
            argv = cmd[cmd.index("onepiece.cli") + 1:]  # ["worker", "--workflow", ...]
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write((json.dumps(argv) + "\n").encode())
            await writer.drain()
            pid = int((await reader.readline()).decode())
            writer.close()
            pids.append(pid)
            handle = WorkerHandle(worker_id, workflow, stage, _Forked(pid))
            handle.extra["spawned"] = time.time()
            self._handles[worker_id] = handle
            return handle

        async def close_server(self) -> None:
            if self.server is None:
                return
            with contextlib.suppress(Exception):
                self.server.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await self.server.wait()
            except TimeoutError:
                self.server.kill()
                await self.server.wait()
            self.server = None

    return ForkLauncher(settings, env=env)


# == helpers ==========================================================================================

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def workflow_toml(wf: dict) -> str:
    """A workflow table (as built by manager.profile) as TOML text, its job parameters included."""
    lines = [f"{k} = {_toml_value(wf[k])}" for k in ("name", "description", "result")]
    for section in ("stages", "params"):
        for sname, table in wf.get(section, {}).items():
            lines += ["", f"[{section}.{sname}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def our_segments(pids) -> list[str]:
    prefixes = tuple(f"onepiece-{pid}-" for pid in pids)
    with contextlib.suppress(OSError):
        return [n for n in os.listdir(SHM_DIR) if n.startswith(prefixes)]
    return []


def sweep_segments(pids) -> int:
    n = 0
    for name in our_segments(pids):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, name))
            n += 1
    return n


def poisson_trace(rate: float, seconds: float, seed: int, long_share, ramp_s: float = 0.0) -> list[tuple[float, str]]:
    """(offset, class) pairs of Poisson arrivals at ``rate``; ``long_share(t)`` gives the share of long
    jobs at offset t. With ``ramp_s`` the rate rises linearly from 0 over the first ramp_s (thinning)."""
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate)
    while t < seconds:
        keep = rng.random() < min(1.0, t / ramp_s) if ramp_s > 0 else True
        cls = "long" if rng.random() < long_share(t) else "standard"
        if keep:
            out.append((t, cls))
        t += rng.expovariate(rate)
    return out


# == configurations ===================================================================================

@dataclass
class Config:
    name: str  # monolithic | static | managed
    label: str  # row label
    workflow: dict  # the workflow table
    gpu_slots: int
    cpu_slots: int
    sp: int = 1  # GPU slots one worker of a GPU stage holds (monolithic sp degree)
    allocation: dict[str, int] = field(default_factory=dict)  # stage -> workers (not managed)
    step: bool = False  # also run the step scenario on this stack
    variant: object = None  # the monolithic variant (manager.profile.MonolithicVariant); None when split
    packed: dict | None = None  # GPU memory accounting: stage -> StageNeed, small stages sharing a GPU


def static_allocation(profile, gpu_slots: int, cpu_slots: int, cls_mix: dict[str, float] | None = None) -> dict:
    """The hand-chosen static allocation, from the profile alone:

    1. every stage gets one worker (a stage without a worker stalls every job);
    2. the remaining GPU slots go to the GPU stages in proportion to their expected GPU
       seconds per job (the load each stage puts on the pool), largest remainder first;
    3. a CPU stage gets the workers the GPU stages' throughput keeps 80% busy, at least one,
       at most the CPU slots (CPU slots beyond that stay free; they are not what is measured).

    For wan_i2v_480p this gives denoise all of the remaining GPU slots: its 358.6 s is 98%
    of the 366 s of GPU work per job, so every other GPU stage is at its floor of one; and
    video_encode one CPU worker (1.5 s per job at 12 / 358.6 jobs/s is 5% busy).
    """
    mix = cls_mix or {"standard": 1.0}
    demand = {s: sum(w * profile.mean_s(s, c) for c, w in mix.items()) for s in profile.stages}
    alloc = {s: 1 for s in profile.stages}
    gpu = [s for s, p in profile.stages.items() if p.gpu]
    spare = gpu_slots - len(gpu)
    if spare < 0:
        raise SystemExit(f"{gpu_slots} GPU slots cannot give each of {gpu} one worker")
    total = sum(demand[s] for s in gpu) or 1.0
    shares = {s: spare * demand[s] / total for s in gpu}
    for s in gpu:
        alloc[s] += int(shares[s])
    left = spare - sum(int(v) for v in shares.values())
    for s in sorted(gpu, key=lambda s: shares[s] - int(shares[s]), reverse=True)[:left]:
        alloc[s] += 1
    rate = min(alloc[s] / demand[s] for s in gpu if demand[s] > 0)  # jobs/s the GPU stages sustain
    cpu = [s for s, p in profile.stages.items() if not p.gpu]
    for s in cpu:
        alloc[s] = max(1, math.ceil(rate * demand[s] / 0.8))
    if sum(alloc[s] for s in cpu) > max(cpu_slots, len(cpu)):
        raise SystemExit(f"{cpu_slots} CPU slots cannot serve {cpu} at the GPU stages' rate")
    return alloc


GPU_MEMORY_GB = 80.0  # an H100's, for a profile that does not say (packed configurations)


def packing_needs(profile, alloc: dict[str, int]) -> dict:
    """What a worker of each GPU stage holds on its GPU, with its expected share of the GPU's
    compute under ``alloc`` at the rate the allocation sustains (``load``). The packed
    configurations share a GPU only among workers whose loads sum to at most 1: a synthetic
    stage sleeps, so two busy stages on one GPU would not slow each other here as they would
    on a real one; the load limit keeps that out of the measurement."""
    gpu = [s for s, st in profile.stages.items() if st.gpu]
    rate = min(alloc[s] / profile.mean_s(s) for s in gpu if profile.mean_s(s) > 0)
    return {s: dataclasses.replace(need, load=min(1.0, rate * profile.mean_s(s) / alloc[s]))
            for s, need in profile.stage_needs().items()}


def packed_allocation(profile, gpu_slots: int, cpu_slots: int) -> tuple[dict, dict, int]:
    """The static allocation when small stages share a GPU: start from the plain one, then, while
    the packing of its workers (``manager.packing.plan``, loads from :func:`packing_needs`, at most
    1 per GPU) leaves a GPU free, give it to the stage that limits the rate. Returns the
    allocation, the needs and the GPUs it holds."""
    from manager.packing import plan

    memory = profile.gpu_memory_gb or GPU_MEMORY_GB
    alloc = static_allocation(profile, gpu_slots, cpu_slots)
    gpu = [s for s, st in profile.stages.items() if st.gpu]

    def held(a):
        needs = packing_needs(profile, a)
        demands = [(s, needs[s]) for s in gpu for _ in range(a[s])]
        placed = plan(demands, [memory] * gpu_slots, max_load=1.0)
        return placed.held if placed.fits else gpu_slots + 1

    while True:
        limiting = min(gpu, key=lambda s: alloc[s] / profile.mean_s(s) if profile.mean_s(s) > 0 else math.inf)
        more = {**alloc, limiting: alloc[limiting] + 1}
        if held(more) > gpu_slots:
            return alloc, packing_needs(profile, alloc), held(alloc)
        alloc = more


def predicted_capacity(profile, cfg: Config, cls: str | None = None) -> float:
    """Jobs per real second the configuration can complete, from the profile's means alone
    (the managed configuration: the same as the static one, its best case)."""
    if cfg.name == "monolithic":
        return (cfg.gpu_slots // cfg.sp) / profile.pipeline_mean_s(cfg.variant, cls)
    alloc = cfg.allocation or static_allocation(profile, cfg.gpu_slots, cfg.cpu_slots)
    return min(alloc[s] / profile.mean_s(s, cls) for s in profile.stages if profile.mean_s(s, cls) > 0)


# == the bench ==========================================================================================

class Run:
    """One configuration: its broker, workers (and manager), and the phases run on them."""

    def __init__(self, args, profile, cfg: Config, tmp: Path, pids: list[int]):
        self.args, self.profile, self.cfg = args, profile, cfg
        self.dir = tmp / cfg.label.replace(" ", "_").replace("=", "")
        self.dir.mkdir(parents=True)
        self.pids = pids  # every worker pid ever started (for the final sweep)
        self.broker = None
        self.launcher = None
        self.manager = None
        self.records: dict[str, dict] = {}
        self.inflight: dict[str, int] = collections.defaultdict(int)  # phase -> jobs not ended
        self.ended = 0
        self._ended_evt: asyncio.Event | None = None
        self.start_times: list[float] = []  # spawn -> registered, seconds (wall)

    # -- stack -------------------------------------------------------------------------------
    async def start(self) -> None:
        from broker.core import TERMINAL
        from broker.service import Broker
        from manager.launcher import LocalLauncher
        from onepiece.config import load_settings

        wf_path = self.dir / f"{self.cfg.workflow['name']}.toml"
        wf_path.write_text(workflow_toml(self.cfg.workflow))
        self.wf_path = wf_path
        settings = load_settings(env={}, data_dir=self.dir / "data", control="tcp://127.0.0.1:*",
                                 transport=self.args.transport, workflows=[str(wf_path)])
        run = self

        class BenchBroker(Broker):
            def _on_event(self, e) -> None:
                if e.type in TERMINAL:
                    snap = self.core.job(e.job_id)
                    rec = run.records.get(e.job_id)
                    if rec is not None:
                        rec.update(ended=time.time(), state=e.type, stages=(snap or {}).get("stages", {}))
                        run.inflight[rec["phase"]] -= 1
                    run.ended += 1
                    if run._ended_evt is not None:
                        run._ended_evt.set()
                super()._on_event(e)

        self._ended_evt = asyncio.Event()
        self.broker = BenchBroker(settings)
        await self.broker.start()
        self.settings = settings.replace(control=self.broker.endpoint)
        pids = self.pids

        env = {"ONEPIECE_LOG_LEVEL": "ERROR", "ONEPIECE_TIME_SCALE": repr(self.args.time_scale),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.launcher = make_launcher(self.settings, env, self.pids, self.dir / "fork.sock")
        await self.launcher.open()
        if self.cfg.name == "managed":
            await self.start_manager()
        else:
            for stage, n in self.cfg.allocation.items():
                for _ in range(n):
                    await self.launcher.start(str(wf_path), stage)
            await self.wait_workers(sum(self.cfg.allocation.values()))
            if self.cfg.packed is not None:  # the GPUs its workers are packed onto, held throughout
                from manager.packing import plan

                demands = [(s, need) for s, need in self.cfg.packed.items() for _ in range(self.cfg.allocation[s])]
                memory = self.profile.gpu_memory_gb or GPU_MEMORY_GB
                self.packed_held = plan(demands, [memory] * self.cfg.gpu_slots, max_load=1.0).held

    async def wait_workers(self, want: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            live = sum(len([w for w in s["workers"] if not w["draining"]]) for s in self.broker.stages().values())
            if live >= want:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {live} of {want} workers registered in {timeout:.0f} s")
            if len(self.launcher.workers()) < want:
                raise RuntimeError("a worker process exited during start-up; see its log above")
            await asyncio.sleep(0.05)
        now = time.time()
        self.start_times = [now - h.extra["spawned"] for h in self.launcher.workers()]

    async def start_manager(self) -> None:
        from manager.policy import PolicyConfig, ProportionalPolicy
        from manager.service import Manager

        stages = list(self.cfg.workflow["stages"])
        # The policy's clock is this run's (scaled) clock: its time constants, which are
        # written in real seconds, are scaled like every service time. Counts are not.
        d = PolicyConfig()
        scale = self.args.time_scale
        policy = ProportionalPolicy(PolicyConfig(
            floors={s: 1 for s in stages}, period_s=self.args.period, rate_window_s=d.rate_window_s * scale,
            backlog_drain_s=d.backlog_drain_s * scale, move_horizon_s=d.move_horizon_s * scale))
        wf = next(iter(self.broker.workflows.values()))
        packing = {}
        if self.cfg.packed is not None:  # GPUs with memory; small stages share one (loads at most 1 per GPU)
            packing = dict(gpu_memory_gb=self.profile.gpu_memory_gb or GPU_MEMORY_GB, stage_needs=self.cfg.packed,
                           gpu_max_load=1.0)
        self.manager = Manager(self.broker, self.launcher, policy, gpu_slots=self.cfg.gpu_slots,
                               cpu_slots=self.cfg.cpu_slots, period_s=self.args.period,
                               workflows={wf.name: str(self.wf_path)}, **packing)
        await self.manager.start()
        deadline = time.monotonic() + 180
        while self.broker.missing_stages():
            if time.monotonic() > deadline:
                raise RuntimeError(f"manager: stages without a worker after 180 s: {self.broker.missing_stages()}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.manager is not None:
            with contextlib.suppress(Exception):
                await self.manager.stop()
            self.manager = None
        if self.launcher is not None:
            with contextlib.suppress(Exception):
                await self.launcher.aclose(30.0)
            with contextlib.suppress(Exception):
                await self.launcher.close_server()
            self.launcher = None
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.stop()
            self.broker = None

    # -- jobs ----------------------------------------------------------------------------------
    def params(self, cls: str) -> dict:
        """The job's parameters: only ``work`` (the per-stage time factors of its class), the one
        parameter besides ``steps`` that the synthetic workflows declare."""
        p = self.profile
        if self.cfg.name == "monolithic":
            factor = p.pipeline_mean_s(self.cfg.variant, cls) / p.pipeline_mean_s(self.cfg.variant, None)
            work = {"pipeline": factor}
        else:
            work = {s: p.scale(s, cls) for s in p.stages if p.scale(s, cls) != 1.0}
        return {"work": work}

    def submit(self, cls: str, phase: str) -> str:
        job = self.broker.submit(self.cfg.workflow["name"], self.params(cls))
        self.records[job] = {"submitted": time.time(), "cls": cls, "phase": phase}
        self.inflight[phase] += 1
        return job

    async def closed_loop(self, window: int, seconds: float, phase: str, spread_s: float = 0.0,
                          spread_n: int = 0) -> tuple[float, float]:
        """Keep ``window`` jobs of ``phase`` in flight for ``seconds``. The first ``spread_n`` are
        submitted evenly over ``spread_s`` (one job time): the workers then start at evenly spread
        phases, so that a window of a few job times counts no lockstep wave twice or not at all."""
        t0 = time.time()
        t_end = t0 + seconds
        first = min(window, spread_n or window)
        for _ in range(first):  # one per worker, at evenly spread phases of a job time
            self.submit("standard", phase)
            if spread_s:
                await asyncio.sleep(spread_s / first)
        while time.time() < t_end:
            while self.inflight[phase] < window:
                self.submit("standard", phase)
            self._ended_evt.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, t_end - time.time())):
                    await self._ended_evt.wait()
        return t0, time.time()

    async def open_loop(self, trace: list[tuple[float, str]], phase: str, stop_when=None) -> float:
        t0 = time.time()
        for offset, cls in trace:
            delay = t0 + offset - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop_when is not None and stop_when():
                break
            self.submit(cls, phase)
        return t0

    async def drain(self, timeout: float) -> int:
        """Wait until every submitted job ended; the number still running at the timeout."""
        deadline = time.monotonic() + timeout
        while self.ended < len(self.records):
            if time.monotonic() > deadline:
                return len(self.records) - self.ended
            self._ended_evt.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._ended_evt.wait()
        return 0

    # -- measurements ------------------------------------------------------------------------------
    def held_gpu_slots(self) -> int:
        """GPU slots held now: the manager's used slots (starting and draining workers hold theirs),
        or, for a fixed allocation, its workers x the slots each holds."""
        if self.manager is not None:
            return self.manager.slots()["gpu"]["used"]  # with packing: GPUs with a worker on them
        if self.cfg.packed is not None:
            return self.packed_held
        return sum(n * self.slots_of(s) for s, n in self.cfg.allocation.items()
                   if self.cfg.workflow["stages"][s]["gpu"])

    async def sample_held(self, every: float) -> None:
        self.held_samples: list[tuple[float, int]] = []
        while True:
            self.held_samples.append((time.time(), self.held_gpu_slots()))
            await asyncio.sleep(every)

    def held_rate(self, lo: float, hi: float) -> dict:
        """Jobs submitted in [lo, hi) that succeeded, per GPU slot-hour held in [lo, hi) (real hours),
        and the mean held. Counting by submission makes every stable configuration count the same
        jobs of the same trace: what differs is the slots it held for them."""
        xs = [(t, n) for t, n in getattr(self, "held_samples", []) if lo <= t < hi]
        held = statistics.fmean(n for _, n in xs) if xs else float(self.held_gpu_slots())
        done = sum(1 for r in self.records.values() if r.get("state") == "succeeded" and lo <= r["submitted"] < hi)
        hours = (hi - lo) / self.args.time_scale / 3600.0
        return {"held_gpu_slots": held, "completed_in_window": done,
                "jobs_per_held_slot_hour": done / (held * hours) if held and hours > 0 else None}

    def slots_of(self, stage: str) -> int:
        return self.cfg.sp if self.cfg.name == "monolithic" else 1

    def job_costs(self, rec: dict) -> tuple[float, float]:
        """(GPU slot-seconds, CPU slot-seconds) the job's tasks held, unscaled."""
        gpu = cpu = 0.0
        for stage, st in rec.get("stages", {}).items():
            run_s = float((st.get("timings") or {}).get("run_s", 0.0))
            spec = self.cfg.workflow["stages"][stage]
            if spec["gpu"]:
                gpu += run_s * self.slots_of(stage)
            else:
                cpu += run_s
        return gpu / self.args.time_scale, cpu / self.args.time_scale

    def model_memory_gb(self) -> float:
        total = 0.0
        for stage, s in self.broker.stages().items():
            n = len([w for w in s["workers"] if not w["draining"]])
            if self.cfg.name == "monolithic":
                total += n * self.profile.monolithic_memory_gb(self.cfg.variant)
            else:
                total += n * self.profile.stages[stage].memory_gb
        return total

    def allocation_now(self) -> dict[str, int]:
        return {stage: len([w for w in s["workers"] if not w["draining"]]) for stage, s in self.broker.stages().items()}

    def latency(self, phase: str, since: float | None = None, until: float | None = None) -> dict:
        scale = self.args.time_scale
        lat, gpu, cpu, unfinished, failed = [], [], [], 0, 0
        for rec in self.records.values():
            if rec["phase"] != phase:
                continue
            if since is not None and rec["submitted"] < since or until is not None and rec["submitted"] >= until:
                continue
            if "ended" not in rec:
                unfinished += 1
                continue
            if rec["state"] != "succeeded":
                failed += 1
                continue
            lat.append((rec["ended"] - rec["submitted"]) / scale)
            g, c = self.job_costs(rec)
            gpu.append(g)
            cpu.append(c)
        return {"jobs": len(lat), "unfinished": unfinished, "failed": failed, "p50_s": pct(lat, 0.5),
                "p95_s": pct(lat, 0.95), "gpu_slot_s": statistics.fmean(gpu) if gpu else None,
                "cpu_slot_s": statistics.fmean(cpu) if cpu else None}


def manager_history(run: Run, step_at: float, period: float, until: float) -> dict:
    """Settling and reversals between the step and the end of the trace, from Manager.decisions().

    settle_periods: control periods from the step to the last change the manager made before
    the trace ended (0: it changed nothing); reversals: per stage, how often the direction of its
    changes flipped (a +1 followed by a -1, or the other way). The drain after the trace is left
    out: arrivals stop there, and scaling down then is the right answer, not a reversal."""
    decisions = []
    with contextlib.suppress(Exception):
        decisions = list(run.manager.decisions())
    changes = []  # (time, stage, delta)
    for d in decisions:
        get = d.get if isinstance(d, dict) else (lambda k, default=None, _d=d: getattr(_d, k, default))
        t = get("time", None) or get("at", None) or get("ts", None)
        stage = get("stage", None)
        delta = get("delta", None)
        if delta is None:
            action = str(get("action", "") or get("kind", ""))
            if action in ("start", "scale_up", "up", "add", "launch"):
                delta = 1
            elif action in ("drain", "scale_down", "down", "remove", "stop"):
                delta = -1
            elif action in ("repurpose", "move"):
                src, dst = get("from_stage", None) or get("src", None), get("to_stage", None) or get("dst", None)
                if t is not None and src and dst:
                    changes += [(float(t), src, -1), (float(t), dst, 1)]
                continue
        if t is None or stage is None or not delta:
            continue
        changes.append((float(t), stage, int(delta)))
    after = [c for c in changes if step_at <= c[0] < until]
    settle = 0 if not after else math.ceil((max(c[0] for c in after) - step_at) / period)
    reversals = 0
    for stage in {c[1] for c in after}:
        signs = [1 if c[2] > 0 else -1 for c in sorted(after) if c[1] == stage]
        reversals += sum(1 for a, b in zip(signs, signs[1:]) if a != b)
    return {"decisions": len(decisions), "changes_after_step": len(after), "settle_periods": settle,
            "reversals": reversals, "parsed": bool(changes) or not decisions,
            "timeline": [(round(t - step_at, 3), st, d) for t, st, d in sorted(changes)],
            "log": [{"t_from_step_s": round(float(d.get("ts", 0)) - step_at, 3), "stage": d.get("stage"),
                     "delta": d.get("delta"), "reason": d.get("reason")} for d in decisions if isinstance(d, dict)]}


# == orchestration =======================================================================================

@dataclass(frozen=True)
class Plan:
    time_scale: float
    warmup_s: float
    capacity_s: float
    ramp_s: float
    latency_s: float
    step_before_s: float
    step_after_s: float
    drain_s: float
    mono_job_s: float  # scaled seconds of one monolithic sp=1 job


async def run_config(args, profile, cfg: Config, plan: Plan, traces: dict, tmp: Path, pids: list[int]) -> dict:
    run = Run(args, profile, cfg, tmp, pids)
    out: dict = {"config": cfg.name, "label": cfg.label, "sp_degree": cfg.sp if cfg.name == "monolithic" else None,
                 "variant": cfg.variant}
    t_start = time.monotonic()
    sampler = None
    try:
        await run.start()
        out["start_s"] = time.monotonic() - t_start
        out["worker_start_wall_s"] = statistics.fmean(run.start_times) if run.start_times else None
        log(f"[{cfg.label}] {len(run.launcher.workers())} worker process(es) up in {out['start_s']:.1f} s: "
            f"{run.allocation_now()}")
        sampler = asyncio.get_running_loop().create_task(run.sample_held(0.02))
        # 0. warm-up, managed only: the steady load for a while, so that the manager has found its
        # allocation before anything is measured (a running system has). The fixed allocations
        # need none: their workers are up and connections open on the first job.
        if run.manager is not None:
            t_min = time.time() + plan.warmup_s + 5 * args.period  # the ramp, then 5 periods at full rate
            state = {"alloc": None, "since": time.time()}

            def settled() -> bool:
                """The rate ramp done and 5 periods at full rate, nothing starting, no queue, and the
                allocation unchanged for two monolithic job times (the ramp-up's backlog gone too)."""
                now = time.time()
                alloc = run.manager.allocation()
                key = tuple(sorted((k, v["workers"], v["starting"]) for k, v in alloc.items()))
                if key != state["alloc"]:
                    state.update(alloc=key, since=now)
                queued = sum(s["queued"] for s in run.broker.stages().values())
                return (now >= t_min and not any(a["starting"] for a in alloc.values()) and queued == 0
                        and now - state["since"] >= 2 * plan.mono_job_s)

            await run.open_loop(traces["warmup"], "warmup", stop_when=settled)
            out["warmup_alloc"] = run.allocation_now()
            out["warmup_s"] = time.monotonic() - t_start - out["start_s"]
            log(f"[{cfg.label}] warm-up: manager settled after {out['warmup_s']:.1f} s at {out['warmup_alloc']}")
        # 1. steady trace, then (OnePiece) the step trace right after it: no gap in the arrivals,
        # so a manager never sees an idle system between the two
        t0 = await run.open_loop(traces["steady"], "steady")
        t_steady_end = time.time()
        out["steady_alloc"] = run.allocation_now()
        out["model_memory_gb"] = run.model_memory_gb()
        if cfg.step:
            t_step0 = await run.open_loop(traces["step"], "step")
            step_at = t_step0 + plan.step_before_s
            trace_end = time.time()
            out["step_alloc"] = run.allocation_now()
        # 2. capacity, straight after the trace (an idle gap would let a manager scale down first): a
        # closed loop of 2 x gpu_slots jobs in flight, the first ones spread over one job time
        window = 2 * cfg.gpu_slots
        job_s = profile.pipeline_mean_s(cfg.variant or 1) * plan.time_scale
        c0, c1 = await run.closed_loop(window, plan.ramp_s + plan.capacity_s, "capacity", spread_s=job_s,
                                       spread_n=cfg.gpu_slots // cfg.sp)
        lo = c0 + plan.ramp_s
        done = [r for r in run.records.values() if r["phase"] == "capacity" and r.get("state") == "succeeded"
                and lo <= r["ended"] < c1]
        rate_scaled = len(done) / (c1 - lo)
        out["capacity"] = {"jobs": len(done), "seconds": c1 - lo, "jobs_per_s_scaled": rate_scaled}
        out["capacity_jobs_per_slot_hour"] = rate_scaled * plan.time_scale * 3600.0 / cfg.gpu_slots
        out["capacity_alloc"] = run.allocation_now()
        log(f"[{cfg.label}] capacity: {len(done)} jobs in {c1 - lo:.1f} s -> "
            f"{out['capacity_jobs_per_slot_hour']:.2f} jobs per GPU-slot-hour of the pool; allocation at the end "
            f"{out['capacity_alloc']}")
        for job_id, rec in list(run.records.items()):  # the rest of the closed loop is not needed
            if "ended" not in rec and rec["phase"] == "capacity":
                with contextlib.suppress(Exception):
                    run.broker.cancel(job_id, "benchmark over")
        left = await run.drain(plan.drain_s)
        if left:
            log(f"[{cfg.label}] {left} job(s) still running {plan.drain_s:.0f} s after the capacity phase")
        lat = run.latency("steady", since=t0 + plan.ramp_s)
        lat.update(run.held_rate(t0 + plan.ramp_s, t_steady_end))
        out["steady"] = lat
        out["jobs_per_slot_hour"] = lat["jobs_per_held_slot_hour"]
        log(f"[{cfg.label}] steady: {lat['jobs']} jobs, p50 {_f(lat['p50_s'])} s, p95 {_f(lat['p95_s'])} s "
            f"(unscaled), {lat['unfinished']} unfinished; {lat['held_gpu_slots']:.1f} GPU slots held on average, "
            f"{lat['jobs_per_held_slot_hour']:.2f} jobs per held GPU-slot-hour; allocation {out['steady_alloc']}")
        if cfg.step:
            out["step_before"] = run.latency("step", until=step_at)
            out["step_after"] = run.latency("step", since=step_at)
            out["step_after"].update(run.held_rate(step_at, trace_end))
            if run.manager is not None:
                out["manager"] = manager_history(run, step_at, args.period, trace_end)
            log(f"[{cfg.label}] step: p95 before {_f(out['step_before']['p95_s'])} s, after "
                f"{_f(out['step_after']['p95_s'])} s; allocation {out['step_alloc']}"
                + (f"; manager {out['manager']}" if "manager" in out else ""))
    finally:
        if sampler is not None:
            sampler.cancel()
        await run.stop()
    out["wall_s"] = time.monotonic() - t_start
    return out


def _f(x, fmt="{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def build_configs(args, profile) -> tuple[list[Config], dict]:
    from stages.workflow import workflow_from_dict

    n, m = args.gpu_slots, args.cpu_slots
    configs = []
    for v in profile.variants:
        if n % v.sp:
            log(f"skipping {v.label}: {n} GPU slots are not a multiple of {v.sp}")
            continue
        if not profile.fits(v):
            log(f"skipping {v.label}: {profile.monolithic_peak_gb(v):.1f} GB per GPU does not fit "
                f"{profile.gpu_memory_gb:g} GB")
            continue
        wf = profile.monolithic_workflow(v, name=f"mono_{v.name.replace('=', '')}")
        workflow_from_dict(wf)
        configs.append(Config("monolithic", v.label, wf, n, 0, v.sp, {"pipeline": n // v.sp}, variant=v))
    split = profile.split_workflow(name="onepiece", bytes_scale=args.time_scale if args.bytes_scale is None
                                   else args.bytes_scale)
    workflow_from_dict(split)
    alloc = static_allocation(profile, n, m)
    configs.append(Config("static", "static", split, n, m, 1, alloc, step=True))
    if not args.no_managed:
        configs.append(Config("managed", "managed", split, n, m, 1, {}, step=True))
    # mechanism 1 of the capacity issue: small stages share a GPU (memory and load permitting)
    packed_alloc, needs, held = packed_allocation(profile, n, m)
    log(f"static packed: {held} GPU(s) held for {sum(packed_alloc[s] for s in needs)} GPU workers: "
        + ", ".join(f"{s} {packed_alloc[s]}" for s in needs))
    configs.append(Config("static", "static packed", split, n, m, 1, packed_alloc, packed=needs))
    if not args.no_managed:
        configs.append(Config("managed", "managed packed", split, n, m, 1, {}, packed=needs))
    return configs, alloc


def managed_available() -> str | None:
    try:
        from manager.policy import PolicyConfig, ProportionalPolicy  # noqa: F401
        from manager.service import Manager  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def report(args, profile, plan: Plan, results: list[dict], alloc: dict, rates: dict, skipped: str | None,
           leftover: int) -> tuple[list[str], list[dict], dict]:
    lines: list[str] = []
    add = lines.append
    scale = plan.time_scale
    w = max([18] + [len(r["label"]) + 1 for r in results])  # the label column
    add(f"OnePiece elastic capacity: profile {profile.name} ({profile.description})")
    add(f"machine: {os.cpu_count()} cores, load average {rates['loadavg'][0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end (other work on the machine slows process starts and control hops)")
    add(f"pool: {args.gpu_slots} GPU slots, {args.cpu_slots} CPU slots; time scale {scale:g} "
        f"(1 s here = {1 / scale:,.0f} s real); transport {args.transport}; control period "
        f"{args.period:g} s here = {args.period / scale:,.0f} s real")
    add(f"static allocation (by hand from the profile, see static_allocation()): {alloc}")
    caps = rates["capacity_real_per_h"]
    add("capacity the profile predicts, jobs/h: " + ", ".join(f"{k} {v:.1f}" for k, v in caps.items()))
    add(f"arrivals: Poisson, {rates['rate_real_per_h']:.1f} jobs/h real = {args.load:.0%} of the smallest of those "
        f"({rates['basis']}); steady trace {plan.latency_s / scale / 3600:.1f} h real of standard (81-frame) jobs, "
        f"seed {args.seed}")
    add("")
    add("Expected from the profile alone (per standard job):")
    add(f"  OnePiece: {profile.gpu_seconds_per_job():.1f} GPU-s + {profile.cpu_seconds_per_job():.1f} CPU-s; "
        + "; ".join(f"{v.label}: {profile.monolithic_gpu_seconds_per_job(v):.1f} GPU-s "
                    f"({profile.pipeline_mean_s(v):.1f} s x {v.sp})" for v in profile.variants))
    mem = f" of {profile.gpu_memory_gb:g} GB" if profile.gpu_memory_gb else ""
    split_peak = max(p.peak_gb for p in profile.stages.values() if p.gpu)
    add(f"  peak memory per GPU{mem}: OnePiece {split_peak:.1f} (its largest stage; one model per worker); "
        + "; ".join(f"{v.label} {profile.monolithic_peak_gb(v):.1f}"
                    + (f" incl. {profile.copy_s_per_job(v):.2f} s/job of host->GPU copies of {', '.join(v.offload)}"
                       if v.offload else "") for v in profile.variants))
    add("")
    add("Steady load")
    add(f"  {'config':<{w}}{'jobs/held':>10}{'held':>6}{'p50 s':>7}{'p95 s':>7}{'GPU s':>8}{'CPU s':>7}"
        f"{'model':>8}{'jobs':>6}{'capacity':>10}  allocation")
    add(f"  {'':<{w}}{'GPU-slot-h':>10}{'GPUs':>6}{'':>7}{'':>7}{'/job':>8}{'/job':>7}{'GB':>8}{'':>6}"
        f"{'/slot-h':>10}")
    rows = []
    for r in results:
        st = r.get("steady", {})
        if r.get("error"):
            add(f"  {r['label']:<{w}}failed: {r['error']}")
            continue
        alloc_s = ", ".join(f"{k} {v}" for k, v in (r.get("steady_alloc") or {}).items())
        add(f"  {r['label']:<{w}}{_f(r.get('jobs_per_slot_hour'), '{:.2f}'):>10}"
            f"{_f(st.get('held_gpu_slots'), '{:.1f}'):>6}{_f(st.get('p50_s')):>7}{_f(st.get('p95_s')):>7}"
            f"{_f(st.get('gpu_slot_s'), '{:.1f}'):>8}{_f(st.get('cpu_slot_s'), '{:.1f}'):>7}"
            f"{_f(r.get('model_memory_gb'), '{:.1f}'):>8}{st.get('jobs', 0):>6}"
            f"{_f(r.get('capacity_jobs_per_slot_hour'), '{:.2f}'):>10}  {alloc_s}"
            + (f"  ({st['unfinished']} unfinished)" if st.get("unfinished") else ""))
        rows.append({"scenario": "steady", "config": r["config"], "label": r["label"], "sp_degree": r["sp_degree"],
                     "jobs_per_slot_hour": r.get("jobs_per_slot_hour"), "p50_s": st.get("p50_s"),
                     "p95_s": st.get("p95_s"), "slot_seconds_per_job": st.get("gpu_slot_s"),
                     "cpu_slot_seconds_per_job": st.get("cpu_slot_s"), "model_memory_gb": r.get("model_memory_gb"),
                     "settle_periods": None, "reversals": None, "held_gpu_slots": st.get("held_gpu_slots"),
                     "capacity_jobs_per_slot_hour": r.get("capacity_jobs_per_slot_hour"), "jobs": st.get("jobs"),
                     "unfinished": st.get("unfinished")})
    if skipped:
        add(f"  managed: not run ({skipped})")
    add("  jobs/held GPU-slot-h: jobs completed per hour (real) per GPU slot held, in the steady trace (a fixed")
    add("  allocation holds the whole pool; the manager holds what it has started). held GPUs: time average.")
    add("  p50/p95: submit -> succeeded, real seconds. GPU s/job, CPU s/job: the job's tasks' run time x the")
    add("  slots their worker holds (monolithic sp=k: k GPUs). model GB: the profile's model memory summed over")
    add("  the running workers (a monolithic pipeline holds every model). capacity/slot-h: jobs per hour per")
    add("  GPU slot of the pool with 2 jobs per slot kept in flight (closed loop).")
    checks = []
    for r in results:
        got = (r.get("steady") or {}).get("gpu_slot_s")
        if got is None:
            continue
        want = (profile.monolithic_gpu_seconds_per_job(r["variant"]) if r["config"] == "monolithic"
                else profile.gpu_seconds_per_job())
        checks.append(f"{r['label']} {got / want - 1:+.1%}")
    if checks:
        add("  harness check, GPU s/job measured vs the profile's mean (sleep overshoot, sampling noise; above")
        add("  +5% the machine was too busy for the latencies to mean much): " + ", ".join(checks))
    starts = [r for r in results if r.get("worker_start_wall_s")]
    if starts:
        add("  worker process start, spawn -> registered, wall seconds (NOT scaled: x"
            f"{1 / scale:,.0f} in real terms): " + ", ".join(f"{r['label']} {r['worker_start_wall_s']:.1f}"
                                                              for r in starts))
    add("")
    step_rows = [r for r in results if "step_after" in r]
    if step_rows:
        add(f"Step: long-video share {args.long_before:.0%} -> {args.long_after:.0%} at the same arrival rate; "
            f"{plan.step_before_s / scale / 3600:.1f} h before, {plan.step_after_s / scale / 3600:.1f} h after (real)")
        add(f"  {'config':<{w}}{'p95 before':>11}{'p95 after':>10}{'jobs/held':>11}{'held':>6}{'jobs':>6}"
            f"{'settle':>8}{'reversals':>10}  allocation at the end of the trace")
        add(f"  {'':<{w}}{'s':>11}{'s':>10}{'GPU-slot-h':>11}{'GPUs':>6}{'after':>6}{'periods':>8}")
        for r in step_rows:
            m = r.get("manager") or {}
            b, a = r["step_before"], r["step_after"]
            add(f"  {r['label']:<{w}}{_f(b['p95_s']):>11}{_f(a['p95_s']):>10}"
                f"{_f(a.get('jobs_per_held_slot_hour'), '{:.2f}'):>11}{_f(a.get('held_gpu_slots'), '{:.1f}'):>6}"
                f"{a['jobs']:>6}{_f(m.get('settle_periods'), '{}'):>8}{_f(m.get('reversals'), '{}'):>10}  "
                + ", ".join(f"{k} {v}" for k, v in (r.get("step_alloc") or {}).items())
                + (f"  ({a['unfinished']} unfinished)" if a.get("unfinished") else ""))
            rows.append({"scenario": "step", "config": r["config"], "label": r["label"], "sp_degree": None,
                         "jobs_per_slot_hour": a.get("jobs_per_held_slot_hour"), "p50_s": a["p50_s"],
                         "p95_s": a["p95_s"], "slot_seconds_per_job": a["gpu_slot_s"],
                         "cpu_slot_seconds_per_job": a["cpu_slot_s"], "model_memory_gb": None,
                         "settle_periods": m.get("settle_periods"), "reversals": m.get("reversals"),
                         "held_gpu_slots": a.get("held_gpu_slots"), "p95_before_s": b["p95_s"],
                         "jobs": a["jobs"], "unfinished": a.get("unfinished")})
        add("  settle: control periods from the step to the manager's last change before the trace ended;")
        add("  reversals: changes of direction per stage in that time.")
        add("")
    # targets
    add("Targets")
    by = {r["label"]: r for r in results if not r.get("error")}
    targets: dict = {}
    managed, static = by.get("managed"), by.get("static")

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    def line(name, ok, text):
        targets[name] = ok
        add(f"  {name:<50}{verdict(ok):<6}{text}")

    for r in results:
        if r["config"] != "monolithic" or r.get("error"):
            continue
        if managed is None:
            add(f"  managed >= 2x {r['label']}: not run")
            continue
        ratio = (managed["jobs_per_slot_hour"] or 0) / (r["jobs_per_slot_hour"] or float("nan"))
        cap = (managed.get("capacity_jobs_per_slot_hour") or 0) / (r.get("capacity_jobs_per_slot_hour")
                                                                    or float("nan"))
        mp, rp = managed["steady"].get("p95_s"), r["steady"].get("p95_s")
        ok = ratio >= TARGET_RATIO and mp is not None and rp is not None and mp <= rp
        line(f"managed >= 2x {r['label']}, p95 <=", ok,
             f"{ratio:.2f}x jobs/held GPU-slot-h (capacity {cap:.2f}x); p95 {_f(mp)} vs {_f(rp)} s")
    if managed and static:
        held = managed["jobs_per_slot_hour"] / static["jobs_per_slot_hour"] - 1
        line("managed within 10% of static: jobs/held slot-h", held >= -TARGET_STATIC_GAP,
             f"{managed['jobs_per_slot_hour']:.2f} vs {static['jobs_per_slot_hour']:.2f} ({held:+.1%})")
        p95 = managed["steady"]["p95_s"] / static["steady"]["p95_s"] - 1
        line("managed within 10% of static: p95", p95 <= TARGET_STATIC_GAP,
             f"{_f(managed['steady']['p95_s'])} vs {_f(static['steady']['p95_s'])} s ({p95:+.1%})")
        cap = managed["capacity_jobs_per_slot_hour"] / static["capacity_jobs_per_slot_hour"] - 1
        line("managed within 10% of static: capacity", cap >= -TARGET_STATIC_GAP,
             f"{managed['capacity_jobs_per_slot_hour']:.2f} vs {static['capacity_jobs_per_slot_hour']:.2f} "
             f"jobs/slot-h ({cap:+.1%})")
        if "step_after" in managed and "step_after" in static:
            mp, sp_ = managed["step_after"]["p95_s"], static["step_after"]["p95_s"]
            line("managed better than static after the step (p95)",
                 mp is not None and sp_ is not None and mp < (1 - TARGET_BETTER_MARGIN) * sp_,
                 f"{_f(mp)} vs {_f(sp_)} s (better = >5% lower); jobs/held GPU-slot-h "
                 f"{_f(managed['step_after'].get('jobs_per_held_slot_hour'), '{:.2f}')} vs "
                 f"{_f(static['step_after'].get('jobs_per_held_slot_hour'), '{:.2f}')}")
            m = managed.get("manager") or {}
            ok = m.get("settle_periods") is not None and m["settle_periods"] <= TARGET_SETTLE_PERIODS \
                and m.get("reversals", 99) <= TARGET_REVERSALS
            line("settles in <= 3 periods, <= 1 reversal", ok,
                 f"{m.get('settle_periods')} period(s), {m.get('reversals')} reversal(s), "
                 f"{m.get('changes_after_step')} change(s) after the step"
                 + ("" if m.get("parsed", True) else " (decisions() not understood: see the JSON)"))
    add("")
    add(f"/dev/shm names left by our workers: {leftover} (removed)" if leftover else
        "/dev/shm names left by our workers: none")
    return lines, rows, targets


async def amain(args, profile, plan: Plan, configs: list[Config], traces: dict, tmp: Path, pids: list[int]):
    results = []
    for cfg in configs:
        try:
            results.append(await run_config(args, profile, cfg, plan, traces, tmp, pids))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next configuration
            log(f"[{cfg.label}] failed: {type(exc).__name__}: {exc}")
            logging.getLogger("bench").debug("failure", exc_info=True)
            results.append({"config": cfg.name, "label": cfg.label, "error": f"{type(exc).__name__}: {exc}",
                            "sp_degree": cfg.sp if cfg.name == "monolithic" else None, "steady": {}})
    return results


QUICK = dict(time_scale=0.0025, warmup_s=3.0, capacity_s=4.0, latency_s=8.0, step_before_s=4.0,
             step_after_s=8.0, period=0.25)
FULL = dict(time_scale=0.01, warmup_s=15.0, capacity_s=20.0, latency_s=60.0, step_before_s=30.0,
            step_after_s=60.0, period=1.0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    if argv[:2] and argv[0] == "--forkserver":
        return forkserver_main(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run (time scale 0.0025), under three minutes here")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--profile", default="wan_i2v_480p", help="profile name or path (default wan_i2v_480p)")
    parser.add_argument("--time-scale", type=float, help="multiply every profile time by this (quick 0.0025, full 0.01)")
    parser.add_argument("--bytes-scale", type=float, help="multiply tensor sizes by this (default: the time scale)")
    parser.add_argument("--gpu-slots", type=int, default=16, help="GPU slots in the pool (default 16)")
    parser.add_argument("--cpu-slots", type=int, default=2, help="CPU slots for OnePiece's CPU stages (default 2)")
    parser.add_argument("--load", type=float, default=0.75,
                        help="arrival rate as a fraction of the smallest predicted capacity (default 0.75)")
    parser.add_argument("--long-before", type=float, default=0.2, help="long-video share before the step")
    parser.add_argument("--long-after", type=float, default=0.4, help="long-video share after the step")
    parser.add_argument("--period", type=float, help="manager control period, scaled seconds (quick 0.25, full 1)")
    parser.add_argument("--capacity-seconds", type=float)
    parser.add_argument("--latency-seconds", type=float)
    parser.add_argument("--transport", default="shm", choices=("shm", "tcp"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-managed", action="store_true", help="skip the managed configuration")
    parser.add_argument("--only", help="comma-separated config labels to run (e.g. 'static,managed')")
    args = parser.parse_args(argv)
    base = dict(QUICK if args.quick else FULL)
    args.time_scale = args.time_scale or base["time_scale"]
    args.period = args.period or base["period"]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    from manager.profile import load_profile

    profile = load_profile(args.profile)
    scale = args.time_scale
    mono_job = profile.pipeline_mean_s(1) * scale  # scaled seconds
    plan = Plan(time_scale=scale, warmup_s=base["warmup_s"], capacity_s=args.capacity_seconds or base["capacity_s"],
                ramp_s=max(1.0, 2.0 * mono_job), latency_s=args.latency_seconds or base["latency_s"],
                step_before_s=base["step_before_s"], step_after_s=base["step_after_s"],
                drain_s=max(10.0, 12.0 * mono_job), mono_job_s=mono_job)
    skipped = None if args.no_managed else managed_available()
    if skipped:
        args.no_managed = True
    configs, alloc = build_configs(args, profile)
    # One arrival rate for every configuration: --load x the smallest capacity the profile predicts
    # among them (jobs/s, real), so that every one of them is busy but stable.
    caps = {c.label: predicted_capacity(profile, c) for c in configs}
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        configs = [c for c in configs if c.label in keep or c.name in keep]
    basis = min(caps, key=caps.get)
    rate_real = args.load * caps[basis]
    rate = rate_real / scale  # scaled jobs/s
    traces = {
        "warmup": poisson_trace(rate, 10 * base["warmup_s"], args.seed + 100, lambda t: 0.0,
                                ramp_s=base["warmup_s"]),
        "steady": poisson_trace(rate, plan.latency_s, args.seed, lambda t: 0.0),
        "step": poisson_trace(rate, plan.step_before_s + plan.step_after_s, args.seed + 1,
                              lambda t: args.long_before if t < plan.step_before_s else args.long_after),
    }
    rates = {"capacity_real_per_h": {k: v * 3600 for k, v in caps.items()}, "basis": basis,
             "rate_real_per_h": rate_real * 3600, "loadavg": os.getloadavg()}
    log(f"profile {profile.name}: time scale {scale:g}, {len(traces['steady'])} steady jobs, "
        f"{len(traces['step'])} step jobs; configs: {', '.join(c.label for c in configs)}")

    def on_term(signum, frame):  # `kill` stops the bench like Ctrl-C: the finally below cleans up
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="onepiece-elastic-"))
    pids: list[int] = []
    started = time.monotonic()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    results = []
    try:
        results = runner(amain(args, profile, plan, configs, traces, tmp, pids))
    except KeyboardInterrupt:
        log("interrupted: stopping every process started here")
        return 130
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        leftover = sweep_segments(pids)
        shutil.rmtree(tmp, ignore_errors=True)
    lines, rows, targets = report(args, profile, plan, results, alloc, rates, skipped, leftover)
    print("\n".join(lines), flush=True)
    log(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        out = {"results": rows, "targets": targets, "profile": profile.name, "time_scale": scale,
               "gpu_slots": args.gpu_slots, "cpu_slots": args.cpu_slots, "static_allocation": alloc,
               "rates": rates, "quick": args.quick, "managed_skipped": skipped, "raw": results,
               "shm_names_left": leftover}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
