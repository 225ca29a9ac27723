#!/usr/bin/env python
"""Control-plane capacity: how fast the broker moves zero-cost tasks, and what each hop adds.

    python bench/control_plane.py [--quick] [--json PATH] [--transport shm|tcp]
                                  [--workers N] [--capacity K] [--window W] [--no-relay]

Everything is real: a :class:`broker.service.Broker` runs in this process
(temporary ``data_dir``, SQLite job store, ZeroMQ ROUTER on a free loopback
port), stage workers are separate processes started by
:class:`manager.launcher.LocalLauncher` (``python -m onepiece.cli worker``),
tensors move worker to worker over the chosen transport, and jobs come from a
client in a third process that sends ``SUBMIT`` over its own DEALER and reads
``SUBMITTED``, exactly like a batch submitter would. The workflow is
``bench/workflows/zero3.toml``: a chain a -> b -> c of ``synthetic`` stages
with zero service time and 16-byte outputs, so nothing but the broker, the
worker runtime and the hand-offs is measured.

Phases, on one stack:

1. *warm-up*: jobs with a bounded window in flight (connections open,
   caches warm), then drained;
2. *throughput*: for ``--seconds`` per round, the client keeps ``--window``
   jobs in flight (a new SUBMIT for each job that ends, so the broker is
   never idle and its queue never grows without bound). The broker process
   counts the ``stage_finished`` events (completed stage tasks, 3 per job)
   and the terminal ``succeeded`` events (jobs done) after a short ramp;
   tasks/s = stage tasks / seconds. Several rounds give the median;
3. *hop latency*: Poisson arrivals at ``--load`` (default 0.5) times the
   measured jobs/s, then drained, and every measured job's per-stage
   timestamps read back with ``Broker.job(id)``.

Then, once that stack has stopped (the two never share the cores), the same
phases on a *bare relay*, the limit of a Python ZeroMQ broker on this
machine (``--no-relay`` skips it): a ROUTER in its own process, on uvloop,
msgpack, its sends joined per peer and loop turn after at most 256 messages
read, as broker/control.py does. It moves the messages a zero3 job sends
through the broker, 15 per job: SUBMIT and SUBMITTED, a TASK per stage, a
STARTED and a DONE from each, a SEND to a's and b's worker when the next
stage's TASK leaves, and a RELEASE of their outputs once that stage is DONE.
It keeps no store, job table or schedule and checks no message against the
protocol's schema; what it needs later travels in the messages (TASK says
when the stage could run and STARTED says it back; DONE carries the job's
parameters for the next TASK). One fake worker process per stage answers
each TASK with STARTED and DONE in one frame and drops SEND and RELEASE: no
data plane. The same client keeps ``--window`` jobs in flight for the same
warm-up and rounds; Poisson arrivals at the same fraction of the relay's own
jobs/s then give its hop, from when a stage could run until the relay hears
its STARTED (the TASK out and the STARTED back: no tensor, no worker runtime).

Targets: >= 5,000 tasks/s; hop p99 < 5 ms at 50% load; the broker's tasks/s
>= 0.5x the relay's. The broker's hop p99 over the relay's is printed for
information only: the relay's hop holds no data plane and no worker runtime,
and is taken at half the relay's much higher rate, so the ratio tells where
time goes, not what the broker should reach. The table also gives the CPU
per job of the process holding the ROUTER in both stacks (the broker's
includes this harness).

Hop latency, the definition printed with the table: the time from the moment
a stage *could* run (for ``a`` the client's send of the job, for ``b`` and
``c`` the broker's receipt of the upstream's DONE) until the broker hears
that it has started (its STARTED). That covers the broker's routing, the
TASK and SEND messages, the 16-byte tensor crossing the data plane, the
worker's start and the STARTED message back; stages cost nothing, so no
compute is in it. Each job gives three samples; p50/p99 are over all of
them (and per hop). As a cross-check the table also shows
(end-to-end - sum of the workers' ``run_s``) / 3 per job, where end-to-end
runs from the client's send to the broker's ``succeeded`` and so also holds
c's DONE trip back; all timestamps are ``time.time()`` of one host.

Defaults: one worker per stage with ``--capacity 32`` task slots, and a
window of 128 jobs. On 2 cores more worker processes only add wake-ups
(``--workers 2`` measured ~10% more CPU per job and no more throughput);
more slots per worker let the broker pipeline tasks to a worker instead of
waiting a round trip per task (capacity 1: ~1,200 tasks/s, 8: ~2,200,
32: ~2,500 on this machine, measured before control messages were batched
per peer and loop turn; with batching, capacity 32 gave ~9,000, and ~12,000
since the job store writes one event row per job and commit, time-ordered
job ids and msgpack columns, on 2026-11-22).

One ``--quick`` run on 2026-11-28, with another benchmark sharing the two
cores (load average 1.78 at start, 2.63 at end), printed these lines among
others (broker round, relay round, targets)::

      1          7,167   2,384       32,269   10,732       0        0.49  2.12  broker (+bench) 50, client 4, worker a 17, worker b 26, worker c 18
      1         74,017  24,672      333,120       0.046  relay 53, client 10, worker a 17, worker b 20, worker c 14
      CPU per job of the process with the ROUTER: broker (+bench) 208 us, relay 21 us (9.8x)
      hop at 50% load (Poisson, 12,336 jobs/s, 6 s): p50 0.803 ms, p99 3.927 ms, max 13.02 ms, 202,558 samples
      throughput >= 5,000 tasks/s             PASS  7,167 tasks/s
      hop p99 < 5 ms at 50% load              FAIL  6.629 ms (p50 1.497 ms)
      throughput >= 0.5x the bare relay       FAIL  0.10x (7,167 / 74,017 tasks/s)
      hop p99 / the bare relay (information)        1.7x (6.629 / 3.927 ms)

The relay's process used about half a core in its round, so its own CPU did
not bound it there (round trips between its five processes and the other
work on the two cores did): the CPU per job of the two ROUTER processes is
the steadier comparison.

Where the time goes: each round prints the share of a core each process
used, the CPU milliseconds all our processes spent per job (a number that
other users' load disturbs much less than tasks/s, and the ceiling it
implies for this machine), and how long their threads were runnable but
waiting for a CPU. ``--profile DIR`` runs cProfile on the broker process
during the throughput rounds (DIR/broker.prof) and the latency phase
(DIR/broker-latency.prof), with a summary of each on stderr.

The run also watches for stalls: the broker's event loop running late by
more than 0.5 s (a thread prints the main thread's stack past 3 s), and
zero-cost jobs in flight that make no progress for a second, in which case
it says whether messages were waiting unread on the broker's socket. Such
disturbances are listed under the targets. A run whose jobs do not end
(``--quick``: within 15 s of a phase) stops with exit status 1; missed
targets alone exit 0.

Every process started here is stopped at the end, also on errors and
Ctrl-C, and any /dev/shm name of our workers is removed (the table says how
many there were: normally none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKFLOW = ROOT / "bench" / "workflows" / "zero3.toml"
STAGES = ("a", "b", "c")
SHM_DIR = "/dev/shm"
TARGET_TASKS_PER_S = 5000.0
TARGET_HOP_P99_MS = 5.0
TARGET_RATIO_TO_RELAY = 0.5  # the broker's tasks/s over the bare relay's, same run

# The control messages a zero3 job sends through the broker's ROUTER, named as broker/protocol.py
# declares them (its SCHEMA keys; it has no constants of its own).
REGISTER, REGISTERED, SUBMIT, SUBMITTED = "REGISTER", "REGISTERED", "SUBMIT", "SUBMITTED"
TASK, SEND, STARTED, DONE, RELEASE = "TASK", "SEND", "STARTED", "DONE", "RELEASE"
RELAY_KINDS = (REGISTER, REGISTERED, SUBMIT, SUBMITTED, TASK, SEND, STARTED, DONE, RELEASE)
READ_BATCH = 256  # messages read before the queued sends leave: broker/control.py's default batch


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    seconds: float  # one throughput round
    rounds: int
    ramp_s: float  # not counted at the start of a round / latency phase
    latency_s: float
    drain_s: float  # how long jobs may take to end after a phase before the run is called stuck
    load: float  # fraction of the measured max for the latency phase


QUICK = dict(warmup_s=1.5, seconds=5.0, rounds=1, ramp_s=0.5, latency_s=6.0, drain_s=15.0)
FULL = dict(warmup_s=3.0, seconds=10.0, rounds=3, ramp_s=1.0, latency_s=20.0, drain_s=60.0)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the client process ----------------------------------------------------------------

def _client_main(endpoint: str, credit_ep: str, workflow: str, conn) -> None:
    """Submit jobs over ZeroMQ on command from the parent (a Pipe), until told to stop.

    Commands: ("window", W, seconds): keep W jobs in flight; ("rate", jobs_per_s, seconds, seed):
    Poisson arrivals; ("stop",). The parent publishes the cumulative count of ended jobs on
    ``credit_ep``; jobs in flight = jobs submitted - jobs ended.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    import zmq

    from broker import protocol

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    dealer.setsockopt(zmq.ROUTING_ID, f"bench-client-{os.getpid()}".encode())
    dealer.connect(endpoint)
    credits = ctx.socket(zmq.PULL)
    credits.setsockopt(zmq.LINGER, 0)
    credits.connect(credit_ep)
    poller = zmq.Poller()
    poller.register(dealer, zmq.POLLIN)
    poller.register(credits, zmq.POLLIN)
    state = {"submitted": 0, "replies": 0, "errors": 0, "error": None, "ended": 0}

    def drain() -> None:
        while True:
            try:
                raw = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            replies, refused = protocol.unpack_frame(raw)
            state["replies"] += len(replies) + len(refused)
            for m in replies:
                if m["k"] != SUBMITTED:
                    state["errors"] += 1
                    state["error"] = m.get("reason")
            if refused:
                state["errors"] += len(refused)
                state["error"] = refused[0]
        while True:
            try:
                state["ended"] = max(state["ended"], int(credits.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break

    def submit(count: int = 1) -> None:
        """Send ``count`` jobs, joined in one frame as a batch submitter would."""
        n = state["submitted"]
        now = time.time()
        bodies = [protocol.pack(SUBMIT, workflow=workflow, params={"n": n + i, "t": now}) for i in range(count)]
        for frame in protocol.frames(bodies):
            dealer.send(frame)
        state["submitted"] = n + count

    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            drain()
            first = state["submitted"]
            t0 = time.time()
            lateness: list[float] = []
            if cmd[0] == "window":
                _, window, seconds = cmd
                t_end = t0 + seconds
                while True:
                    now = time.time()
                    if now >= t_end:
                        break
                    room = window - (state["submitted"] - state["ended"])
                    if room > 0:
                        submit(room)
                    poller.poll(max(1, int((t_end - now) * 1000)))
                    drain()
            else:
                _, rate, seconds, seed = cmd
                rng = random.Random(seed)
                t_end = t0 + seconds
                due = t0 + rng.expovariate(rate)
                while due < t_end:
                    now = time.time()
                    if now < due:
                        if due - now > 0.002:  # wait on the sockets; poll() has 1 ms resolution
                            poller.poll(int((due - now) * 1000) - 1)
                            drain()
                        else:
                            time.sleep(due - now)  # no busy wait: the client must not steal a core
                        continue
                    lateness.append(now - due)
                    submit()
                    due += rng.expovariate(rate)
                    drain()
            t1 = time.time()
            deadline = time.monotonic() + 30.0
            while state["replies"] < state["submitted"] and time.monotonic() < deadline:
                poller.poll(100)
                drain()
            lateness.sort()
            conn.send({"t0": t0, "t1": t1, "first": first, "submitted": state["submitted"] - first,
                       "total_submitted": state["submitted"], "errors": state["errors"], "error": state["error"],
                       "missing_replies": state["submitted"] - state["replies"],
                       "late_p99_ms": 1e3 * lateness[int(0.99 * (len(lateness) - 1))] if lateness else 0.0,
                       "late_max_ms": 1e3 * lateness[-1] if lateness else 0.0})
    finally:
        dealer.close(0)
        credits.close(0)
        ctx.term()


class Client:
    """The client process (:func:`_client_main`) submitting to ``endpoint``, driven over a pipe."""

    def __init__(self, endpoint: str, credit_ep: str):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_client_main, name="cp-client",
                                   args=(endpoint, credit_ep, WORKFLOW.stem, child), daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    async def command(self, *cmd) -> dict:
        """Run one phase (see :func:`_client_main`); its summary, or RuntimeError if none comes in
        the phase's seconds plus a minute (the client waits at most 30 s for replies)."""
        self.conn.send(cmd)
        bound = cmd[2] + 60.0
        if not await asyncio.to_thread(self.conn.poll, bound):
            raise RuntimeError(f"the client did not finish a {cmd[2]:.0f} s phase within {bound:.0f} s")
        return self.conn.recv()

    async def stop(self) -> None:
        await stop_process(self.process, self.conn)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()


class Credits:
    """The cumulative count of ended jobs, published on ``sock`` to the client, which keeps its window.

    Sent every ``batch`` ended jobs or 1 ms after the first unsent one, whichever comes first: one
    small message per batch, so the bookkeeping costs the stack little. Only the window phases need
    it: paused (the Poisson phase, whose client does not wait on ends) nothing is sent, so the
    harness adds no messages, wake-ups or context switches to the stack it measures.
    """

    def __init__(self, sock, batch: int):
        self.sock, self.batch = sock, batch
        self.count = 0
        self._on = True
        self._unsent = 0
        self._timer = None

    def ended(self) -> None:
        self.count += 1
        if not self._on:
            return
        self._unsent += 1
        if self._unsent >= self.batch:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(0.001, self.flush)

    def pause(self) -> None:
        self._on = False

    def resume(self) -> None:
        self._on = True
        self.flush()

    def flush(self) -> None:
        import zmq

        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unsent = 0
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send(str(self.count).encode(), zmq.NOBLOCK)


# -- the bare relay: the limit of a Python ZeroMQ broker ----------------------------------------

# What the fake workers say of themselves, of the sizes the real ones send: an shm endpoint's
# descriptor; the broker's MACs are 32 hex digits, its data keys 64.
FAKE_DESCRIPTOR = {"transport": "shm", "host": "127.0.0.1", "port": 40000, "shm_ns": "4026531841",
                   "ring_bytes": 64 << 20}
FAKE_MAC = "0" * 32


def _relay_main(control: str, credit_ep: str, credit_batch: int, conn) -> None:
    """The bare relay: a ROUTER on ``control`` that moves a zero3 job's control messages as the
    broker does and keeps nothing, until told to stop over ``conn`` (a Pipe).

    Per job, in: SUBMIT, and STARTED and DONE from each stage's worker; out: SUBMITTED, a TASK
    per stage, a SEND to each producer when its consumer's TASK leaves, a RELEASE of each
    producer's outputs when its consumer is DONE. Sends leave once per loop turn, joined per
    peer (``protocol.frames``), after at most ``READ_BATCH`` messages read, as the broker's
    socket does (broker/control.py). It has no store, no job table, no scheduling, and checks
    no message against the protocol's schema: what it needs later travels in the messages.
    Its TASK says when the stage could run (``ready``: the client's send for the first stage,
    the upstream's DONE for the others) and the fake worker's STARTED says it back, which gives
    the hop; the fake DONE carries the job's parameters for the next TASK. Its only state is
    which worker serves which stage, learnt from REGISTER.

    Over ``conn`` it sends its endpoint, then "ready" once every stage has a worker; then it
    answers each command: ("ended",) with the count of jobs ended so far; ("credits", on) with
    None, the client's credits paused or resumed (:class:`Credits`); ("hops", since) with None,
    and from then on it records the hop of each STARTED whose stage was ready at or after
    ``since``; ("take", lo, hi) with the stage tasks and jobs ended in [lo, hi) and the
    (stage, seconds) of the hops recorded, since the last take; then it forgets them and
    records no more hops.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    run_loop(_relay(control, credit_ep, credit_batch, conn))


async def _relay(control: str, credit_ep: str, credit_batch: int, conn) -> None:
    import msgpack
    import zmq

    from broker import protocol
    from stages.workflow import load_workflow

    wf = load_workflow(WORKFLOW)
    outputs = {name: list(spec.outputs) for name, spec in wf.stages.items()}
    downstream = dict(zip(STAGES, STAGES[1:]))  # the chain a -> b -> c
    upstream = {b: a for a, b in downstream.items()}
    pack, unpackb, frames = protocol.pack, msgpack.unpackb, protocol.frames
    noblock, sndmore = zmq.NOBLOCK, zmq.SNDMORE

    loop = asyncio.get_running_loop()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 100_000), (zmq.SNDHWM, 100_000)):  # the broker's
        router.setsockopt(option, value)
    router.bind(control)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 1000)
    push.bind(credit_ep)
    credits = Credits(push, credit_batch)
    workers: dict[str, tuple[bytes, dict]] = {}  # stage -> (routing id, descriptor)
    out: dict[bytes, list[bytes]] = {}  # peer -> messages queued in this loop turn
    done_at: list[float] = []
    ended_at: list[float] = []
    hops: list[tuple[str, float]] = []  # (stage, seconds from ready until its STARTED came)
    hops_since = float("inf")
    ids = itertools.count()

    def queue(peer: bytes, body: bytes) -> None:
        out.setdefault(peer, []).append(body)

    def task(job: str, stage: str, params: dict, ready: float) -> None:
        up = upstream.get(stage)
        queue(workers[stage][0], pack(TASK, job=job, workflow=wf.name, stage=stage, attempt=1, binding=params["n"],
                                      params=params, inputs=[{"stage": up, "names": outputs[up]}] if up else [],
                                      ready=ready))

    def route(peer: bytes, m: dict) -> None:
        kind = m["k"]
        if kind == STARTED:
            if m["ready"] >= hops_since:
                hops.append((m["stage"], time.time() - m["ready"]))
        elif kind == DONE:
            now = time.time()
            done_at.append(now)
            job, stage, params = m["job"], m["stage"], m["params"]
            down = downstream.get(stage)
            if down is None:
                ended_at.append(now)
                credits.ended()
            else:
                task(job, down, params, now)
                to, descriptor = workers[down]
                queue(peer, pack(SEND, job=job, stage=stage, to=to.decode(), to_stage=down, descriptor=descriptor,
                                 names=outputs[stage], binding=params["n"], auth=FAKE_MAC, link=FAKE_MAC))
            up = upstream.get(stage)
            if up is not None:  # its only consumer is done with its outputs
                queue(workers[up][0], pack(RELEASE, job=job, stage=up))
        elif kind == SUBMIT:
            job = f"{next(ids):032x}"
            queue(peer, pack(SUBMITTED, job=job))
            task(job, STAGES[0], m["params"], m["params"]["t"])
        elif kind == REGISTER:
            workers[m["stage"]] = (peer, m["descriptor"])
            queue(peer, pack(REGISTERED, heartbeat_s=2.5, liveness=3, data_key=2 * FAKE_MAC))
            if len(workers) == len(STAGES):
                conn.send("ready")

    def readable() -> None:
        budget = READ_BATCH
        while budget > 0:
            try:
                peer, *parts = router.recv_multipart(noblock)
            except zmq.Again:
                break
            for part in parts:
                body = unpackb(part)
                for m in body if type(body) is list else (body,):
                    route(peer, m)
                    budget -= 1
        for peer, bodies in out.items():
            for frame in frames(bodies):
                router.send(peer, sndmore | noblock)
                router.send(frame, noblock)
        out.clear()
        # more to read, or a send consumed the edge that announced it (broker/control.py): come back
        if budget <= 0 or router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            loop.call_soon(readable)

    stopped = loop.create_future()

    def command() -> None:
        nonlocal hops_since
        try:
            cmd = conn.recv()
        except EOFError:  # the parent is gone
            cmd = ("stop",)
        if cmd[0] == "take":
            _, lo, hi = cmd
            conn.send({"stage_tasks": sum(1 for t in done_at if lo <= t < hi),
                       "jobs": sum(1 for t in ended_at if lo <= t < hi), "hops": hops[:]})
            done_at.clear()
            ended_at.clear()
            hops.clear()
            hops_since = float("inf")
        elif cmd[0] == "hops":
            hops_since = cmd[1]
            conn.send(None)
        elif cmd[0] == "ended":
            conn.send(credits.count)
        elif cmd[0] == "credits":
            if cmd[1]:
                credits.resume()
            else:
                credits.pause()
            conn.send(None)
        elif not stopped.done():
            stopped.set_result(None)

    fd = router.getsockopt(zmq.FD)
    loop.add_reader(fd, readable)
    loop.add_reader(conn.fileno(), command)
    os.set_blocking(conn.fileno(), True)  # add_reader made it non-blocking: a large reply must wait for room
    loop.call_soon(readable)  # messages may have come before the reader was there
    conn.send(router.getsockopt(zmq.LAST_ENDPOINT).decode())
    try:
        await stopped
    finally:
        loop.remove_reader(conn.fileno())
        loop.remove_reader(fd)
        router.close(0)
        push.close(0)
        ctx.term()


def _fake_worker_main(endpoint: str, stage: str, capacity: int) -> None:
    """A worker of ``stage`` with nothing behind it, for the bare relay.

    It registers, then answers each TASK with STARTED and DONE in one frame, as a real worker
    does for an inline stage (stages/worker.py), reading at most ``READ_BATCH`` messages before
    its replies leave; SEND and RELEASE it reads and drops: no data plane. Stopped by SIGTERM;
    it leaves by itself within a second of its parent's end.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    import msgpack
    import zmq

    from broker import protocol

    parent = os.getppid()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, f"relay-worker-{stage}-{os.getpid()}".encode())
    dealer.connect(endpoint)
    dealer.send(protocol.pack(REGISTER, stage=stage, capacity=capacity, descriptor=FAKE_DESCRIPTOR))
    pack, unpackb = protocol.pack, msgpack.unpackb
    timings = {"wait_s": 0.0, "run_s": 0.0, "out_bytes": 16}  # what a synthetic stage's DONE holds
    try:
        while os.getppid() == parent:
            if not dealer.poll(1000):
                continue
            replies: list[bytes] = []
            budget = READ_BATCH
            while budget > 0:
                try:
                    body = unpackb(dealer.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                for m in body if type(body) is list else (body,):
                    budget -= 1
                    if m["k"] == TASK:
                        replies.append(pack(STARTED, job=m["job"], stage=stage, ready=m["ready"]))
                        replies.append(pack(DONE, job=m["job"], stage=stage, timings=timings, params=m["params"]))
            for frame in protocol.frames(replies):
                dealer.send(frame)
    finally:
        dealer.close(0)
        ctx.term()


# -- the broker, observed ----------------------------------------------------------------

def make_broker(settings, credits: Credits):
    """A real Broker whose job events are also recorded here (stage completions, terminal events),
    each ended job counted in ``credits``. Nothing else of the broker is changed."""
    from broker.core import TERMINAL
    from broker.service import Broker

    class BenchBroker(Broker):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.stage_done: list[float] = []
            self.ended: list[tuple[float, str, str]] = []  # (time, job id, terminal type)

        @property
        def progress(self) -> int:
            return len(self.stage_done) + len(self.ended)

        @property
        def busy(self) -> bool:
            return bool(self.core.active_jobs())

        def _on_event(self, e) -> None:
            super()._on_event(e)
            if e.type == "stage_finished":
                self.stage_done.append(time.time())
            elif e.type in TERMINAL:
                self.ended.append((time.time(), e.job_id, e.type))
                credits.ended()

    return BenchBroker(settings)


# -- helpers -------------------------------------------------------------------------------

class LoopWatch:
    """How late the broker's event loop runs (a stalled broker makes workers reconnect).

    A coroutine ticks every 50 ms and records how late it woke; a thread prints the main
    thread's stack when the loop has not ticked for ``dump_after`` seconds, to show where it hangs.
    """

    def __init__(self, dump_after: float = 3.0):
        self.broker = None  # when set, also watch for jobs that stop progressing
        self.deaf: list[tuple[float, float, bool]] = []  # (time, seconds without progress, messages queued)
        self._progress, self._progress_at, self._reported = -1, time.monotonic(), None
        self.max_lag = 0.0
        self.phase = "start-up"
        self.stalls: list[tuple[float, float, str]] = []  # (time, seconds, phase) of lags over 0.5 s
        self.dump_after = dump_after
        self._last = time.monotonic()
        self._task = None
        self._stop = None
        self._thread = None

    def start(self) -> None:
        import threading

        self._task = asyncio.get_running_loop().create_task(self._tick(), name="bench-loopwatch")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(threading.main_thread().ident,),
                                        name="bench-loopwatch", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.max_lag = 0.0

    async def _tick(self) -> None:
        try:
            await self._ticking()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a diagnostic must not end the run; say it stopped
            log(f"(loop watch stopped: {type(exc).__name__}: {exc})")

    async def _ticking(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            self._last = now = time.monotonic()
            lag = now - t - 0.05
            self.max_lag = max(self.max_lag, lag)
            if lag > 0.5:
                self.stalls.append((time.time(), lag, self.phase))
            b = self.broker
            if b is None:
                continue
            if b.progress != self._progress:
                self._progress, self._progress_at = b.progress, now
            elif now - self._progress_at > 1.0 and self._reported != self._progress_at and b.busy:
                # Zero-cost jobs are in flight, yet no stage finished for a second. Is a control
                # message waiting unread? (Reading EVENTS can consume the edge the broker waits
                # for, so ``waiting()`` also schedules a read: this report ends such a stall.)
                self._reported = self._progress_at
                queued = b._ctl.waiting()
                self.deaf.append((time.time(), now - self._progress_at, queued, self.phase))
                log(f"no job progress for {now - self._progress_at:.1f} s with jobs in flight; the broker's "
                    f"ZMQ socket {'HAS messages queued: its receive loop was not woken' if queued else 'has nothing queued'}")

    def _watch(self, main_ident: int) -> None:
        import traceback

        dumped = 0.0
        while not self._stop.wait(0.5):
            silent = time.monotonic() - self._last
            if silent > self.dump_after and self._last != dumped:
                dumped = self._last
                frame = sys._current_frames().get(main_ident)
                stack = "".join(traceback.format_stack(frame)[-12:]) if frame else "?"
                log(f"broker event loop stuck for {silent:.1f} s; main thread is at:\n{stack}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._stop.set()
            self._thread.join(2)
            self._task = None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for role, pid in pids.items():
        with contextlib.suppress(Exception):
            t = psutil.Process(pid).cpu_times()
            out[role] = t.user + t.system
    return out


def run_delay(pids: dict[str, int]) -> dict[str, float]:
    """Seconds each process's threads spent runnable but waiting for a CPU (Linux schedstat)."""
    out = {}
    for role, pid in pids.items():
        total = 0
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            out[role] = total / 1e9
    return out


def cpu_share(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Percent of one core each process used over ``seconds``."""
    return {role: 100.0 * (after[role] - before[role]) / seconds for role in after if role in before}


def our_segments(pids) -> list[str]:
    prefixes = tuple(f"onepiece-{pid}-" for pid in pids)
    with contextlib.suppress(OSError):
        return [n for n in os.listdir(SHM_DIR) if n.startswith(prefixes)]
    return []


def sweep_segments(pids) -> list[str]:
    removed = []
    for name in our_segments(pids):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
    return removed


def kill_pids(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def summary(seconds: list[float]) -> dict:
    """p50, p99, max and mean in milliseconds, and the number of samples."""
    ms = [1e3 * x for x in seconds]
    return {"p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "max": max(ms) if ms else float("nan"),
            "mean": statistics.fmean(ms) if ms else float("nan"), "n": len(ms)}


def run_loop(main):
    """Run a coroutine on uvloop, as the broker and the workers do (asyncio's own loop without it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def stop_process(proc, conn=None) -> None:
    """Ask a child to leave (``("stop",)`` over ``conn``, else SIGTERM); kill it if it has not
    left within 2 s."""
    if conn is not None:
        with contextlib.suppress(Exception):  # heard between phases; mid-phase (interrupted) it is killed
            conn.send(("stop",))
    else:
        proc.terminate()
    await asyncio.to_thread(proc.join, 2)
    if proc.is_alive():
        proc.kill()
        await asyncio.to_thread(proc.join, 5)


def check_replies(r: dict, who: str) -> None:
    """Raise if the client's phase ``r`` had a SUBMIT refused or unanswered by ``who``."""
    if r["errors"] or r["missing_replies"]:
        raise RuntimeError(f"the {who} refused {r['errors']} SUBMITs ({r['error']}); "
                           f"{r['missing_replies']} got no reply")


# -- the benchmark --------------------------------------------------------------------------

class Bench:
    def __init__(self, args, plan: Plan):
        self.args, self.plan = args, plan
        self.tmp = Path(tempfile.mkdtemp(prefix="onepiece-cp-"))
        self.broker = None
        self.launcher = None
        self.client: Client | None = None
        self.credits: Credits | None = None
        self.worker_pids: list[int] = []  # every worker started, for the last-resort cleanup
        self._zctx = None
        self._credit = None
        self.results: dict = {"rounds": []}
        self.watch = LoopWatch()
        self.ready_at = float("inf")

    # -- stack ----------------------------------------------------------------
    async def start(self) -> None:
        import zmq

        from manager.launcher import LocalLauncher
        from onepiece.config import load_settings

        a = self.args
        settings = load_settings(env={}, data_dir=self.tmp / "data", control=a.control, transport=a.transport,
                                 workflows=[str(WORKFLOW)], capacity=a.capacity)
        self._zctx = zmq.Context()
        self._credit = self._zctx.socket(zmq.PUSH)
        self._credit.setsockopt(zmq.LINGER, 0)
        self._credit.setsockopt(zmq.SNDHWM, 1000)
        credit_ep = f"ipc://{self.tmp}/credits.ipc"
        self._credit.bind(credit_ep)
        self.credits = Credits(self._credit, max(1, a.window // 8))
        self.broker = make_broker(settings, self.credits)
        await self.broker.start()
        self.watch.broker = self.broker
        self.watch.start()
        self.settings = settings.replace(control=self.broker.endpoint)
        # Workers log warnings only (INFO would log every registration and drain).
        self.launcher = LocalLauncher(self.settings, env={"ONEPIECE_LOG_LEVEL": "WARNING"})
        for stage in STAGES:
            for _ in range(a.workers):
                h = await self.launcher.start(str(WORKFLOW), stage)
                self.worker_pids.append(h.process.pid)
        want = len(STAGES) * a.workers
        deadline = time.monotonic() + 120
        while sum(len(s["workers"]) for s in self.broker.stages().values()) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(len(s['workers']) for s in self.broker.stages().values())} of "
                                   f"{want} workers registered in 120 s")
            if len(self.launcher.workers()) < want:
                raise RuntimeError("a worker process exited during start-up; see its log above")
            await asyncio.sleep(0.05)
        self.ready_at = time.time()
        self.client = Client(self.broker.endpoint, credit_ep)

    async def stop(self) -> None:
        await self.watch.stop()
        if self.client is not None:
            await self.client.stop()
            self.client = None
        if self.launcher is not None:
            # SIGTERM: a worker leaves once its held outputs are released, at once after a clean run;
            # after an error or Ctrl-C some never will, so they are killed after a few seconds.
            with contextlib.suppress(Exception):
                await self.launcher.aclose(5.0)
            self.launcher = None
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.stop()
            self.broker = None
        if self._credit is not None:
            self._credit.close(0)
            self._zctx.term()
            self._credit = None

    def cleanup_sync(self) -> int:
        """Last resort after stop(): kill what is left, unlink our shm names, remove the temp dir."""
        kill_pids(self.worker_pids)
        if self.client is not None:
            self.client.kill()
        leftover = len(sweep_segments(self.worker_pids))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return leftover

    # -- phases -----------------------------------------------------------------
    async def drain(self, total_submitted: int) -> None:
        timeout = self.plan.drain_s
        deadline = time.monotonic() + timeout
        while len(self.broker.ended) < total_submitted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{total_submitted - len(self.broker.ended)} jobs did not end within "
                                   f"{timeout:.0f} s of the phase{self.disturbances()}")
            await asyncio.sleep(0.01)

    def reregistered(self) -> int:
        """Workers whose current registration is newer than the start (they reconnected)."""
        return sum(1 for s in self.broker.stages().values() for w in s["workers"]
                   if w["registered"] > self.ready_at)

    def disturbances(self) -> str:
        out = []
        if self.watch.stalls:
            out.append("broker event loop ran late (timers, heartbeats and the REST API wait meanwhile) by " + ", ".join(
                f"{lag:.1f} s at {time.strftime('%H:%M:%S', time.localtime(t))} ({phase})"
                for t, lag, phase in self.watch.stalls))
        if self.watch.deaf:
            out.append("no progress with jobs in flight: " + ", ".join(
                f"{quiet:.1f} s at {time.strftime('%H:%M:%S', time.localtime(t))} ({phase}; "
                f"{'the broker had messages queued unread' if queued else 'nothing queued at the broker'})"
                for t, quiet, queued, phase in self.watch.deaf))
        n = self.reregistered()
        if n:
            out.append(f"{n} worker(s) re-registered after start-up")
        return ("; " + "; ".join(out)) if out else ""

    def pids(self) -> dict[str, int]:
        out = {"broker (+bench)": os.getpid(), "client": self.client.pid}
        per = {}
        for h in self.launcher.workers():
            per.setdefault(h.stage, []).append(h.process.pid)
        for stage, pids in per.items():
            for i, pid in enumerate(pids):
                out[f"worker {stage}" + (f"#{i + 1}" if len(pids) > 1 else "")] = pid
        return out

    async def run(self) -> dict:
        p, a = self.plan, self.args
        log(f"warm-up: {p.warmup_s:.1f} s with {a.window} jobs in flight")
        self.watch.phase = "warm-up"
        r = await self.client.command("window", a.window, p.warmup_s)
        check_replies(r, "broker")
        await self.drain(r["total_submitted"])

        profiler = None
        if a.profile:
            import cProfile

            profiler = cProfile.Profile()
        for i in range(p.rounds):
            log(f"throughput round {i + 1} of {p.rounds}: {p.seconds:.1f} s with {a.window} jobs in flight")
            self.watch.phase = f"throughput round {i + 1}"
            pids = self.pids()
            c0, d0, w0 = cpu_seconds(pids), run_delay(pids), time.time()
            self.watch.reset()
            if profiler:
                profiler.enable()
            r = await self.client.command("window", a.window, p.seconds)
            if profiler:
                profiler.disable()
            c1, d1, w1 = cpu_seconds(pids), run_delay(pids), time.time()
            check_replies(r, "broker")
            lo, hi = r["t0"] + p.ramp_s, r["t1"]
            tasks = sum(1 for t in self.broker.stage_done if lo <= t < hi)
            jobs = [e for e in self.broker.ended if lo <= e[0] < hi]
            ok = sum(1 for e in jobs if e[2] == "succeeded")
            # CPU per job over the whole call (every job submitted in it ends in it or in the drain
            # below; the few in flight at its edges are a window's worth out of thousands).
            cpu = cpu_share(c0, c1, w1 - w0)
            cpu_ms_per_job = sum(c1[k] - c0[k] for k in c1 if k in c0) * 1e3 / max(1, r["submitted"])
            rnd = {"seconds": hi - lo, "stage_tasks": tasks, "jobs_succeeded": ok, "jobs_failed": len(jobs) - ok,
                   "tasks_per_s": tasks / (hi - lo), "jobs_per_s": ok / (hi - lo),
                   "cpu_pct": cpu, "cpu_ms_per_job": cpu_ms_per_job, "loadavg": os.getloadavg()[0],
                   "cpu_wait_pct": cpu_share(d0, d1, w1 - w0),
                   "broker_loop_max_lag_ms": 1e3 * self.watch.max_lag}
            self.results["rounds"].append(rnd)
            log(f"  {rnd['tasks_per_s']:,.0f} tasks/s, {rnd['jobs_per_s']:,.0f} jobs/s, "
                f"{cpu_ms_per_job:.2f} CPU ms/job; CPU % of a core: "
                + ", ".join(f"{k} {v:.0f}" for k, v in rnd["cpu_pct"].items()))
            await self.drain(r["total_submitted"])
        if profiler:
            self.dump_profile(profiler, "broker.prof")
            profiler = cProfile.Profile()

        rounds = self.results["rounds"]
        max_jobs = statistics.median(x["jobs_per_s"] for x in rounds)
        rate = a.rate or max(1.0, p.load * max_jobs)
        log(f"hop latency: Poisson arrivals at {rate:,.0f} jobs/s ({rate / max_jobs:.0%} of {max_jobs:,.0f}) "
            f"for {p.latency_s:.1f} s")
        n_before = len(self.broker.ended)
        self.watch.phase = "latency phase"
        pids = self.pids()
        c0, w0 = cpu_seconds(pids), time.time()
        self.watch.reset()
        if profiler:
            profiler.enable()
        self.credits.pause()  # the Poisson client does not wait on ends
        r = await self.client.command("rate", rate, p.latency_s, a.seed)
        self.credits.resume()
        if profiler:
            profiler.disable()
            self.dump_profile(profiler, "broker-latency.prof")
        c1, w1 = cpu_seconds(pids), time.time()
        check_replies(r, "broker")
        await self.drain(r["total_submitted"])
        lat = self.latency(self.broker.ended[n_before:], r["t0"] + p.ramp_s)
        lat.update(rate=rate, load=rate / max_jobs, offered_seconds=p.latency_s, cpu_pct=cpu_share(c0, c1, w1 - w0),
                   broker_loop_max_lag_ms=1e3 * self.watch.max_lag,
                   client_late_p99_ms=r["late_p99_ms"], client_late_max_ms=r["late_max_ms"])
        self.results["latency"] = lat
        self.results["disturbances"] = self.disturbances().removeprefix("; ")
        return self.results

    def latency(self, ended, since: float) -> dict:
        hops = {s: [] for s in STAGES}
        per_job, e2e, runs = [], [], []
        failed = 0
        for _, job_id, kind in ended:
            if kind != "succeeded":
                failed += 1
                continue
            j = self.broker.job(job_id)
            sent = j["params"]["t"]
            if sent < since:
                continue
            st = j["stages"]
            ready = sent
            for s in STAGES:
                hops[s].append(st[s]["started"] - ready)
                ready = st[s]["finished"]
            run = sum(float(st[s]["timings"].get("run_s", 0.0)) for s in STAGES)
            total = j["finished"] - sent
            e2e.append(total)
            runs.extend(float(st[s]["timings"].get("run_s", 0.0)) for s in STAGES)
            per_job.append((total - run) / len(STAGES))
        pooled = [x for s in STAGES for x in hops[s]]
        return {"jobs": len(e2e), "failed": failed, "hop": summary(pooled),
                "per_hop": {s: summary(hops[s]) for s in STAGES},
                "e2e_overhead_per_hop": summary(per_job), "e2e": summary(e2e), "run_s": summary(runs)}

    def dump_profile(self, profiler, name: str) -> None:
        import io
        import pstats

        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(out / name)
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(30)
        log(buf.getvalue())
        log(f"broker profile written to {out / name}")


class Relay:
    """The bare relay's stack, each part in its own process: the relay (:func:`_relay_main`), one
    fake worker per stage (:func:`_fake_worker_main`) and the broker's client (:class:`Client`).

    :meth:`measure` runs the broker's phases on it (warm-up, the throughput rounds with
    ``window`` jobs in flight, Poisson arrivals at a fraction of its jobs/s) and stops every
    process before it returns, also on errors; ``processes`` lists all it started.
    """

    def __init__(self, plan: Plan, window: int, *, capacity: int = 32, control: str = "tcp://127.0.0.1:*",
                 seed: int = 1):
        self.plan, self.window, self.capacity, self.control, self.seed = plan, window, capacity, control, seed
        self.tmp = Path(tempfile.mkdtemp(prefix="onepiece-relay-"))
        self.relay = None
        self.conn = None
        self.workers: list = []
        self.client: Client | None = None

    @property
    def processes(self) -> list:
        return [p for p in (self.relay, *self.workers, self.client and self.client.process) if p is not None]

    async def measure(self, load: float) -> dict:
        """Throughput rounds, then hop latency at ``load`` times the rounds' median jobs/s."""
        try:
            await self.start()
            return await self.run(load)
        finally:
            await self.stop()

    async def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        credit_ep = f"ipc://{self.tmp}/credits.ipc"
        self.relay = ctx.Process(target=_relay_main, name="cp-relay", daemon=True,
                                 args=(self.control, credit_ep, max(1, self.window // 8), child))
        self.relay.start()
        child.close()
        endpoint = await self.reply("its endpoint")
        for stage in STAGES:
            w = ctx.Process(target=_fake_worker_main, name=f"cp-relay-worker-{stage}", daemon=True,
                            args=(endpoint, stage, self.capacity))
            w.start()
            self.workers.append(w)
        await self.reply("that every stage has a worker")
        self.client = Client(endpoint, credit_ep)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()
        for w in self.workers:
            await stop_process(w)
        if self.relay is not None:
            await stop_process(self.relay, self.conn)

    def cleanup_sync(self) -> None:
        """Last resort after stop(): kill what is left, remove the temp dir."""
        kill_pids(p.pid for p in self.processes if p.is_alive())
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def reply(self, what: str, timeout: float = 30.0):
        """The relay's next message; RuntimeError if none comes within ``timeout`` s or a process
        of the stack exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.conn.poll, 0.1):
            gone = [p.name for p in self.processes if not p.is_alive()]
            if gone:
                raise RuntimeError(f"{', '.join(gone)} exited before the relay said {what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not say {what} within {timeout:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the relay exited before it said {what}") from None

    async def ask(self, *cmd):
        self.conn.send(cmd)
        return await self.reply(f"its answer to {cmd[0]}")

    async def drain(self, total_submitted: int) -> None:
        deadline = time.monotonic() + self.plan.drain_s
        while (ended := await self.ask("ended")) < total_submitted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{total_submitted - ended} jobs did not end within {self.plan.drain_s:.0f} s "
                                   f"of the relay's phase")
            await asyncio.sleep(0.01)

    def pids(self) -> dict[str, int]:
        return {"relay": self.relay.pid, "client": self.client.pid,
                **{f"worker {stage}": w.pid for stage, w in zip(STAGES, self.workers)}}

    async def run(self, load: float) -> dict:
        p, window = self.plan, self.window
        log(f"bare relay: warm-up {p.warmup_s:.1f} s with {window} jobs in flight")
        r = await self.client.command("window", window, p.warmup_s)
        check_replies(r, "relay")
        await self.drain(r["total_submitted"])
        await self.ask("take", 0.0, 0.0)  # forget the warm-up

        rounds = []
        for i in range(p.rounds):
            log(f"bare relay: throughput round {i + 1} of {p.rounds}: {p.seconds:.1f} s with {window} jobs in flight")
            pids = self.pids()
            c0, w0 = cpu_seconds(pids), time.time()
            r = await self.client.command("window", window, p.seconds)
            c1, w1 = cpu_seconds(pids), time.time()
            check_replies(r, "relay")
            await self.drain(r["total_submitted"])
            lo, hi = r["t0"] + p.ramp_s, r["t1"]
            seen = await self.ask("take", lo, hi)
            cpu_ms_per_job = sum(c1[k] - c0[k] for k in c1 if k in c0) * 1e3 / max(1, r["submitted"])
            rnd = {"seconds": hi - lo, "stage_tasks": seen["stage_tasks"], "jobs": seen["jobs"],
                   "tasks_per_s": seen["stage_tasks"] / (hi - lo), "jobs_per_s": seen["jobs"] / (hi - lo),
                   "cpu_pct": cpu_share(c0, c1, w1 - w0), "cpu_ms_per_job": cpu_ms_per_job}
            rounds.append(rnd)
            log(f"  {rnd['tasks_per_s']:,.0f} tasks/s, {rnd['jobs_per_s']:,.0f} jobs/s, "
                f"{cpu_ms_per_job:.3f} CPU ms/job; CPU % of a core: "
                + ", ".join(f"{k} {v:.0f}" for k, v in rnd["cpu_pct"].items()))

        max_jobs = statistics.median(x["jobs_per_s"] for x in rounds)
        rate = max(1.0, load * max_jobs)
        log(f"bare relay: hop latency: Poisson arrivals at {rate:,.0f} jobs/s ({load:.0%} of {max_jobs:,.0f}) "
            f"for {p.latency_s:.1f} s")
        await self.ask("credits", False)  # the Poisson client does not wait on ends
        await self.ask("hops", time.time() + p.ramp_s)
        r = await self.client.command("rate", rate, p.latency_s, self.seed)
        await self.ask("credits", True)
        check_replies(r, "relay")
        await self.drain(r["total_submitted"])
        seen = await self.ask("take", 0.0, 0.0)
        hops = {s: [x for stage, x in seen["hops"] if stage == s] for s in STAGES}
        lat = {"rate": rate, "load": load, "offered_seconds": p.latency_s,
               "hop": summary([x for s in STAGES for x in hops[s]]),
               "per_hop": {s: summary(hops[s]) for s in STAGES},
               "client_late_p99_ms": r["late_p99_ms"]}
        return {"rounds": rounds, "latency": lat}


# -- report ------------------------------------------------------------------------------------

def report(args, plan: Plan, machine: dict, res: dict, leftover: int) -> tuple[list[str], bool]:
    lines = []
    add = lines.append
    rounds, lat = res["rounds"], res["latency"]
    add("OnePiece control plane: workflow zero3 (a -> b -> c, synthetic, zero service time, 16-byte tensors)")
    add(f"machine: {machine['cores']} cores ({machine['cpu']}), python {machine['python']}, "
        f"load average {machine['loadavg_start']:.2f} at start, {machine['loadavg_end']:.2f} at end")
    add(f"stack: broker in this process (uvloop, SQLite in a temp dir, control {args.control}); "
        f"{args.workers} worker process(es) per stage, capacity {args.capacity} each, transport {args.transport}; "
        f"client in its own process submitting over ZeroMQ SUBMIT")
    add("")
    add(f"Throughput: {args.window} jobs kept in flight, {plan.rounds} round(s) of {plan.seconds:.0f} s "
        f"(first {plan.ramp_s:g} s of each not counted)")
    add(f"  {'round':<7}{'tasks/s':>9}{'jobs/s':>8}{'stage tasks':>13}{'jobs ok':>9}{'failed':>8}"
        f"{'CPU ms/job':>12}{'load':>6}  CPU, % of one core")
    for i, r in enumerate(rounds, 1):
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_pct"].items())
        add(f"  {i:<7}{r['tasks_per_s']:>9,.0f}{r['jobs_per_s']:>8,.0f}{r['stage_tasks']:>13,}"
            f"{r['jobs_succeeded']:>9,}{r['jobs_failed']:>8}{r['cpu_ms_per_job']:>12.2f}{r['loadavg']:>6.2f}  {cpu}")
        if r.get("cpu_wait_pct"):
            wait = ", ".join(f"{k.split(' (')[0]} {v:.0f}" for k, v in r["cpu_wait_pct"].items())
            add(f"  {'':<7}runnable but waiting for a CPU, % of wall (all threads): {wait}")
    tps = statistics.median(r["tasks_per_s"] for r in rounds)
    jps = statistics.median(r["jobs_per_s"] for r in rounds)
    cpj = statistics.median(r["cpu_ms_per_job"] for r in rounds)
    if len(rounds) > 1:
        add(f"  {'median':<7}{tps:>9,.0f}{jps:>8,.0f}{'':>30}{cpj:>12.2f}")
    cores = machine["cores"]
    add("  CPU ms/job = CPU time of all our processes (broker, client, workers) / jobs submitted in the round.")
    add(f"  Ceiling if they had all {cores} cores busy: {cores} / {cpj:.2f} ms = {cores * 1e3 / cpj:,.0f} jobs/s = "
        f"{3 * cores * 1e3 / cpj:,.0f} tasks/s. 'load' = 1-minute load average, other users' work included.")
    add("")
    add(f"Hop latency at {lat['load']:.0%} load: Poisson arrivals at {lat['rate']:,.0f} jobs/s for "
        f"{lat['offered_seconds']:.0f} s, {lat['jobs']:,} jobs measured ({lat['failed']} failed)")
    add(f"  {'':<44}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'mean ms':>9}{'samples':>9}")

    def row(name, s):
        add(f"  {name:<44}{s['p50']:>8.3f}{s['p99']:>8.3f}{s['max']:>8.2f}{s['mean']:>9.3f}{s['n']:>9,}")

    row("hop, all three pooled", lat["hop"])
    row("  hop a: client sends job -> a started", lat["per_hop"]["a"])
    row("  hop b: broker has a's DONE -> b started", lat["per_hop"]["b"])
    row("  hop c: broker has b's DONE -> c started", lat["per_hop"]["c"])
    row("(end-to-end - sum of run_s) / 3, per job", lat["e2e_overhead_per_hop"])
    row("end-to-end: client send -> succeeded", lat["e2e"])
    row("stage run_s as the worker reports it", lat["run_s"])
    add("  CPU, % of one core: " + ", ".join(f"{k} {v:.0f}" for k, v in lat["cpu_pct"].items()))
    add(f"  client lateness vs its Poisson schedule p99 {lat['client_late_p99_ms']:.2f} ms; broker event loop "
        f"max lag {lat['broker_loop_max_lag_ms']:.1f} ms (a 50 ms timer's lateness)")
    add("  hop = from when the stage could run (a: the client's send; b, c: the broker's receipt of the")
    add("  upstream's DONE) until the broker receives its STARTED: routing, TASK and SEND messages, the")
    add("  16-byte tensor over the data plane, the worker's start and the STARTED message back. Times are")
    add("  the broker's per-stage timestamps (Broker.job(id)['stages']) and the client's send time, one clock.")
    add("")
    relay = res.get("relay")
    if relay is None:
        add("Bare relay: not run (--no-relay)")
    else:
        add("Bare relay, the limit of a Python ZeroMQ broker here: a ROUTER in its own process (uvloop, msgpack,")
        add("  sends joined per peer and loop turn) with no store, job table, scheduling or schema checks; one")
        add("  fake worker per stage (STARTED and DONE at once for each TASK, no data plane) and the same client.")
        add("  Per job the same 15 messages cross its ROUTER as the broker's: SUBMIT, SUBMITTED, 3 TASK,")
        add("  3 STARTED, 3 DONE, 2 SEND, 2 RELEASE.")
        add(f"  {'round':<7}{'tasks/s':>9}{'jobs/s':>8}{'stage tasks':>13}{'CPU ms/job':>12}  CPU, % of one core")
        for i, r in enumerate(relay["rounds"], 1):
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_pct"].items())
            add(f"  {i:<7}{r['tasks_per_s']:>9,.0f}{r['jobs_per_s']:>8,.0f}{r['stage_tasks']:>13,}"
                f"{r['cpu_ms_per_job']:>12.3f}  {cpu}")
        rtps = statistics.median(r["tasks_per_s"] for r in relay["rounds"])
        if len(relay["rounds"]) > 1:
            add(f"  {'median':<7}{rtps:>9,.0f}")

        def us_per_job(rounds, role):  # CPU time of one process per job, median over the rounds
            return statistics.median(r["cpu_pct"].get(role, float("nan")) * 1e4 / r["jobs_per_s"] for r in rounds)

        broker_us, relay_us = us_per_job(rounds, "broker (+bench)"), us_per_job(relay["rounds"], "relay")
        add(f"  CPU per job of the process with the ROUTER: broker (+bench) {broker_us:.0f} us, relay "
            f"{relay_us:.0f} us ({broker_us / relay_us:.1f}x)")
        rlat = relay["latency"]
        add(f"  hop at {rlat['load']:.0%} load (Poisson, {rlat['rate']:,.0f} jobs/s, "
            f"{rlat['offered_seconds']:.0f} s): p50 {rlat['hop']['p50']:.3f} ms, p99 {rlat['hop']['p99']:.3f} ms, "
            f"max {rlat['hop']['max']:.2f} ms, {rlat['hop']['n']:,} samples")
        add("  relay hop = from when the stage could run (a: the client's send; b, c: the relay's receipt of")
        add("  the upstream's DONE) until the relay receives its STARTED: the TASK out and the STARTED back.")
    add("")
    add("Targets")
    ok_tp = tps >= TARGET_TASKS_PER_S
    p99 = lat["hop"]["p99"]
    ok_lat = p99 < TARGET_HOP_P99_MS
    add(f"  {'throughput >= 5,000 tasks/s':<40}{'PASS' if ok_tp else 'FAIL':<6}{tps:,.0f} tasks/s")
    lat_target = f"hop p99 < 5 ms at {lat['load']:.0%} load"
    add(f"  {lat_target:<40}{'PASS' if ok_lat else 'FAIL':<6}{p99:.3f} ms "
        f"(p50 {lat['hop']['p50']:.3f} ms)")
    ok_ratio = True
    if relay is not None:
        ratio = tps / rtps
        ok_ratio = ratio >= TARGET_RATIO_TO_RELAY
        add(f"  {f'throughput >= {TARGET_RATIO_TO_RELAY:g}x the bare relay':<40}{'PASS' if ok_ratio else 'FAIL':<6}"
            f"{ratio:.2f}x ({tps:,.0f} / {rtps:,.0f} tasks/s)")
        add(f"  {'hop p99 / the bare relay (information)':<40}{'':<6}{p99 / rlat['hop']['p99']:.1f}x "
            f"({p99:.3f} / {rlat['hop']['p99']:.3f} ms)")
    if res.get("disturbances"):
        add(f"  seen: {res['disturbances']}")
    add("")
    add(f"/dev/shm names left by our workers: {leftover} (removed)" if leftover else
        "/dev/shm names left by our workers: none")
    return lines, ok_tp and ok_lat and ok_ratio


def machine_info() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()[0]}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


async def amain(bench: Bench, relay: Relay | None) -> dict:
    try:
        from onepiece.heap import freeze_startup_heap

        await bench.start()
        freeze_startup_heap()  # as `onepiece broker` does once it is up
        res = await bench.run()
    finally:
        await bench.stop()
    if relay is not None:  # once the broker's stack is gone: the two never share the cores
        res["relay"] = await relay.measure(res["latency"]["load"])
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run, under a minute")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--transport", default="shm", choices=("shm", "tcp"), help="data plane (default shm)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per stage (default 1)")
    parser.add_argument("--capacity", type=int, default=32, help="tasks each worker may hold at once (default 32)")
    parser.add_argument("--window", type=int, default=128, help="jobs kept in flight for throughput (default 128)")
    parser.add_argument("--seconds", type=float, help="one throughput round (default 10, quick 5)")
    parser.add_argument("--rounds", type=int, help="throughput rounds, median reported (default 3, quick 1)")
    parser.add_argument("--latency-seconds", type=float, help="the latency phase (default 20, quick 6)")
    parser.add_argument("--load", type=float, default=0.5, help="latency phase load, fraction of max (default 0.5)")
    parser.add_argument("--control", default="tcp://127.0.0.1:*", help="broker endpoint (default a free port)")
    parser.add_argument("--rate", type=float, help="latency phase at this many jobs/s instead of --load x max")
    parser.add_argument("--seed", type=int, default=1, help="seed of the Poisson arrivals")
    parser.add_argument("--profile", metavar="DIR",
                        help="cProfile the broker process in the throughput rounds (DIR/broker.prof) "
                             "and the latency phase (DIR/broker-latency.prof)")
    parser.add_argument("--no-relay", action="store_true",
                        help="skip the bare relay (the limit of a Python ZeroMQ broker) and its ratio")
    args = parser.parse_args(argv)
    params = dict(QUICK if args.quick else FULL)
    for key, value in (("seconds", args.seconds), ("rounds", args.rounds), ("latency_s", args.latency_seconds)):
        if value is not None:
            params[key] = value
    plan = Plan(load=args.load, **params)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    machine = machine_info()
    bench = Bench(args, plan)
    relay = None if args.no_relay else Relay(plan, args.window, capacity=args.capacity, control=args.control,
                                             seed=args.seed)
    started = time.monotonic()
    res = None
    try:
        res = run_loop(amain(bench, relay))
    except KeyboardInterrupt:
        log("interrupted: every process started here has been stopped")
        return 130
    except (RuntimeError, TimeoutError) as exc:
        log(f"the benchmark could not finish: {exc}")
        return 1
    finally:
        leftover = bench.cleanup_sync()
        if relay is not None:
            relay.cleanup_sync()
        if leftover:
            log(f"removed {leftover} /dev/shm name(s) our workers left behind")
    machine["loadavg_end"] = os.getloadavg()[0]
    lines, ok = report(args, plan, machine, res, leftover)
    print("\n".join(lines), flush=True)
    log(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        lat, relay_res = res["latency"], res.get("relay")
        tps = statistics.median(r["tasks_per_s"] for r in res["rounds"])
        rtps = relay_p99 = None
        if relay_res is not None:
            rtps = statistics.median(r["tasks_per_s"] for r in relay_res["rounds"])
            relay_p99 = relay_res["latency"]["hop"]["p99"]
        out = {"tasks_per_s": round(tps, 1),
               "hop_latency_ms": {"p50": round(lat["hop"]["p50"], 4), "p99": round(lat["hop"]["p99"], 4)},
               "relay_tasks_per_s": None if rtps is None else round(rtps, 1),
               "ratio_to_relay": None if rtps is None else round(tps / rtps, 3),
               "relay_hop_p99_ms": None if relay_p99 is None else round(relay_p99, 4),
               "hop_p99_ratio_to_relay": None if relay_p99 is None else round(lat["hop"]["p99"] / relay_p99, 2),
               "jobs_per_s": round(statistics.median(r["jobs_per_s"] for r in res["rounds"]), 1),
               "cpu_ms_per_job": round(statistics.median(r["cpu_ms_per_job"] for r in res["rounds"]), 3),
               "targets": {"tasks_per_s": TARGET_TASKS_PER_S, "hop_p99_ms": TARGET_HOP_P99_MS,
                           "ratio_to_relay": TARGET_RATIO_TO_RELAY, "pass": ok},
               "config": {"transport": args.transport, "workers_per_stage": args.workers,
                          "capacity": args.capacity, "window": args.window, "quick": args.quick,
                          "submit_path": "zeromq SUBMIT from a separate client process"},
               "machine": machine, "rounds": res["rounds"], "latency": lat,
               "relay": relay_res, "shm_names_left": leftover}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
