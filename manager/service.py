"""The Node Manager: reads the broker's signals, asks a policy, starts and drains workers.

It runs in the broker's process, beside it. One control-loop task wakes
every ``poll_s`` (a fraction of a second) to notice exits and
registrations, and decides every ``period_s``, or at once when a stage with
no worker gets a queued task (scale from zero should cost one cold start,
not a cold start plus a period). Each decision is logged with its inputs,
kept in a bounded history (:meth:`Manager.decisions`) and counted in the
broker's ``/metrics``.

Slots. Each launch takes a slot of its pool (GPU or CPU) and holds it until
its process has exited, so re-purposing a slot is a drain plus a start,
and the start waits until the drained worker is gone. A start that finds
no free slot (a move) waits for one, in order.

GPU memory (off unless ``gpu_memory_gb`` is given). Then a GPU slot is a GPU
of that much memory and GPU workers are packed onto them by
``manager.packing``: each worker takes room for its stage's peak (declared
by the workflow stage's ``memory_gb``/``peak_gb``/``gpu_load`` options, or
``stage_needs``, e.g. from ``Profile.stage_needs()``), so several small
stages share one GPU (pinned to the same device) while a big one takes a
GPU alone. A GPU stage that declares nothing takes a whole GPU, as without
memory accounting. The policy still decides how many workers each stage
gets (it is told the pool's worker count, ``packing.capacity``); packing
decides where they go, and a start with no room anywhere waits, in order,
for a worker to exit.

Sequence-parallel groups. A change of width k > 1 (the policy's choice for a
stage with an ``sp_efficiency`` table, or ``scale(..., width=k)``) starts a
worker group: ``onepiece worker --sp k`` holding k GPU slots (k whole GPUs,
pinned together with CUDA_VISIBLE_DEVICES; with memory, each rank a GPU to
itself). The slots are taken one after the other by a start that is first in
line, so only it ever holds part of what it needs. A stage's first start of a
new width *re-forms* it: its workers of the old width are replaced, one
drained as each new one registers (a drained DiT hands its job off at a step
boundary), and until then they count as draining, holding their slots; the
stage's measured task time is forgotten, since it was the old width's. A
launcher that cannot start groups (``compose``) gets width-1 starts and a
warning.

Scale-down. The least-loaded live worker of the stage that this manager
started is drained (of equally loaded ones, one that leaves its GPU empty, so
small stages packed beside a DiT stay with a DiT that stays): the broker
binds nothing new to it and sends DRAIN, and the launcher waits for the
process to exit (SIGTERM for a local one; a worker that does not leave within
``drain_timeout_s`` is killed and its tasks are re-run by the broker). A
draining worker finishes its in-flight task and keeps its outputs until the
consumer has them, so no task is lost or run twice.

The broker is reached only through ``onepiece.links.BrokerLink`` (the
broker in this process, or ``manager.remote.RemoteBroker`` over REST); the
manager attaches itself to it as a ``ManagerLink``.

Lifecycle: :meth:`start` makes the first decision at once (floors, i.e. the
initial allocation; a policy that cannot fit the pool raises
``PolicyError`` here), then runs the loop. :meth:`stop` stops deciding,
then drains every worker it started.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from onepiece.links import BrokerLink

from .launcher import Launcher, WorkerHandle
from .packing import GpuPool, StageNeed, Worker, capacity, declared_need
from .policy import Change, Policy, StageSignals
from .signals import LoadTimes, SignalReader

__all__ = ["Manager", "default_cpu_slots", "default_gpu_slots"]

log = logging.getLogger("onepiece.manager")


def default_gpu_slots() -> tuple[int, bool]:
    """(slots, real GPUs): the number of CUDA devices, else one slot per CPU core."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch or a broken driver: a CPU machine for our purpose
        n = 0
    return (n, True) if n else (os.cpu_count() or 1, False)


def default_cpu_slots() -> int:
    return os.cpu_count() or 1


def _workflow_ref(wf) -> str:
    """What a worker is told to load: the workflow's file, so custom files work too."""
    return wf.source if Path(wf.source).is_file() else wf.name


class _Pool:
    """Numbered slots; a waiter is handed a released slot first come, first served.

    A seat (what ``acquire`` hands out and ``release`` takes back) is the slot's number; any
    worker fits any slot, so ``acquire`` ignores the stage (the memory pool needs it)."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self.policy_slots = size  # what the policy is told: one worker per slot
        self._free = list(range(size))
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def used(self) -> int:
        return self.size - len(self._free)

    @staticmethod
    def index(seat: int) -> int:
        return seat

    async def acquire(self, stage: str, whole: bool = False) -> int:
        if self._free and not self._waiters:
            return self._free.pop(0)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            raise

    def release(self, slot: int) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(slot)
                return
        self._free.append(slot)
        self._free.sort()


class _MemoryPool:
    """GPUs with memory: a seat is a ``packing.Worker`` placed on one of them.

    Starts are served in order: one that finds no room waits, and the ones behind it wait too
    (a big worker is not starved by small ones filling every gap it waits for)."""

    name = "gpu"

    def __init__(self, sizes_gb: list[float], needs: Mapping[str, StageNeed], max_load: float | None):
        self.gpus = GpuPool(sizes_gb, max_load=max_load)
        self.size = len(sizes_gb)
        self.needs = dict(needs)
        self.policy_slots = capacity(sorted(self.needs.items()), sizes_gb, max_load=max_load)
        self._waiters: collections.deque[tuple[Worker, asyncio.Future]] = collections.deque()

    @property
    def used(self) -> int:
        return self.gpus.held()

    def index(self, seat: Worker) -> int:
        return self.gpus.gpu_of(seat)

    async def acquire(self, stage: str, whole: bool = False) -> Worker:
        need = self.needs[stage]
        if whole:  # a rank of a sequence-parallel group: its GPU to itself (no neighbour stalls the group)
            need = StageNeed(need.memory_gb, max(need.peak_gb, min(self.gpus.sizes_gb)), need.load)
        seat = Worker(stage, need)
        if not self._waiters and self.gpus.place(seat) is not None:
            return seat
        free = ", ".join(f"GPU {g}: {self.gpus.sizes_gb[g] - self.gpus.peak_gb(g):.1f} GB"
                         for g in range(self.size))
        log.info("node manager: no GPU has room for a worker of %s (peak %.1f GB, load %.2f; free %s; "
                 "%d start(s) ahead): it waits for a worker to exit", stage, seat.need.peak_gb, seat.need.load,
                 free, len(self._waiters))
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((seat, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(seat)
            else:
                self._serve()  # it may have been the head of the queue
            raise
        return seat

    def release(self, seat: Worker) -> None:
        self.gpus.remove(seat)
        self._serve()

    def measured(self, stage: str, memory_gb: float) -> StageNeed | None:
        """A worker of ``stage`` measured ``memory_gb`` resident at start (CUDA). Above what the
        stage declared, the stage's next workers are placed by the measurement (the peak grows by
        the same amount): the new need, or None if the declaration holds."""
        need = self.needs.get(stage)
        if need is None or not math.isfinite(memory_gb) or memory_gb <= need.memory_gb:
            return None
        top = max(self.gpus.sizes_gb)  # a peak above a whole GPU could never be placed again
        grown = StageNeed(memory_gb, max(memory_gb, min(top, need.peak_gb + memory_gb - need.memory_gb)), need.load)
        self.needs[stage] = grown
        self.policy_slots = capacity(sorted(self.needs.items()), self.gpus.sizes_gb, max_load=self.gpus.max_load)
        return grown

    def _serve(self) -> None:
        """Place waiting starts, in order, while the first of them fits."""
        while self._waiters:
            seat, fut = self._waiters[0]
            if fut.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self.gpus.place(seat) is None:
                return
            self._waiters.popleft()
            fut.set_result(None)


@dataclass(eq=False)
class _Record:
    """One worker this manager asked for, from the decision to its exit."""

    stage: str
    pool: _Pool | _MemoryPool
    width: int = 1  # GPU slots it holds: a sequence-parallel group of that many processes
    seats: list = field(default_factory=list)  # what the pool handed out, one per slot
    handle: WorkerHandle | None = None  # None until launched
    launched_at: float | None = None  # wall clock, as the broker's registration time
    registered: bool = False
    draining: bool = False
    launch: asyncio.Task | None = None
    replacing: bool = False  # of a width the stage no longer runs at: drained as new ones come up

    @property
    def starting(self) -> bool:
        return not self.registered and not self.draining

    @property
    def seated(self) -> bool:
        """Whether it holds all its slots (a start still waiting for room has launched nothing)."""
        return len(self.seats) == self.width


class Manager:
    """Node Manager of one broker (see the module docstring)."""

    def __init__(
        self,
        broker: BrokerLink,
        launcher: Launcher,
        policy: Policy,
        *,
        gpu_slots: int,
        cpu_slots: int,
        period_s: float = 5.0,
        workflows: Mapping | None = None,  # default: the broker's
        drain_timeout_s: float = 600.0,
        poll_s: float = 0.2,
        history: int = 500,
        pin_gpus: bool = False,
        load_times: LoadTimes | None = None,
        gpu_memory_gb: float | None = None,
        stage_needs: Mapping[str, StageNeed] | None = None,
        gpu_max_load: float | None = None,
    ):
        if gpu_slots < 0 or cpu_slots < 0:
            raise ValueError(f"slots must be >= 0, not gpu={gpu_slots} cpu={cpu_slots}")
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, not {period_s}")
        self.broker = broker
        self.launcher = launcher
        self.policy = policy
        self.period_s = period_s
        self.poll_s = min(poll_s, period_s)
        self.drain_timeout_s = drain_timeout_s
        self.pin_gpus = pin_gpus and "env" in inspect.signature(launcher.start).parameters
        self.can_widen = "sp" in inspect.signature(launcher.start).parameters  # sequence-parallel groups
        self._width: dict[str, int] = {}  # the width each stage's new workers have (1 until a policy asks)
        # GPU slot i is the i-th device this process may use
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self._devices = [d.strip() for d in visible.split(",") if d.strip()]
        if pin_gpus and not self.pin_gpus:
            log.warning("launcher %s cannot set CUDA_VISIBLE_DEVICES: GPU workers are not pinned to their slot",
                        type(launcher).__name__)
        self.ref: dict[str, str] = {}
        self.gpu: dict[str, bool] = {}
        self._declared: dict[str, StageNeed] = {}  # GPU stages' memory_gb/peak_gb/gpu_load options
        # workflows: name -> Workflow, or name -> the reference workers load for the broker's workflow
        for wname, wf in (workflows if workflows is not None else broker.workflows).items():
            ref = wf if isinstance(wf, (str, os.PathLike)) else None
            if ref is not None:
                wf = broker.workflows[wname]
            for name, spec in wf.stages.items():
                self.ref.setdefault(name, str(ref) if ref is not None else _workflow_ref(wf))
                self.gpu.setdefault(name, spec.gpu)
                if spec.gpu and "memory_gb" in spec.options and name not in self._declared:
                    self._declared[name] = declared_need(name, spec.options)
        self.pools = {True: self._gpu_pool(gpu_slots, gpu_memory_gb, stage_needs, gpu_max_load),
                      False: _Pool("cpu", cpu_slots)}
        self.reader = SignalReader(self.gpu)
        self.load_times = load_times or LoadTimes()
        self._records: list[_Record] = []
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._history: collections.deque[dict] = collections.deque(maxlen=history)
        self._exits: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._target: dict[str, int] = {}
        self._early: dict[str, float] = {}
        self._last_signals: dict[str, StageSignals] = {}
        self._decisions_metric: Counter | None = None
        self._collector = None

    def _gpu_pool(self, gpu_slots: int, gpu_memory_gb: float | None, stage_needs: Mapping[str, StageNeed] | None,
                  max_load: float | None) -> _Pool | _MemoryPool:
        """Plain slots, or, with ``gpu_memory_gb``, GPUs that workers are packed onto by memory."""
        if gpu_memory_gb is None:
            if stage_needs or max_load is not None:
                raise ValueError("stage_needs and gpu_max_load need gpu_memory_gb (the memory of one GPU)")
            return _Pool("gpu", gpu_slots)
        stray = sorted(set(stage_needs or {}) - {s for s, gpu in self.gpu.items() if gpu})
        if stray:
            raise ValueError(f"stage_needs names {', '.join(stray)}, not GPU stages of these workflows")
        whole = StageNeed(0.0, gpu_memory_gb)  # declares nothing: a GPU to itself
        needs = {s: (stage_needs or {}).get(s) or self._declared.get(s) or whole for s, gpu in self.gpu.items()
                 if gpu}
        for s, n in needs.items():
            if n.peak_gb > gpu_memory_gb or (max_load is not None and n.load > max_load):
                raise ValueError(f"stage {s!r} needs {n.peak_gb} GB at its peak (load {n.load}) but a GPU has "
                                 f"{gpu_memory_gb} GB (load limit {max_load}): its workers could never start")
        undeclared = sorted(s for s, n in needs.items() if n is whole)
        if undeclared:
            log.info("node manager: GPU stage(s) %s declare no memory: each worker takes a whole GPU",
                     ", ".join(undeclared))
        return _MemoryPool([float(gpu_memory_gb)] * gpu_slots, needs, max_load)

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """First decision now (the initial allocation, launched when this returns), then the control loop."""
        self._register_metrics()
        try:
            self.tick()
        except BaseException:
            self._unregister_metrics()
            raise
        self.broker.attach("manager", self)  # its API shows the allocation, readiness skips on-demand stages
        # the initial workers are launched (not yet registered) when start() returns
        await asyncio.gather(*(r.launch for r in self._records if r.launch is not None), return_exceptions=True)
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="manager")
        gpus = self.pools[True]
        packed = (f" of {gpus.gpus.sizes_gb[0]:g} GB, packed by memory ({gpus.policy_slots} worker(s) for the "
                  "policy)") if isinstance(gpus, _MemoryPool) and gpus.size else ""
        log.info("node manager: %d GPU slot(s)%s%s, %d CPU slot(s), period %.1f s, policy %s",
                 gpus.size, packed, " (pinned)" if self.pin_gpus else "", self.pools[False].size,
                 self.period_s, type(self.policy).__name__)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop deciding, then drain every worker this manager started (kill what stays past ``timeout``)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        launching = [r for r in self._records if r.handle is None and r.launch is not None]
        for r in launching:
            if not r.seated:  # still waiting for a slot: nothing was launched
                r.launch.cancel()
        await asyncio.gather(*(r.launch for r in launching), return_exceptions=True)
        for rec in list(self._records):
            if rec.handle is not None and not rec.draining:
                self._drain(rec, "manager stopping", timeout)
        if self._tasks:
            # drains begun earlier wait up to drain_timeout_s; stopping waits ``timeout`` for all of them
            _, late = await asyncio.wait(self._tasks, timeout=timeout)
            if late:
                for rec in list(self._records):
                    if rec.handle is not None:
                        log.warning("node manager: %s did not leave within %.0f s of stopping: killing it",
                                    rec.handle.id, timeout)
                        await self.launcher.kill(rec.handle)
                _, stuck = await asyncio.wait(late, timeout=10.0)
                for t in stuck:  # a launcher that cannot say its worker is gone: stop waiting for it
                    t.cancel()
        self._unregister_metrics()
        self.broker.detach("manager", self)

    def wake(self) -> None:
        """Decide now instead of at the end of the period."""
        self._wake.set()

    async def _run(self) -> None:
        next_at = time.monotonic() + self.period_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            try:
                self._observe()
                now = time.monotonic()
                if self._wake.is_set() or now >= next_at or self._cold_stage(now):
                    self._wake.clear()
                    self.tick()
                    next_at = time.monotonic() + self.period_s
            except Exception:  # noqa: BLE001 - the loop must outlive one bad decision
                log.exception("node manager: decision failed; trying again next period")
                next_at = time.monotonic() + self.period_s

    # -- one decision -----------------------------------------------------------------
    def tick(self) -> list[Change]:
        """Read the signals, ask the policy, carry the changes out. Returns them."""
        self._observe()
        signals = self.signals()
        changes = self.policy.decide(time.monotonic(), signals, self.pools[True].policy_slots,
                                     self.pools[False].policy_slots)
        self._target = {s: sig.current for s, sig in signals.items()}
        # drains first: a start that re-purposes a slot waits for the drained worker's exit
        for c in sorted(changes, key=lambda c: c.delta):
            self._apply(c, signals.get(c.stage))
        return changes

    def signals(self) -> dict[str, StageSignals]:
        raw = self.broker.stage_signals(time.time())
        starting: dict[str, int] = collections.Counter()
        draining: dict[str, int] = collections.Counter()
        replacing: dict[str, int] = collections.Counter()
        held: dict[str, int] = collections.Counter()
        for rec in self._records:
            held[rec.stage] += rec.width
            if rec.draining:
                draining[rec.stage] += 1
            elif rec.replacing:  # an old width: holds its slots until a new worker replaces it
                replacing[rec.stage] += 1 if rec.registered else 0
                draining[rec.stage] += 0 if rec.registered else 1
            elif rec.starting:
                starting[rec.stage] += 1
        widths = {s: self._width.get(s, 1) for s in self.gpu}
        sig = self.reader.read(time.monotonic(), raw, starting=starting, draining=draining,
                               load_time=self.load_times.as_dict(self.gpu), width=widths, replacing=replacing,
                               held_slots={s: held[s] for s in self.gpu if any(r.stage == s for r in self._records)})
        self._last_signals = sig
        return sig

    def scale(self, stage: str, delta: int, reason: str = "asked by an operator", width: int = 1) -> None:
        """Start (``delta > 0``) or drain workers of ``stage`` outside the policy; logged as a decision.
        ``width > 1`` starts sequence-parallel groups of that many GPUs and re-forms the stage to them."""
        if stage not in self.gpu:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(self.gpu)}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, not {width!r}")
        self._observe()
        a = self.allocation()[stage]  # not self.signals(): a reading here would hide arrivals from the policy
        self._target[stage] = a["workers"] + a["starting"]
        self._apply(Change(stage, delta, reason, width=width), self._last_signals.get(stage))

    def _apply(self, change: Change, sig: StageSignals | None) -> None:
        if change.stage not in self.gpu or change.delta == 0:
            log.warning("node manager: ignored %s", change)
            return
        width = change.width if change.delta > 0 else 1
        if width != 1 and (not self.can_widen or not self.gpu[change.stage]):
            log.warning("node manager: %s asks for workers of width %d, but %s; starting width-1 workers",
                        change.stage, width, "it is a CPU stage" if not self.gpu[change.stage] else
                        f"launcher {type(self.launcher).__name__} cannot start sequence-parallel groups")
            width = 1
        if change.delta > 0 and width != self._width.get(change.stage, 1):
            self._reform(change.stage, width)
        done = 0
        for _ in range(abs(change.delta)):
            if change.delta > 0:
                self._launch(change.stage, width)
                done += 1
            elif self._drain_one(change.stage, change.reason):
                done += 1
        if not done:
            return
        delta = done if change.delta > 0 else -done
        self._target[change.stage] = self._target.get(change.stage, 0) + delta
        inputs = sig.brief() if sig is not None else {}
        log.info("scale %s %+d: %s | %s", change.stage, delta, change.reason,
                 " ".join(f"{k}={v}" for k, v in inputs.items()))
        self._history.append({"ts": time.time(), "stage": change.stage, "delta": delta,
                              "reason": change.reason, "signals": inputs})
        if self._decisions_metric is not None:
            self._decisions_metric.labels(change.stage, "up" if delta > 0 else "down").inc(abs(delta))

    # -- starting ---------------------------------------------------------------------
    def _reform(self, stage: str, width: int) -> None:
        """The stage's new workers have ``width``: those of another width are replaced, one drained
        as each new one registers (or at once if they have not started yet); a task of a drained
        DiT hands off at a step boundary, so the re-form moves work, it does not redo it."""
        log.info("node manager: %s re-forms from width %d to %d", stage, self._width.get(stage, 1), width)
        self._width[stage] = width
        self.reader.forget_service_time(stage)
        for rec in [r for r in self._records if r.stage == stage and not r.draining and r.width != width]:
            if rec.handle is None and not rec.seated:  # still waiting for room: nothing to replace
                if rec.launch is not None:
                    rec.launch.cancel()
                self._forget(rec)
            else:  # launched (or being launched): replaced once a new one is up
                rec.replacing = True

    def _replace_one(self, stage: str) -> None:
        """A worker of the stage's new width registered: one of the old width may go."""
        old = [r for r in self._records if r.stage == stage and r.replacing and not r.draining
               and r.handle is not None]
        if not old:
            return
        # an old one that never registered first (it holds slots and serves nothing), then the oldest
        rec = min(old, key=lambda r: (r.registered, r.launched_at or 0.0))
        self._drain(rec, f"re-form to width {self._width.get(stage, 1)}: a new worker is up", self.drain_timeout_s)

    def _launch(self, stage: str, width: int = 1) -> None:
        rec = _Record(stage, self.pools[self.gpu[stage]], width=width)
        self._records.append(rec)
        rec.launch = self._spawn(self._start_worker(rec), f"launch-{stage}")

    async def _start_worker(self, rec: _Record) -> None:
        try:
            # a group's slots one after the other: a start waiting for room is first in line (the ones
            # behind it wait too), so only it holds part of what it needs, and the next exit serves it
            while not rec.seated:
                rec.seats.append(await rec.pool.acquire(rec.stage, whole=rec.width > 1))
            slots = [rec.pool.index(seat) for seat in rec.seats]
            slot = ",".join(map(str, slots))
            kwargs: dict = {"sp": rec.width} if rec.width != 1 else {}
            if self.pin_gpus and rec.pool.name == "gpu":  # workers sharing a GPU get the same device
                kwargs["env"] = {"CUDA_VISIBLE_DEVICES": ",".join(
                    self._devices[i] if i < len(self._devices) else str(i) for i in slots)}
            rec.launched_at = time.time()
            rec.handle = await self.launcher.start(self.ref[rec.stage], rec.stage, **kwargs)
        except asyncio.CancelledError:
            self._forget(rec)
            raise
        except Exception:  # noqa: BLE001 - a failed launch frees its slot; the policy asks again
            log.exception("node manager: could not start a worker of %s", rec.stage)
            self._forget(rec)
            return
        log.info("node manager: launched %s on %s slot %s%s", rec.handle.id, rec.pool.name, slot,
                 f" (a group of {rec.width})" if rec.width != 1 else "")

    # -- draining ---------------------------------------------------------------------
    def _drain_one(self, stage: str, reason: str) -> bool:
        """Drain the least-loaded live worker of ``stage`` that we started (see the module docstring)."""
        ours = {r.handle.id: r for r in self._records
                if r.stage == stage and r.handle is not None and r.registered and not r.draining}
        live = [w for w in self.broker.stages().get(stage, {}).get("workers", [])
                if w["id"] in ours and not w["draining"]]
        if not live:
            log.warning("node manager: no worker of %s that it started is live to drain (%s)", stage, reason)
            return False
        # the policy counts the stage's present width: an old-width worker (being replaced) last;
        # among the least loaded, one whose GPU it leaves empty (a DiT that small stages do not
        # share), so the pool gives a GPU back instead of leaving neighbours alone on theirs
        def frees(rec: _Record) -> bool:
            return isinstance(rec.pool, _MemoryPool) and rec.pool.gpus.frees(rec.seats)

        w = min(live, key=lambda w: (ours[w["id"]].replacing, w["load"], not frees(ours[w["id"]]), w["holding"],
                                     -w["registered"]))
        self._drain(ours[w["id"]], reason, self.drain_timeout_s)
        return True

    def _drain(self, rec: _Record, reason: str, timeout: float) -> None:
        rec.draining = True
        wid = rec.handle.id
        try:
            self.broker.drain(wid)
        except Exception as exc:  # noqa: BLE001 - UnknownWorker: it already left; the launcher still waits for it
            log.info("node manager: broker could not drain %s (%s); stopping it anyway", wid, exc)
        log.info("node manager: draining %s (%s)", wid, reason)
        self._spawn(self._retire(rec, timeout), f"drain-{wid}")

    async def _retire(self, rec: _Record, timeout: float) -> None:
        code = None
        try:
            code = await self.launcher.drain(rec.handle, timeout)
        finally:
            self._exited(rec, code, "drained")

    # -- bookkeeping ------------------------------------------------------------------
    def _observe(self) -> None:
        """Notice registrations (measuring start-up time) and exits that nobody asked for."""
        if not self._records:
            return
        registered = {w["id"]: (stage, w) for stage, s in self.broker.stages().items() for w in s["workers"]}
        for stage, w in registered.values():
            info = w.get("info") or {}
            load_s = info.get("load_s")
            if load_s is not None:
                self.load_times.report(stage, load_s)
            memory = info.get("memory_gb")
            pool = self.pools[True]
            if (isinstance(memory, (int, float)) and not isinstance(memory, bool) and self.gpu.get(stage)
                    and isinstance(pool, _MemoryPool)):
                declared = pool.needs.get(stage)
                grown = pool.measured(stage, float(memory))
                if grown is not None:
                    log.warning("node manager: a worker of %s holds %.1f GB at start, more than the %.1f GB "
                                "declared: its next workers are placed for %.1f GB at the peak", stage, memory,
                                declared.memory_gb, grown.peak_gb)
        alive = {h.id for h in self.launcher.workers()}
        for rec in list(self._records):
            if rec.handle is None:
                continue
            if not rec.registered and rec.handle.id in registered:
                rec.registered = True
                took = registered[rec.handle.id][1]["registered"] - rec.launched_at
                self.load_times.record(rec.stage, took)
                log.info("node manager: %s registered %.1f s after launch", rec.handle.id, took)
                if not rec.replacing and not rec.draining:
                    self._replace_one(rec.stage)
            if not rec.draining and rec.handle.id not in alive:
                code = rec.handle.process.returncode if rec.handle.process is not None else None
                log.warning("node manager: worker %s of %s exited on its own (code %s)", rec.handle.id,
                            rec.stage, code)
                if rec.handle.id in registered:  # its work is re-made now, not once its heartbeats lapse
                    try:
                        self.broker.lost(rec.handle.id, f"its process exited with code {code}")
                    except Exception as exc:  # noqa: BLE001 - the heartbeats still tell the broker
                        log.warning("node manager: could not report %s lost: %r", rec.handle.id, exc)
                self._exited(rec, code, "exited")

    def _exited(self, rec: _Record, code: int | None, how: str) -> None:
        if rec.handle is not None:
            self._exits[rec.handle.id] = {"stage": rec.stage, "code": code, "how": how, "at": time.time()}
            while len(self._exits) > self._history.maxlen:
                self._exits.popitem(last=False)
            if how == "drained":
                log.info("node manager: %s left (code %s); its room on %s slot %s is free", rec.handle.id, code,
                         rec.pool.name, ",".join(str(rec.pool.index(seat)) for seat in rec.seats) or None)
        self._forget(rec)

    def _forget(self, rec: _Record) -> None:
        if rec in self._records:
            self._records.remove(rec)
            while rec.seats:
                rec.pool.release(rec.seats.pop())

    def _cold_stage(self, now: float) -> bool:
        """A stage with no worker, none starting, and a queued task: decide now (once per period)."""
        raw = self.broker.stage_signals(time.time())
        starting = {r.stage for r in self._records if not r.draining}
        for stage, r in raw.items():
            if (r["queue_len"] and r["workers"] - r["draining"] == 0 and stage not in starting
                    and now - self._early.get(stage, -1e18) >= self.period_s):
                self._early[stage] = now
                log.info("node manager: %s has %d queued task(s) and no worker: deciding now", stage,
                         r["queue_len"])
                return True
        return False

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- views ------------------------------------------------------------------------
    def allocation(self) -> dict[str, dict]:
        """Per stage: live workers (registered, not draining), starting, draining, and the target;
        for a stage with sequence-parallel groups also the width its new workers have (GPU slots
        each, ``width``) and the slots it holds (``slots``)."""
        stages = self.broker.stages()
        aims = getattr(self.policy, "targets", None) or {}
        out: dict[str, dict] = {}
        for stage in self.gpu:
            live = sum(1 for w in stages.get(stage, {}).get("workers", []) if not w["draining"])
            recs = [r for r in self._records if r.stage == stage]
            starting = sum(1 for r in recs if r.starting)
            draining = sum(1 for r in recs if r.draining)
            out[stage] = {"workers": live, "starting": starting, "draining": draining,
                          "target": aims.get(stage, self._target.get(stage, live + starting)),
                          "pool": "gpu" if self.gpu[stage] else "cpu"}
            if self._width.get(stage, 1) != 1 or any(r.width != 1 for r in recs):
                out[stage].update(width=self._width.get(stage, 1), slots=sum(r.width for r in recs if r.seated))
        return out

    def on_demand_stages(self) -> set[str]:
        """Stages that may sit at zero workers: a queued task starts one (not 'missing' for readiness)."""
        on_demand = getattr(self.policy, "on_demand", None)
        return {s for s in self.gpu if on_demand is not None and on_demand(s)}

    def slots(self) -> dict[str, dict]:
        """Per pool: slots in all (``total``) and in use (``used``: for GPUs with memory, the GPUs
        held, a shared one counted once); with memory, also ``gpus``: per GPU its device, the
        workers on it, the memory their peaks reserve (``used_gb``), what they keep resident
        (``resident_gb``), its memory (``total_gb``) and their summed expected ``load``."""
        out = {p.name: {"total": p.size, "used": p.used} for p in self.pools.values()}
        pool = self.pools[True]
        if isinstance(pool, _MemoryPool):
            names = {seat: r.handle.id if r.handle is not None else f"{r.stage} (starting)"
                     for r in self._records if r.pool is pool for seat in r.seats}
            g = pool.gpus
            out["gpu"]["gpus"] = [
                {"gpu": i, "device": self._devices[i] if i < len(self._devices) else str(i),
                 "workers": [names.get(w, w.stage) for w in g.workers(i)], "used_gb": round(g.peak_gb(i), 3),
                 "resident_gb": round(g.memory_gb(i), 3), "total_gb": g.sizes_gb[i], "load": round(g.load(i), 3)}
                for i in range(pool.size)]
        return out

    def decisions(self, limit: int | None = None) -> list[dict]:
        """Recent decisions, oldest first: ts, stage, delta, reason, and the signals they read."""
        items = list(self._history)
        return items[-limit:] if limit else items

    def exits(self) -> dict[str, dict]:
        """Workers this manager started that have exited: stage, code, how (drained/exited), at."""
        return dict(self._exits)

    # -- metrics ----------------------------------------------------------------------
    def _register_metrics(self) -> None:
        registry = self.broker.metrics_registry()
        if registry is None:
            return
        self._decisions_metric = Counter("onepiece_manager_decisions", "Workers started (up) or drained (down)",
                                         ["stage", "direction"], registry=registry)
        self._collector = _ManagerCollector(self)
        registry.register(self._collector)

    def _unregister_metrics(self) -> None:
        registry = self.broker.metrics_registry()
        for m in (self._decisions_metric, self._collector):
            if registry is not None and m is not None:
                registry.unregister(m)
        self._decisions_metric = self._collector = None


class _ManagerCollector:
    """Scrape-time gauges of the allocation."""

    def __init__(self, manager: Manager):
        self.manager = manager

    def collect(self):
        alloc = self.manager.allocation()
        fams = {k: GaugeMetricFamily(f"onepiece_manager_{name}", text, labels=["stage"]) for k, name, text in (
            ("workers", "workers", "Live workers per stage (registered, not draining)"),
            ("starting", "starting_workers", "Workers launched and not registered yet"),
            ("draining", "draining_workers", "Workers draining, still holding their slot"),
            ("target", "target_workers", "Workers the policy is steering each stage towards"))}
        for stage, a in alloc.items():
            for k, fam in fams.items():
                fam.add_metric([stage], a[k])
        yield from fams.values()
        slots = GaugeMetricFamily("onepiece_manager_slots", "Slots of each pool", labels=["pool", "state"])
        for name, s in self.manager.slots().items():
            slots.add_metric([name, "total"], s["total"])
            slots.add_metric([name, "used"], s["used"])
        yield slots
