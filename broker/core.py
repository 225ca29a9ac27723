"""The broker's scheduling core: worker registry, job and task state machines,
late-bound routing, lineage recovery and deadlines. No I/O.

Every event method takes the current time ``now`` (seconds, any monotonic
origin) and returns a list of commands; the asyncio broker around it turns
``ToWorker`` into ZeroMQ messages, ``JobEvent`` into job-store rows and
server-sent events, and counts/logs ``Stale``. Tests drive it back to back
with a fake clock.

Invariants (``Core.check_invariants`` asserts 2-9; the property tests call it
after every event):

1. Nothing in the core waits, sleeps, reads a clock or does I/O.
2. A task is bound (state ``assigned`` or ``running``) to exactly one
   registered worker, and a worker's load is exactly the number of tasks
   bound to it; load never exceeds capacity.
3. A task is ``queued`` if and only if it is in its stage's queue.
4. No task is ever bound to a worker that is draining at the time of binding,
   or that has been lost: losing a worker unbinds all of its tasks at once.
5. A finished task whose outputs some consumer still needs is ``held`` by a
   registered worker; held outputs are released (one RELEASE) exactly once,
   when every consumer is ``done`` or the job ends, or dropped when their
   holder is lost.
6. **Lineage.** Every input a waiting task (``queued`` or ``assigned``) needs
   is held by a registered worker or is being made again (its producer is
   pending, queued, assigned or running). When a task must run again and an
   input is gone (its holder died, or it was released because every consumer
   had finished), the core re-runs the producer, recursively up to the roots,
   whose inputs are the job's parameters and payload, kept until the job
   ends. So releasing an output is a memory decision, never a correctness
   one. A ``running`` task already has its inputs (a worker reports STARTED
   once they have all arrived), so losing the holder of outputs that only
   running or finished consumers read re-makes nothing until one of them
   must run again. A consumer bound to a lost producer keeps its binding:
   the re-made producer SENDs to it, and the worker replaces that input.
   Re-making lost outputs counts no attempt against ``max_attempts``; a task
   that fails, crashes with its worker, or stalls does.
7. **Deadlines.** A bound task that shows no sign of life (bound, inputs
   sent, STARTED, PROGRESS) for longer than its stage's bound is lost and
   recovered as in 6 (counted as a failed attempt, its worker told to
   CANCEL). The bound is ``progress_factor`` times the longest of the
   stage's last 32 observed service times, within ``[progress_floor_s,
   progress_cap_s]`` (the cap until a service time is observed). A running
   task that its worker's heartbeats list as computing is bound by the cap
   alone: it may be a job far larger than those observed, and a worker that
   forgot it (a restart, a reset) stops listing it. An ``assigned`` task
   whose inputs are still being made does not count down: the task making
   them has its own bound. A job that is not terminal
   ``job_deadline_s`` after it was created fails with a reason naming the
   stage it waited on and why.
8. A job moves through JOB_TRANSITIONS and reaches exactly one terminal state
   (``succeeded``, ``failed`` with a reason, or ``cancelled``); after it,
   nothing of the job is queued, bound or held, and every later worker
   message about it is answered with ``Stale``.
9. A job that is not terminal has at least one task that is queued, assigned
   or running, so it always makes progress while workers behave; with 7,
   it ends within ``job_deadline_s`` even when they do not.
10. Every task and job state change is checked against TASK_TRANSITIONS /
   JOB_TRANSITIONS; a change outside the table raises IllegalTransition.
11. **Step-boundary state.** A task that reports progress in steps (denoise)
   may leave a *checkpoint* of its state with the holder of one of its inputs
   (``checkpoint_to`` in its TASK: the holder of its first held upstream, the
   place that survives its worker and that a re-bound task fetches inputs
   from anyway); the bytes go worker to worker, the core only records
   ``(holder, step)`` from CHECKPOINT. When the task is bound again, the SEND
   to that holder carries ``resume_step`` and the holder ships the state with
   the inputs, so the new worker resumes instead of starting at step 0. A
   draining worker hands a running task off (HANDOFF): its state goes to the
   holder the same way and the task is re-queued without counting an
   attempt. A checkpoint is only ever an optimisation: a lost holder loses
   it (the task then starts at step 0), never the job; and since the
   compute is deterministic, any checkpoint of a job resumes to the same
   result.

Every wait in the system and its bound (``expire`` enforces the broker's):

============================================  ======================================================
wait                                          bound
============================================  ======================================================
broker: a worker's next message               ``heartbeat_s * liveness``, then the worker is lost (4)
broker: a bound task's next sign of life      the stage's progress bound (7)
broker: a job's end                           ``job_deadline_s`` from its creation (7)
broker: a queued task for a worker            the job's deadline (``/readyz`` says 503 meanwhile)
broker: a SUBMIT reply for its commit         ``commit_interval_s``; a failing commit is retried
                                              and logged each time, the replies held meanwhile
worker: the broker's next message             ``heartbeat_s * liveness``, then reconnect/re-register
worker: loading its model, opening its port   ``load_timeout_s``, ``connect_timeout_s``, then exit 1
worker: a task's inputs                       the broker's progress bound (it CANCELs and re-binds)
worker: a stage's run                         ``task_timeout_s``, then FAILED (retryable)
worker: sending outputs                       ``send_timeout_s`` per attempt, then FAILED naming the
                                              unreachable consumer (bound elsewhere)
worker: drain, shutdown                       ``DRAIN_TIMEOUT_S``, ``CLOSE_TIMEOUT_S``
node manager: stop                            its ``timeout`` (then it kills what did not leave)
transports: ring credit, connect, handshake   each transport's own timeouts (``transports/``)
REST: a server-sent event stream              none while the job lives (a keep-alive every 15 s);
                                              the job itself ends by its deadline
============================================  ======================================================

Routing is late-bound: a root task is queued at submit; any other task is
queued when its first upstream finishes, or, if it reads a step-wise
(``progress``) stage, when every such upstream has finished. A queued task is bound to the
least-loaded live, non-draining worker of its stage that has room (ties: the
earliest registered), oldest job first. Every upstream of a fan-in sends to
that one worker; an upstream that finishes before its consumer is bound keeps
its outputs and gets its SEND at binding time.

Stage names are global across workflows: a worker registered for stage
``denoise`` serves the ``denoise`` stage of every workflow that has one, so
two workflows may share a stage name only with the same ``kind``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from broker.errors import CoreError, IllegalTransition, UnknownJob, UnknownWorker
from stages.workflow import StageSpec, Workflow, WorkflowError, check_shared

__all__ = [
    "Command",
    "Core",
    "JobEvent",
    "Stale",
    "ToWorker",
    "JOB_TRANSITIONS",
    "TASK_TRANSITIONS",
    "TERMINAL",
]

# -- states and transitions ----------------------------------------------------

PENDING = "pending"  # waiting for the first upstream to finish
QUEUED = "queued"
ASSIGNED = "assigned"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
SUCCEEDED = "succeeded"

TASK_TRANSITIONS: Mapping[str, frozenset[str]] = {
    # first upstream done | job ended
    PENDING: frozenset({QUEUED, CANCELLED}),
    # bound | superseded re-run (every consumer already finished) | the job's deadline | job ended
    QUEUED: frozenset({ASSIGNED, DONE, FAILED, CANCELLED}),
    # STARTED | retry | superseded re-run | fatal failure or the job's deadline | job ended
    ASSIGNED: frozenset({RUNNING, QUEUED, DONE, FAILED, CANCELLED}),
    # DONE | retry | fatal failure | job ended
    RUNNING: frozenset({DONE, QUEUED, FAILED, CANCELLED}),
    # holder lost before every consumer finished: re-run | ... with no attempts left
    DONE: frozenset({QUEUED, FAILED}),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

JOB_TRANSITIONS: Mapping[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, FAILED, CANCELLED}),  # first task bound
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
_BOUND = (ASSIGNED, RUNNING)
_WAITING = (QUEUED, ASSIGNED)  # tasks that still need their inputs delivered
RECENT_SERVICE_TIMES = 32  # the progress bound follows the longest of these

# -- commands --------------------------------------------------------------------


@dataclass(frozen=True)
class ToWorker:
    """Send ``body`` to worker ``worker_id`` as a ``kind`` message
    (TASK, SEND, RELEASE, CANCEL or DRAIN)."""

    worker_id: str
    kind: str
    body: dict


@dataclass(frozen=True)
class JobEvent:
    """Record and publish an event of a job: queued, stage_assigned, stage_started,
    progress, stage_finished, stage_retry, and the terminal succeeded, failed,
    cancelled."""

    job_id: str
    type: str
    data: dict


@dataclass(frozen=True)
class Stale:
    """A worker message that was ignored (late, duplicate, or about a task the
    worker no longer owns). Nothing to do but log or count it."""

    message: str  # STARTED, PROGRESS, DONE, FAILED, DISCONNECT
    worker_id: str
    job_id: str | None
    stage: str | None
    reason: str


Command = Union[ToWorker, JobEvent, Stale]
Key = tuple[str, str]  # (job id, stage)

# -- internal records ------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    id: str
    stage: str
    capacity: int
    descriptor: dict
    info: dict
    seq: int
    registered: float
    last_seen: float
    draining: bool = False
    reported_load: int | None = None
    tasks: dict[Key, None] = field(default_factory=dict)  # bound, unfinished (an ordered set)
    holding: dict[Key, None] = field(default_factory=dict)  # finished, outputs still held

    @property
    def load(self) -> int:
        return len(self.tasks)


@dataclass(eq=False)
class _Task:
    job: str
    stage: str
    spec: StageSpec
    state: str = PENDING
    attempt: int = 1
    worker: str | None = None  # bound worker; after done, the worker that ran it
    held: bool = False  # done, and `worker` still holds the outputs
    token: int = -1  # identifies the live queue entry
    alive: float = 0.0  # last sign of life while bound: bound, inputs sent, STARTED, PROGRESS
    vouched: float = float("-inf")  # last heartbeat of its worker that listed it as running
    avoid: str | None = None  # the worker its last attempt failed on: placed elsewhere if possible
    saved: tuple[str, str, int] | None = None  # (holder worker, upstream stage, step) of its last checkpoint
    queued: float | None = None
    assigned: float | None = None
    started: float | None = None
    finished: float | None = None
    timings: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> Key:
        return (self.job, self.stage)


@dataclass(eq=False)
class _Job:
    id: str
    seq: int
    workflow: Workflow
    params: dict
    payload: dict | None
    created: float
    tasks: dict[str, _Task]
    deadline: float = float("inf")
    state: str = QUEUED
    reason: str | None = None
    finished: float | None = None
    result: dict | None = None


@dataclass
class _Signals:
    arrivals: int = 0
    completed: int = 0
    retries: int = 0
    service_time_sum: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_SERVICE_TIMES))


# -- the core --------------------------------------------------------------------


class Core:
    """Pure scheduling state machine; see the module docstring for its invariants."""

    def __init__(
        self,
        workflows: Mapping[str, Workflow],
        *,
        heartbeat_liveness_s: float = 7.5,
        max_attempts: int = 3,
        progress_floor_s: float = 30.0,
        progress_cap_s: float = 900.0,
        progress_factor: float = 4.0,
        job_deadline_s: float = 3600.0,
    ) -> None:
        if max_attempts < 1:
            raise CoreError(f"max_attempts must be >= 1, not {max_attempts}")
        for name, value in (("heartbeat_liveness_s", heartbeat_liveness_s), ("progress_floor_s", progress_floor_s),
                            ("progress_factor", progress_factor), ("job_deadline_s", job_deadline_s)):
            if not value > 0:
                raise CoreError(f"{name} must be > 0, not {value}")
        if progress_cap_s < progress_floor_s:
            raise CoreError(f"progress_cap_s ({progress_cap_s}) must be >= progress_floor_s ({progress_floor_s})")
        self.liveness = float(heartbeat_liveness_s)
        self.max_attempts = int(max_attempts)
        self.progress_floor_s = float(progress_floor_s)
        self.progress_cap_s = float(progress_cap_s)
        self.progress_factor = float(progress_factor)
        self.job_deadline_s = float(job_deadline_s)
        self._workflows = dict(workflows)
        try:
            check_shared(self._workflows)  # a stage name means one (kind, model) in every workflow
        except WorkflowError as exc:
            raise CoreError(str(exc)) from None
        self._specs: dict[str, StageSpec] = {}
        for wf in self._workflows.values():
            for spec in wf.stages.values():
                self._specs.setdefault(spec.name, spec)
        kinds = self._specs
        self._stage_order = list(kinds)  # dispatch order: deterministic
        self._workers: dict[str, _Worker] = {}  # insertion order = registration order
        self._jobs: dict[str, _Job] = {}
        self._heaps: dict[str, list[tuple[int, int, Key]]] = {s: [] for s in kinds}
        self._queued: dict[str, dict[Key, _Task]] = {s: {} for s in kinds}
        self._signals = {s: _Signals() for s in kinds}
        self._seq = itertools.count()

    # -- worker events -----------------------------------------------------------

    def register(
        self,
        worker_id: str,
        stage: str,
        capacity: int,
        descriptor: dict,
        now: float,
        info: dict | None = None,
        kind: str | None = None,
        model: str | None = None,
    ) -> list[Command]:
        """A worker offers ``capacity`` task slots for ``stage``. A known id is a new
        incarnation: the old one's tasks and held outputs are treated as lost. ``kind`` and
        ``model``, when the worker says them, must be what the served workflows declare for
        the stage: a stage name stands for one (kind, model), and a worker that would run
        something else is refused rather than handed tasks it would compute differently."""
        if stage not in self._queued:
            raise CoreError(f"unknown stage {stage!r}; the loaded workflows have {self._stage_order}")
        spec = self._specs[stage]
        for what, offered, declared in (("kind", kind, spec.kind), ("model", model, spec.model)):
            if offered is not None and offered != declared:
                raise CoreError(f"stage {stage!r} runs {what} {declared!r}, not {offered!r}: "
                                f"start the worker with the workflow the broker serves")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise CoreError(f"capacity must be an integer >= 1, not {capacity!r}")
        out: list[Command] = []
        old = self._workers.get(worker_id)
        if old is not None:
            self._lose(old, f"worker {worker_id} re-registered (previous incarnation lost)", now, out)
        self._workers[worker_id] = _Worker(
            worker_id, stage, capacity, dict(descriptor or {}), dict(info or {}),
            next(self._seq), now, now,
        )
        self._dispatch(now, out)
        return out

    def heartbeat(self, worker_id: str, now: float, load: int | None = None,
                  running: list[tuple[str, str]] | None = None) -> list[Command]:
        """Liveness from a worker; raises UnknownWorker so it can be told to re-register.
        ``running``: the (job, stage) of each task the worker is computing now; each such
        task of this worker is vouched for (invariant 7). Others listed are ignored."""
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorker(worker_id)
        w.last_seen = now
        w.reported_load = load
        for key in running or ():
            if key in w.tasks:
                t = self._task(key)
                if t.state == RUNNING:
                    t.vouched = now
        out: list[Command] = []
        self._dispatch(now, out)  # it may have been past liveness and skipped
        return out

    def disconnect(self, worker_id: str, now: float) -> list[Command]:
        """The worker leaves on purpose. Its unstarted tasks and the outputs it still
        held are redone without counting an attempt; running tasks count one."""
        w = self._workers.get(worker_id)
        if w is None:
            return [Stale("DISCONNECT", worker_id, None, None, "unknown worker")]
        out: list[Command] = []
        self._lose(w, f"worker {worker_id} disconnected", now, out, graceful=True)
        self._dispatch(now, out)
        return out

    def expire(self, now: float) -> list[Command]:
        """Enforce every bound (invariant 7): a worker not heard from within the liveness
        interval is lost; a bound task silent past its stage's progress bound is lost and
        re-run elsewhere; a job past its deadline fails."""
        out: list[Command] = []
        for w in list(self._workers.values()):
            silent = now - w.last_seen
            if silent > self.liveness:
                self._lose(w, f"worker {w.id} lost (no heartbeat for {silent:.1f} s)", now, out)
        for task, silent, bound in self._stalled(now):
            if task.state in _BOUND:  # an earlier one in this loop may have ended its job
                out.append(ToWorker(task.worker, "CANCEL", {"job": task.job, "stage": task.stage}))
                self._retry(task, f"no progress for {silent:.1f} s on worker {task.worker} "
                                  f"(the bound for {task.stage} is {bound:.1f} s)", now, out)
        for j in [j for j in self._jobs.values() if j.state not in TERMINAL and now > j.deadline]:
            culprit, why = self._blocking(j, now)
            self._deadline_fail(j, culprit, f"job exceeded its deadline of {j.deadline - j.created:.0f} s: "
                                            f"stage {culprit.stage} {why}", now, out)
        self._dispatch(now, out)
        # a worker lost later in this pass may have been sent something earlier in it (a CANCEL
        # when another loss ended a job it ran): nothing goes to a worker that is gone
        return [c for c in out if not (isinstance(c, ToWorker) and c.worker_id not in self._workers)]

    def progress_bound(self, stage: str) -> float:
        """How long a bound task of ``stage`` may show no sign of life (invariant 7)."""
        recent = self._signals[stage].recent
        if not recent:
            return self.progress_cap_s
        return min(self.progress_cap_s, max(self.progress_floor_s, self.progress_factor * max(recent)))

    def _bound(self, t: _Task, now: float) -> float:
        """A running task its worker's heartbeats still list is computing, not lost: it may be
        a job far larger than those observed, so only the cap applies to it."""
        if t.state == RUNNING and now - t.vouched <= self.liveness:
            return self.progress_cap_s
        return self.progress_bound(t.stage)

    def _stalled(self, now: float, fraction: float = 1.0) -> list[tuple[_Task, float, float]]:
        """Bound tasks silent past ``fraction`` of their bound, with how long and the bound."""
        out = []
        for w in self._workers.values():
            for key in w.tasks:
                t = self._task(key)
                if t.state == ASSIGNED and not self._inputs_held(t):
                    continue  # what it waits for is being made, under its own bound
                silent, bound = now - t.alive, self._bound(t, now)
                if silent > bound * fraction:
                    out.append((t, silent, bound))
        return out

    def _inputs_held(self, task: _Task) -> bool:
        j = self._jobs[task.job]
        return all(j.tasks[up].held for up in task.spec.after)

    def _blocking(self, j: _Job, now: float) -> tuple[_Task, str]:
        """The task a job waits on, and why, for a deadline's reason."""
        order = {RUNNING: 0, ASSIGNED: 1, QUEUED: 2}
        waiting = sorted((t for t in j.tasks.values() if t.state in order), key=lambda t: order[t.state])
        t = waiting[0]  # invariant 9: a live job has one
        if t.state == RUNNING:
            return t, (f"was running on worker {t.worker} (attempt {t.attempt}) for {now - t.started:.1f} s, "
                       f"last sign of life {now - t.alive:.1f} s ago")
        if t.state == ASSIGNED:
            if not self._inputs_held(t):
                missing = [up for up in t.spec.after if not j.tasks[up].held]
                return t, (f"was assigned to worker {t.worker} (attempt {t.attempt}) "
                           f"waiting for inputs from {', '.join(missing)}")
            return t, (f"was assigned to worker {t.worker} (attempt {t.attempt}) for {now - t.assigned:.1f} s "
                       "and never started")
        able = [w for w in self._workers.values() if w.stage == t.stage and not w.draining]
        if not able:
            return t, f"was queued for {now - t.queued:.1f} s: no live worker serves it"
        return t, f"was queued for {now - t.queued:.1f} s behind {len(self._queued[t.stage]) - 1} other task(s) " \
                  f"({len(able)} worker(s), none free)"

    def registered(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def lost(self, worker_id: str, why: str, now: float) -> list[Command]:
        """The worker is gone (its launcher saw its process exit): lose it now rather than when
        its heartbeats are overdue. Unknown ids (already lost, re-registered) change nothing."""
        w = self._workers.get(worker_id)
        if w is None:
            return []
        out: list[Command] = []
        self._lose(w, f"worker {worker_id} lost ({why})", now, out)
        self._dispatch(now, out)
        return out

    def drain(self, worker_id: str, now: float) -> list[Command]:
        """Bind nothing new to the worker and tell it to finish and leave.
        It should disconnect only once its held outputs are released."""
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorker(worker_id)
        if w.draining:
            return []
        w.draining = True
        return [ToWorker(worker_id, "DRAIN", {})]

    def started(self, worker_id: str, job: str, stage: str, now: float,
                resumed_from_step: int | None = None) -> list[Command]:
        """The task's inputs all arrived and it runs; ``resumed_from_step``: it continues from a
        checkpoint of that step (invariant 11) rather than from the start."""
        found = self._reported("STARTED", worker_id, job, stage, now)
        if isinstance(found, Stale):
            return [found]
        if found.state == RUNNING:
            return [Stale("STARTED", worker_id, job, stage, "duplicate")]
        out: list[Command] = []
        self._start(found, now, out, resumed_from_step)
        return out

    def checkpointed(self, worker_id: str, job: str, stage: str, step: int, holder: str,
                     now: float) -> list[Command]:
        """The running task left its state after ``step`` steps with ``holder``, the worker
        holding the outputs of one of its upstreams (invariant 11). A sign of life too."""
        found = self._reported("CHECKPOINT", worker_id, job, stage, now)
        if isinstance(found, Stale):
            return [found]
        j = self._jobs[job]
        upstream = next((up for up in found.spec.after if j.tasks[up].held and j.tasks[up].worker == holder), None)
        if upstream is None:
            return [Stale("CHECKPOINT", worker_id, job, stage, f"{holder} holds no input of {stage}")]
        found.alive = now
        if found.saved is None or step >= found.saved[2] or found.saved[0] != holder:
            found.saved = (holder, upstream, step)
        return []

    def handoff(self, worker_id: str, job: str, stage: str, step: int, now: float) -> list[Command]:
        """A draining worker stopped the task at a step boundary and left its state after
        ``step`` steps with the holder its TASK named (0: it could not; the task starts over).
        The task is bound elsewhere, uncounted, and resumes there (invariant 11)."""
        found = self._reported("HANDOFF", worker_id, job, stage, now)
        if isinstance(found, Stale):
            return [found]
        out: list[Command] = []
        self._retry(found, f"worker {worker_id} is draining and handed {stage} off after step {step}", now, out,
                    count=False)
        self._dispatch(now, out)
        return out

    def progress(
        self, worker_id: str, job: str, stage: str, step: int, total: int, now: float
    ) -> list[Command]:
        found = self._reported("PROGRESS", worker_id, job, stage, now)
        if isinstance(found, Stale):
            return [found]
        out: list[Command] = []
        found.alive = now
        if found.state == ASSIGNED:
            self._start(found, now, out)
        out.append(JobEvent(job, "progress", {"stage": stage, "step": step, "total": total}))
        return out

    def done(
        self,
        worker_id: str,
        job: str,
        stage: str,
        now: float,
        timings: dict | None = None,
        result: dict | None = None,
    ) -> list[Command]:
        """The worker finished the task and now holds its outputs (if anyone consumes them)."""
        found = self._reported("DONE", worker_id, job, stage, now)
        if isinstance(found, Stale):
            return [found]
        task, j = found, self._jobs[job]
        out: list[Command] = []
        if task.state == ASSIGNED:  # STARTED never came: count service from assignment
            self._start(task, task.assigned, out)
        self._unbind(task)
        self._set(task, DONE)
        task.finished = now
        task.timings = dict(timings or {})
        sig = self._signals[stage]
        sig.completed += 1
        sig.service_time_sum += max(0.0, now - task.started)
        sig.recent.append(max(0.0, now - task.started))
        out.append(JobEvent(job, "stage_finished", {
            "stage": stage, "worker": worker_id, "attempt": task.attempt, "timings": task.timings,
        }))
        wf = j.workflow
        if stage == wf.result:
            j.result = dict(result or {})
            self._end(j, SUCCEEDED, now, out, {"result": j.result})
            self._dispatch(now, out)
            return out
        consumers = wf.downstream(stage)
        if consumers:
            task.held = True
            self._workers[worker_id].holding[task.key] = None
        for cname in consumers:
            consumer = j.tasks[cname]
            if consumer.state == PENDING:
                if self._bindable(consumer):
                    self._enqueue(consumer, now)
            elif consumer.state in _BOUND:
                out.append(self._send(task, consumer, now))
            # QUEUED: its SEND goes out at binding; DONE: settled just below
        for up in task.spec.after:
            self._settle(j.tasks[up], now, out)
        self._settle(task, now, out)
        self._dispatch(now, out)
        return out

    def failed(
        self, worker_id: str, job: str, stage: str, reason: str, retryable: bool, now: float
    ) -> list[Command]:
        """The task failed on the worker. For a task it already finished, this means
        its held outputs cannot be delivered: they are dropped and the task re-runs."""
        w = self._workers.get(worker_id)
        j = self._jobs.get(job)
        task = j.tasks.get(stage) if j is not None else None
        out: list[Command] = []
        if (
            w is not None and j is not None and task is not None and j.state not in TERMINAL
            and task.held and task.worker == worker_id
        ):
            w.last_seen = now
            self._release(task, out)
            why = f"worker {worker_id} could not deliver outputs: {reason}"
            if not self._needed(task):
                pass  # every consumer already has them; lineage re-makes them if one must run again
            elif retryable:  # the holder lost them (a reset, a restart): re-making them spends no attempt
                self._retry(task, why, now, out, count=False)
            else:
                self._fail(j, task, f"stage {stage} failed on worker {worker_id}: {reason}", now, out)
            self._dispatch(now, out)
            return out
        found = self._reported("FAILED", worker_id, job, stage, now)
        if isinstance(found, Stale):
            return [found]
        if retryable:
            self._retry(found, f"worker {worker_id}: {reason}", now, out)
        else:
            self._fail(j, found, f"stage {stage} failed on worker {worker_id}: {reason}", now, out)
        self._dispatch(now, out)
        return out

    def unreachable(
        self, worker_id: str, job: str, stage: str, to: str, to_stage: str, reason: str, now: float
    ) -> list[Command]:
        """The holder of ``stage``'s outputs could not deliver them to worker ``to``, where
        ``to_stage`` is bound. The outputs are fine; the consumer's worker is unreachable from
        the holder (most likely dead, its heartbeats not yet overdue): bind the consumer
        elsewhere, uncounted, and the holder SENDs again. One peer's word never removes a
        worker; if ``to`` is dead, its heartbeats say so soon."""
        j = self._jobs.get(job)
        task = j.tasks.get(stage) if j is not None else None
        consumer = j.tasks.get(to_stage) if j is not None else None
        if (
            worker_id not in self._workers or task is None or consumer is None or j.state in TERMINAL
            or not task.held or task.worker != worker_id or to_stage not in j.workflow.downstream(stage)
        ):
            return [Stale("FAILED", worker_id, job, stage, "not the holder of these outputs")]
        self._workers[worker_id].last_seen = now
        if consumer.state != ASSIGNED or consumer.worker != to:  # running: it has its inputs already
            return [Stale("FAILED", worker_id, job, stage, f"{to_stage} is not waiting for inputs on {to}")]
        out: list[Command] = []
        if to in self._workers:
            out.append(ToWorker(to, "CANCEL", {"job": job, "stage": to_stage}))
        self._retry(consumer, f"worker {worker_id} holding {stage} could not reach it on {to}: {reason}", now,
                    out, count=False)
        self._dispatch(now, out)
        return out

    # -- client events -------------------------------------------------------------

    def submit(
        self, job_id: str, workflow: str, params: dict, payload: dict | None, now: float,
        created: float | None = None,
    ) -> list[Command]:
        """Accept a job: its root tasks are queued and bound where there is room. ``created``
        (default ``now``) is when it was first accepted: a job re-queued after a broker
        restart keeps its deadline."""
        if job_id in self._jobs:
            raise CoreError(f"job id {job_id!r} already exists")
        wf = self._workflows.get(workflow)
        if wf is None:
            raise CoreError(f"unknown workflow {workflow!r}; available: {sorted(self._workflows)}")
        tasks = {s: _Task(job_id, s, spec) for s, spec in wf.stages.items()}
        created = now if created is None else created
        j = _Job(job_id, next(self._seq), wf, dict(params or {}), payload, created, tasks,
                 deadline=created + self.job_deadline_s)
        self._jobs[job_id] = j
        out: list[Command] = [JobEvent(job_id, "queued", {"workflow": workflow})]
        for root in wf.roots():
            self._enqueue(tasks[root], now)
        self._dispatch(now, out)
        return out

    def cancel(self, job_id: str, now: float, reason: str = "cancelled by client") -> list[Command]:
        """Cancel a job; a job that already ended is left alone (returns [])."""
        j = self._jobs.get(job_id)
        if j is None:
            raise UnknownJob(job_id)
        if j.state in TERMINAL:
            return []
        out: list[Command] = []
        self._end(j, CANCELLED, now, out, {"reason": reason})
        self._dispatch(now, out)
        return out

    def forget(self, job_id: str) -> bool:
        """Drop a finished job from memory (the job store keeps it). Later
        messages about it are Stale. Returns False if unknown or still active."""
        j = self._jobs.get(job_id)
        if j is None or j.state not in TERMINAL:
            return False
        del self._jobs[job_id]
        return True

    # -- introspection -------------------------------------------------------------

    def job(self, job_id: str) -> dict | None:
        j = self._jobs.get(job_id)
        if j is None:
            return None
        return {
            "id": j.id,
            "workflow": j.workflow.name,
            "state": j.state,
            "reason": j.reason,
            "created": j.created,
            "finished": j.finished,
            "result": j.result,
            "stages": {
                name: {
                    "state": t.state,
                    "worker": t.worker,
                    "attempt": t.attempt,
                    "queued": t.queued,
                    "assigned": t.assigned,
                    "started": t.started,
                    "finished": t.finished,
                    "timings": dict(t.timings),
                    "error": t.error,
                }
                for name, t in j.tasks.items()
            },
        }

    def active_jobs(self) -> list[str]:
        return [jid for jid, j in self._jobs.items() if j.state not in TERMINAL]

    def workflows(self) -> dict[str, Workflow]:
        return dict(self._workflows)

    def stages(self, now: float | None = None) -> dict:
        """Workers, queue and load per stage; given ``now``, also each stage's progress bound
        and its ``stuck`` tasks (:meth:`stuck`)."""
        out: dict[str, dict] = {}
        stuck = self.stuck(now) if now is not None else None
        for stage in self._stage_order:
            workers = [w for w in self._workers.values() if w.stage == stage]
            out[stage] = {
                "workers": [
                    {
                        "id": w.id,
                        "load": w.load,
                        "capacity": w.capacity,
                        "draining": w.draining,
                        "last_seen": w.last_seen,
                        "registered": w.registered,
                        "holding": len(w.holding),
                        "reported_load": w.reported_load,
                        "info": dict(w.info),
                    }
                    for w in workers
                ],
                "queued": len(self._queued[stage]),
                "busy": sum(1 for w in workers if w.load > 0),
                "running": sum(
                    1 for w in workers for k in w.tasks if self._task(k).state == RUNNING
                ),
            }
            if stuck is not None:
                out[stage]["progress_bound_s"] = self.progress_bound(stage)
                out[stage]["stuck"] = stuck[stage]
        return out

    def _can_serve(self, stage: str, now: float) -> bool:
        return any(w.stage == stage and not w.draining and now - w.last_seen <= self.liveness
                   for w in self._workers.values())

    def stuck(self, now: float) -> dict[str, list[dict]]:
        """Per stage, tasks that look stuck: bound and silent for over half their progress
        bound (with their inputs all sent), or queued while no live worker serves the stage."""
        out: dict[str, list[dict]] = {s: [] for s in self._stage_order}
        for t, silent, bound in self._stalled(now, fraction=0.5):
            out[t.stage].append({"job": t.job, "state": t.state, "worker": t.worker, "attempt": t.attempt,
                                 "silent_s": round(silent, 3), "bound_s": bound})
        for stage, queue in self._queued.items():
            if queue and not self._can_serve(stage, now):
                out[stage].extend({"job": t.job, "state": QUEUED, "worker": None, "attempt": t.attempt,
                                   "waiting_s": round(now - t.queued, 3), "reason": "no live worker serves it"}
                                  for t in queue.values())
        return out

    def health(self, now: float) -> list[dict]:
        """What keeps work from progressing, as ``{"stage", "reason", "waiting_s", "overdue"}``:
        stages with queued work and no live worker that can take it, and jobs past their deadline
        (``overdue``; the next :meth:`expire` fails them). Empty when every job can progress."""
        problems: list[dict] = []
        for stage, queue in self._queued.items():
            if queue and not self._can_serve(stage, now):
                oldest = now - min(t.queued for t in queue.values())
                problems.append({"stage": stage, "waiting_s": round(oldest, 3), "overdue": False,
                                 "reason": f"{len(queue)} task(s) of {stage} queued (oldest {oldest:.1f} s) "
                                           "and no worker can take them"})
        for j in self._jobs.values():
            if j.state not in TERMINAL and now > j.deadline:
                t, why = self._blocking(j, now)
                problems.append({"stage": t.stage, "waiting_s": round(now - j.created, 3), "overdue": True,
                                 "reason": f"job {j.id} is past its deadline: stage {t.stage} {why}"})
        return problems

    def stage_signals(self, now: float) -> dict:
        """Cumulative counters plus instantaneous gauges per stage, for a controller
        that differences successive readings."""
        out: dict[str, dict] = {}
        for stage in self._stage_order:
            sig = self._signals[stage]
            waiting = [t.queued for t in self._queued[stage].values()]
            workers = [w for w in self._workers.values() if w.stage == stage]
            out[stage] = {
                "arrivals": sig.arrivals,
                "completed": sig.completed,
                "retries": sig.retries,
                "service_time_sum": sig.service_time_sum,
                "queue_len": len(waiting),
                "oldest_wait_s": max(0.0, now - min(waiting)) if waiting else 0.0,
                "busy": sum(1 for w in workers if w.load > 0),
                "workers": len(workers),
                "draining": sum(1 for w in workers if w.draining),
                "capacity": sum(w.capacity for w in workers if not w.draining),
                "load": sum(w.load for w in workers),
            }
        return out

    def check_invariants(self) -> None:
        """Assert invariants 2-9 of the module docstring (for tests and debugging)."""
        for w in self._workers.values():
            assert w.load <= w.capacity, f"{w.id}: load {w.load} > capacity {w.capacity}"
            for k in w.tasks:
                t = self._task(k)
                assert t.state in _BOUND and t.worker == w.id, f"{w.id} lists {k} ({t.state}, {t.worker})"
            for k in w.holding:
                t = self._task(k)
                assert t.state == DONE and t.held and t.worker == w.id, f"{w.id} holds {k} wrongly"
        for stage, q in self._queued.items():
            for k, t in q.items():
                assert t.state == QUEUED and t.stage == stage and self._task(k) is t, f"queue {stage}: {k}"
        for j in self._jobs.values():
            live_work = False
            for t in j.tasks.values():
                if t.state in _BOUND:
                    w = self._workers.get(t.worker)
                    assert w is not None and t.key in w.tasks, f"{t.key} bound to lost {t.worker}"
                if t.state == QUEUED:
                    assert self._queued[t.stage].get(t.key) is t, f"{t.key} queued but not in queue"
                if t.held:
                    w = self._workers.get(t.worker)
                    assert t.state == DONE and w is not None and t.key in w.holding, f"{t.key} held badly"
                live_work = live_work or t.state in (QUEUED, ASSIGNED, RUNNING)
                if j.state in TERMINAL:
                    assert t.state in (DONE, FAILED, CANCELLED) and not t.held, f"{t.key} left {t.state}"
                elif t.state in _WAITING:
                    # lineage: every input of a waiting task is held or being made again
                    for up in t.spec.after:
                        u = j.tasks[up]
                        assert u.held or u.state in (PENDING, QUEUED, ASSIGNED, RUNNING), \
                            f"{u.key} is {u.state}, not held, and {t.stage} waits for it"
            if j.state not in TERMINAL:
                assert live_work, f"job {j.id} is {j.state} with nothing queued or running"

    # -- internals -----------------------------------------------------------------

    def _task(self, key: Key) -> _Task:
        return self._jobs[key[0]].tasks[key[1]]

    def _set(self, task: _Task, state: str) -> None:
        if state not in TASK_TRANSITIONS[task.state]:
            raise IllegalTransition(f"task {task.job}/{task.stage}: {task.state} -> {state}")
        task.state = state

    def _set_job(self, j: _Job, state: str) -> None:
        if state not in JOB_TRANSITIONS[j.state]:
            raise IllegalTransition(f"job {j.id}: {j.state} -> {state}")
        j.state = state

    def _reported(self, message: str, worker_id: str, job: str, stage: str, now: float) -> _Task | Stale:
        """The task a worker message is about, or why the message is stale."""
        w = self._workers.get(worker_id)
        if w is None:
            return Stale(message, worker_id, job, stage, "unknown worker")
        w.last_seen = now
        j = self._jobs.get(job)
        if j is None:
            return Stale(message, worker_id, job, stage, "unknown job")
        if j.state in TERMINAL:
            return Stale(message, worker_id, job, stage, f"job {j.state}")
        task = j.tasks.get(stage)
        if task is None:
            return Stale(message, worker_id, job, stage, "no such stage in the job")
        if task.state not in _BOUND or task.worker != worker_id:
            return Stale(message, worker_id, job, stage, f"task is {task.state} on {task.worker}")
        return task

    def _start(self, task: _Task, at: float, out: list[Command], resumed_from_step: int | None = None) -> None:
        self._set(task, RUNNING)
        task.started = at
        task.alive = max(task.alive, at)
        data = {"stage": task.stage, "worker": task.worker, "attempt": task.attempt}
        if resumed_from_step:
            data["resumed_from_step"] = resumed_from_step
        out.append(JobEvent(task.job, "stage_started", data))

    def _enqueue(self, task: _Task, now: float) -> None:
        self._set(task, QUEUED)
        task.worker = None
        task.queued = now
        task.assigned = task.started = task.finished = None
        task.token = next(self._seq)
        # oldest job first, then order of arrival: FIFO across jobs, and a retry
        # does not lose its place to jobs submitted after it
        heapq.heappush(self._heaps[task.stage], (self._jobs[task.job].seq, task.token, task.key))
        self._queued[task.stage][task.key] = task
        self._signals[task.stage].arrivals += 1

    def _dequeue(self, task: _Task) -> None:
        del self._queued[task.stage][task.key]  # its heap entry goes stale

    def _peek(self, stage: str) -> _Task | None:
        """The next queued task of a stage, skipping heap entries gone stale."""
        heap, queued = self._heaps[stage], self._queued[stage]
        while heap:
            _, token, key = heap[0]
            task = queued.get(key)
            if task is not None and task.token == token:
                return task
            heapq.heappop(heap)
        return None

    def _pick(self, stage: str, now: float, avoid: str | None) -> _Worker | None:
        """Least-loaded live, non-draining worker with room; ties go to the earliest
        registered; the worker a retry failed on only if no other has room."""
        best: _Worker | None = None
        best_rank: tuple[bool, int] | None = None
        for w in self._workers.values():  # registration order
            if (
                w.stage == stage and not w.draining and w.load < w.capacity
                and now - w.last_seen <= self.liveness
            ):
                rank = (w.id == avoid, w.load)
                if best_rank is None or rank < best_rank:
                    best, best_rank = w, rank
        return best

    def _dispatch(self, now: float, out: list[Command]) -> None:
        """Bind queued tasks to workers with room, oldest job first, stage by stage."""
        for stage in self._stage_order:
            while (task := self._peek(stage)) is not None:
                w = self._pick(stage, now, task.avoid)
                if w is None:
                    break
                heapq.heappop(self._heaps[stage])
                del self._queued[stage][task.key]
                self._bind(task, w, now, out)

    def _bind(self, task: _Task, w: _Worker, now: float, out: list[Command]) -> None:
        j = self._jobs[task.job]
        self._set(task, ASSIGNED)
        task.worker = w.id
        task.assigned = task.alive = now
        w.tasks[task.key] = None
        if j.state == QUEUED:
            self._set_job(j, RUNNING)
        wf = j.workflow
        body: dict[str, Any] = {
            "job": j.id,
            "workflow": wf.name,
            "stage": task.stage,
            "attempt": task.attempt,
            "binding": task.token,  # this binding's id: the data sent for it carries it
            "params": j.params,
            "inputs": [{"stage": up, "names": list(wf.stages[up].outputs)} for up in task.spec.after],
        }
        if not task.spec.after and j.payload is not None:
            body["payload"] = j.payload
        resume = self._resume(task)
        if task.spec.progress:  # step-wise work: where it may leave checkpoints (invariant 11)
            keeper = resume or next((j.tasks[up] for up in task.spec.after if j.tasks[up].held), None)
            if keeper is not None:
                holder = self._workers[keeper.worker]
                body["checkpoint_to"] = {"worker": holder.id, "stage": keeper.stage,
                                         "descriptor": holder.descriptor}
        if resume is not None:
            body["resume_step"] = task.saved[2]
        out.append(ToWorker(w.id, "TASK", body))
        assigned = {"stage": task.stage, "worker": w.id, "attempt": task.attempt}
        if resume is not None:
            assigned["resume_from_step"] = task.saved[2]
        out.append(JobEvent(j.id, "stage_assigned", assigned))
        for up in task.spec.after:
            producer = j.tasks[up]
            if producer.held:
                out.append(self._send(producer, task, now))

    def _bindable(self, task: _Task) -> bool:
        """A pending task is queued once an upstream finished (its inputs then stream to it while
        the others compute), but not while a step-wise upstream still runs: a Wan2.2 low-noise
        expert bound at the start of its job's high-noise phase would hold its GPU idle for it."""
        j = self._jobs[task.job]
        return all(j.tasks[up].state == DONE for up in task.spec.after if j.workflow.stages[up].progress)

    def _resume(self, task: _Task) -> _Task | None:
        """The upstream task whose holder keeps ``task``'s last checkpoint, if it still does."""
        if task.saved is None:
            return None
        holder, upstream, _ = task.saved
        producer = self._jobs[task.job].tasks[upstream]
        if producer.held and producer.worker == holder and holder in self._workers:
            return producer
        task.saved = None  # its holder was lost or released it: the state went with it
        return None

    def _send(self, producer: _Task, consumer: _Task, now: float) -> ToWorker:
        to = self._workers[consumer.worker]
        consumer.alive = max(consumer.alive, now)  # its inputs are on their way: its clock starts again
        body = {
            "job": producer.job,
            "stage": producer.stage,
            "to": to.id,
            "to_stage": consumer.stage,
            "descriptor": to.descriptor,
            "names": list(producer.spec.outputs),
            "binding": consumer.token,
        }
        if self._resume(consumer) is producer:
            body["resume_step"] = consumer.saved[2]  # ship the consumer's checkpoint with the inputs (11)
        return ToWorker(producer.worker, "SEND", body)

    def _unbind(self, task: _Task) -> None:
        w = self._workers.get(task.worker) if task.worker is not None else None
        if w is not None:
            w.tasks.pop(task.key, None)

    def _release(self, task: _Task, out: list[Command]) -> None:
        """Tell the holder to drop its outputs; a lost holder has nothing to drop."""
        w = self._workers.get(task.worker)
        if w is not None and task.key in w.holding:
            del w.holding[task.key]
            out.append(ToWorker(w.id, "RELEASE", {"job": task.job, "stage": task.stage}))
        task.held = False

    def _settle(self, producer: _Task, now: float, out: list[Command]) -> None:
        """Once every consumer of ``producer`` is done, its outputs are not needed:
        release them, or stop a re-run that was started to replace lost ones."""
        j = self._jobs[producer.job]
        if not all(j.tasks[c].state == DONE for c in j.workflow.downstream(producer.stage)):
            return
        if producer.held:
            self._release(producer, out)
        elif producer.state == QUEUED:
            self._dequeue(producer)
            self._set(producer, DONE)
            producer.finished = now
        elif producer.state in _BOUND:
            out.append(ToWorker(producer.worker, "CANCEL", {"job": producer.job, "stage": producer.stage}))
            self._unbind(producer)
            self._set(producer, DONE)
            producer.finished = now

    def _retry(self, task: _Task, why: str, now: float, out: list[Command], count: bool = True) -> None:
        """Put a bound task (or a finished one whose outputs are gone) back in its queue,
        or fail the job if a counted failure reaches max_attempts. Inputs it needs that
        are gone are made again (lineage, invariant 6)."""
        j = self._jobs[task.job]
        self._unbind(task)
        task.avoid = task.worker
        if count:  # an attempt is spent by a failure, a crash or a stall; re-making lost outputs spends none
            if task.attempt >= self.max_attempts:
                self._fail(j, task, f"stage {task.stage} failed after {task.attempt} attempts: {why}", now, out)
                return
            task.attempt += 1
        task.error = why
        self._enqueue(task, now)
        self._signals[task.stage].retries += 1
        out.append(JobEvent(j.id, "stage_retry", {"stage": task.stage, "attempt": task.attempt, "reason": why}))
        for up in task.spec.after:
            u = j.tasks[up]
            if u.state == DONE and not u.held:  # released, or its holder was lost
                self._retry(u, f"its outputs are needed again: {task.stage} re-runs ({why})", now, out, count=False)

    def _needed(self, producer: _Task) -> bool:
        """Some consumer still waits for the producer's outputs to be delivered."""
        j = self._jobs[producer.job]
        return any(j.tasks[c].state in _WAITING for c in j.workflow.downstream(producer.stage))

    def _deadline_fail(self, j: _Job, culprit: _Task, reason: str, now: float, out: list[Command]) -> None:
        if culprit.state in _BOUND:  # the worker is alive (or would have been lost): stop it
            out.append(ToWorker(culprit.worker, "CANCEL", {"job": j.id, "stage": culprit.stage}))
        elif culprit.state == QUEUED:
            self._dequeue(culprit)
        self._fail(j, culprit, reason, now, out)

    def _fail(self, j: _Job, culprit: _Task, reason: str, now: float, out: list[Command]) -> None:
        self._unbind(culprit)
        if culprit.held:
            self._release(culprit, out)
        self._set(culprit, FAILED)
        culprit.error = reason
        culprit.finished = now
        self._end(j, FAILED, now, out, {"reason": reason, "stage": culprit.stage})

    def _end(self, j: _Job, state: str, now: float, out: list[Command], data: dict) -> None:
        """Terminal state: drop queued tasks, cancel bound ones, release held outputs."""
        self._set_job(j, state)
        j.finished = now
        j.reason = data.get("reason")
        for t in j.tasks.values():
            if t.state == QUEUED:
                self._dequeue(t)
                self._set(t, CANCELLED)
            elif t.state == PENDING:
                self._set(t, CANCELLED)
            elif t.state in _BOUND:
                if t.worker in self._workers:  # a lost worker needs no CANCEL
                    out.append(ToWorker(t.worker, "CANCEL", {"job": j.id, "stage": t.stage}))
                self._unbind(t)
                self._set(t, CANCELLED)
                t.finished = now
            if t.held:
                self._release(t, out)
        j.payload = None  # no re-run can need it any more
        out.append(JobEvent(j.id, state, data))

    def _lose(self, w: _Worker, why: str, now: float, out: list[Command], graceful: bool = False) -> None:
        """Remove a worker. Its bound tasks go back to the queue (a graceful leave counts
        no attempt for tasks that had not started); outputs it held that a consumer still
        waits for are re-made at once, others only if a consumer must run again (6)."""
        del self._workers[w.id]
        bound, held = list(w.tasks), list(w.holding)
        w.tasks.clear()
        w.holding.clear()
        for key in bound:
            t = self._task(key)
            if t.state in _BOUND and t.worker == w.id:  # an earlier retry may have ended the job
                self._retry(t, why, now, out, count=not graceful or t.state == RUNNING)
        for key in held:
            t = self._task(key)
            if t.held and t.worker == w.id:
                t.held = False
                if self._needed(t):
                    self._retry(t, f"{why}; it held the outputs of {t.stage}", now, out, count=False)
