"""The stage worker runtime: one process serves one stage of a workflow.

It loads its stage's model, opens its data-plane endpoint, connects a
DEALER to the broker and registers with the endpoint's descriptor. Then:

* TASK and the task's input tensors may arrive in either order; a task runs
  (in a thread, so heartbeats and transfers go on) once every upstream
  stage's tensors have arrived;
* its outputs are *held* until the broker says RELEASE, and sent wherever a
  SEND names: a consumer that dies costs a re-send, never the job;
* DONE carries timings (and the job's result from the result stage);
  FAILED says whether a retry elsewhere may help;
* CANCEL stops a running task at its next step (denoise checks each step);
* SIGTERM drains: no new work, finish what runs, wait until held outputs
  are released, say DISCONNECT, exit 0. A second signal exits at once.
  A running task whose TASK names a ``checkpoint_to`` (a step-wise stage such
  as denoise) is not finished but handed off at its next step boundary: its
  state goes to that holder and HANDOFF tells the broker, which binds the
  task elsewhere, where it resumes (broker/core.py, invariant 11).
* Checkpoints: such a task also leaves its state with ``checkpoint_to``
  every ``checkpoint_steps`` steps or ``checkpoint_s`` seconds (whichever
  comes first; one in flight at a time) and says CHECKPOINT. As a holder, a
  worker keeps the newest checkpoint per (job, stage) of jobs whose outputs
  it holds, within ``checkpoint_bytes`` (oldest dropped first), drops them
  with those outputs, and ships one with the outputs to that stage's next
  worker (as ``resume.*`` tensors, waiting up to ``CHECKPOINT_WAIT_S`` for
  the one a SEND's ``resume_step`` names).
If the broker goes silent for longer than its liveness, the worker
reconnects and registers again.

Data nobody asked for is bounded. Inputs that arrive before their TASK wait
in ``early``, at most ``orphan_bytes`` of them (oldest dropped first) for at
most ``orphan_ttl_s``; inputs for a task that already ended here (a late
re-send) or that is already running are dropped at once. Every TASK and the
data sent for it carry the broker's ``binding`` id, so inputs sent for an
earlier binding of the same task are never taken for the current one's, and a
re-send that beats its TASK here is kept for it. A TASK whose early inputs
were dropped is answered FAILED (retryable), so the broker re-binds it and its
producers send again, instead of waiting for inputs that never come.
Held outputs are released by RELEASE/CANCEL. A SEND for outputs this worker
does not hold is answered FAILED (retryable): the broker re-makes them. A
send that fails after its attempts keeps the outputs and is answered FAILED
naming the consumer it could not reach (``to``): the broker binds that
consumer elsewhere and SENDs again. The heartbeat reports
``orphans_dropped``, ``orphan_bytes_dropped`` and ``orphan_bytes_held``.

Every wait in the worker and its bound:

===========================================  ====================================================
wait                                         bound
===========================================  ====================================================
loading the stage's model (a daemon thread)  ``load_timeout_s``, then exit 1 (no registration)
opening the data-plane endpoint              ``connect_timeout_s``, then exit 1
the worker's life (``_stopped``)             until drained (below) or a second signal
the broker's next message                    ``heartbeat_s * liveness``, then reconnect and register
                                             again (a new incarnation: everything is forgotten)
the next data-plane message                  ``heartbeat_s`` per ``recv`` (then loop again; early
                                             inputs expire meanwhile)
a task's inputs                              the broker's progress bound (it CANCELs, re-binds);
                                             inputs dropped before their TASK: FAILED at once
a task's run (executor thread)               ``task_timeout_s``, then FAILED retryable and the
                                             cancel flag set (the thread ends at its next check)
connecting to a consumer (lock + handshake)  ``connect_timeout_s`` per attempt
sending outputs                              ``send_timeout_s`` per attempt, ``SEND_ATTEMPTS``
                                             attempts, then FAILED naming the consumer
drain: tasks to end, held outputs released   ``DRAIN_TIMEOUT_S``, then DISCONNECT anyway
a handoff: the next step boundary            the stage's step time; the state's send ``send_timeout_s``
a SEND's checkpoint not yet arrived          ``CHECKPOINT_WAIT_S``, then the outputs go without it
an output tensor granted by the consumer     ``OUTPUT_GRANT_S``, then an ordinary tensor
stopping: cancelled loops and sends          ``CLOSE_TIMEOUT_S``
closing each sender and the endpoint         ``CLOSE_TIMEOUT_S`` each
heartbeat period, drain poll, DISCONNECT     fixed sleeps (``heartbeat_s``, 50 ms)
===========================================  ====================================================
Control-plane sends never wait (``broker.control.ControlSocket`` queues them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import zmq

from broker import protocol
from broker.control import ControlSocket
from onepiece import credentials
from onepiece.heap import freeze_startup_heap
from onepiece.results import open_store
from transports import PeerGone, TransportError, TransportTimeout, open_transport

from .kinds import StageCancelled, StageFailed, StageKind, StageOutput, TaskContext, make_stage
from .workflow import Workflow

log = logging.getLogger("onepiece.worker")

DRAIN_TIMEOUT_S = 600.0
SEND_ATTEMPTS = 2
CLOSE_TIMEOUT_S = 10.0  # closing a sender or the endpoint, and cancelled tasks ending, at shutdown
KEYS_REMEMBERED = 16384  # ended tasks, and tasks whose early inputs were dropped, remembered (each)
EARLY_MESSAGES = 16384  # early messages kept at most, whatever their size (empty ones too)
CHECKPOINT_WAIT_S = 2.0  # a SEND whose resume_step names a checkpoint still on its way waits this long
OUTPUT_GRANT_S = 2.0  # a stage asking for an output tensor in its likely consumer's memory waits this long
RESUME = "resume."  # prefix of the checkpoint tensors a holder ships with its outputs
RESUME_STEP = "resume.step"  # ... and of the step they are from (a 0-d int64 tensor)

Key = tuple[str, str]  # (job, stage)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _same(a: int | None, b: int | None) -> bool:
    """Whether two bindings may be the same one (None: a peer that does not say)."""
    return a is None or b is None or a == b


def _remember(keys: OrderedDict, key: Key, value: int | None = None) -> None:
    keys[key] = value
    keys.move_to_end(key)
    while len(keys) > KEYS_REMEMBERED:
        keys.popitem(last=False)


def _in_daemon_thread(fn) -> asyncio.Future:
    """``fn()`` in a daemon thread of its own: a call that never returns cannot keep the
    process from exiting once the caller stopped waiting for it."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=body, name=getattr(fn, "__qualname__", "call"), daemon=True).start()
    return fut


@dataclass
class _Early:
    """Inputs of a (job, stage) that arrived before its TASK."""

    at: float  # time.monotonic() of the first of them
    binding: int | None  # the binding they were sent for (None: a sender that does not say)
    inputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # upstream -> tensors
    nbytes: int = 0


@dataclass
class _Task:
    job: str
    stage: str
    body: dict
    expected: set[str]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    arrived: set[str] = field(default_factory=set)
    received_at: float = field(default_factory=time.time)
    ctx: TaskContext | None = None
    running: bool = False
    resume: dict[str, torch.Tensor] | None = None  # a checkpoint to continue from
    resume_step: int = 0  # the step its holder says it is of (the stage checks it before use)
    saved_step: int = 0  # the step of its last checkpoint sent, and when
    saved_at: float = field(default_factory=time.monotonic)
    saving: bool = False  # a checkpoint is on its way
    handed_off: bool = False  # it stopped at a step boundary to be handed off

    @property
    def binding(self) -> int | None:
        return self.body.get("binding")


@dataclass
class _Checkpoint:
    """The newest state another worker's task left here: kept while this worker holds
    ``held`` (the outputs of the job that task reads)."""

    step: int
    tensors: dict[str, torch.Tensor]
    nbytes: int
    held: Key


def _named(tensor: str, output: str) -> bool:
    """Whether tensor ``tensor`` belongs to the declared output ``output``: the tensor of that
    name, or one of the group it names (``state`` covers ``state.latents``, ...)."""
    return tensor == output or tensor.startswith(output + ".")


def advertised_host(settings) -> str | None:
    """The address peers should use; "auto" = this host's address on the route to the broker.

    "auto" is what scaled containers need: the service name would resolve to
    any replica, the container's own address only to itself.
    """
    if settings.advertise_host != "auto":
        return settings.advertise_host
    broker_host = settings.control.split("://", 1)[-1].rsplit(":", 1)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(broker_host), 9))  # no packet is sent: this only picks a route
        return s.getsockname()[0]


def transport_options(settings, name: str) -> dict:
    """Options of the chosen transport from the settings (each medium takes its own)."""
    opts = {"host": settings.data_host, "advertise_host": advertised_host(settings)}
    if name in ("shm", "rdma", "auto"):
        opts["ring_bytes"] = settings.ring_bytes
        opts["grant_bytes"] = settings.grant_bytes
    rdma = {"device": settings.rdma_device, "port": settings.rdma_port, "gid_index": settings.rdma_gid_index}
    if name == "rdma":
        opts.update(rdma)
    elif name == "auto":
        opts["rdma"] = rdma
    return opts


class Worker:
    """A stage service process (see the module docstring)."""

    def __init__(self, settings, workflow: Workflow, stage: str, *, kind: StageKind | None = None,
                 worker_id: str | None = None, freeze_heap: bool = False):
        """``freeze_heap``: once the model is loaded, exempt the heap from the garbage
        collector's full passes (``onepiece.heap``); only for a process of its own."""
        if stage not in workflow.stages:
            raise ValueError(f"workflow {workflow.name} has no stage {stage!r}; "
                             f"stages: {', '.join(workflow.stages)}")
        self.settings = settings
        self.workflow = workflow
        self.spec = workflow.stages[stage]
        self.stage = stage
        self.id = worker_id or f"{stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.kind = kind or make_stage(self.spec, model=settings.model, device=settings.device,
                                       dtype=settings.dtype, sp=settings.sp)
        self.capacity = max(1, settings.capacity)
        self.results = open_store(settings)  # where the result stage's output goes (onepiece/results.py)
        self.tasks: dict[Key, _Task] = {}
        # Inputs that came before their TASK, oldest first; bounded by orphan_bytes/orphan_ttl_s.
        self.early: dict[Key, _Early] = {}
        self._early_bytes = 0
        self._early_messages = 0
        self._data_key: bytes | None = None  # from REGISTERED: data sent here must carry its credential
        self.refused = 0  # data-plane messages refused for want of a credential
        self.orphans_dropped = 0  # data-plane messages dropped unused (and their bytes)
        self.orphan_bytes_dropped = 0
        # bindings (see broker.protocol) that ended here: inputs that come later for them are late
        self._ended: OrderedDict[Key, int | None] = OrderedDict()
        # bindings whose inputs were dropped before their TASK came (None: a sender that did not say)
        self._lost_inputs: OrderedDict[Key, int | None] = OrderedDict()
        self.held: dict[Key, dict[str, torch.Tensor]] = {}
        self.checkpoints: OrderedDict[Key, _Checkpoint] = OrderedDict()  # (job, consumer stage), oldest first
        self._checkpoint_bytes = 0
        self._sends: dict[Key, dict[str, int]] = {}  # held key -> consumer stage -> number of its latest SEND
        self._send_seq = 0
        self.senders: dict[str, object] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        # Zero-copy production: the consumer this stage's outputs went to last (the likely next one),
        # and the output tensors granted by a consumer per held task, given back at RELEASE.
        self._last_consumer: str | None = None
        self._granted: dict[Key, list[tuple[object, torch.Tensor]]] = {}
        self.outputs_granted = 0  # output tensors a consumer granted (heartbeat stats)
        self.transport = None
        self._executor = concurrent.futures.ThreadPoolExecutor(self.capacity, thread_name_prefix=f"{stage}-run")
        self._ctx = zmq.Context()
        self._ctl: ControlSocket | None = None
        self._last_broker = time.monotonic()
        self._draining = False
        self._left = False  # DISCONNECT sent: no heartbeat or re-registration after it
        self._stopped = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._signals = 0
        self._freeze_heap = freeze_heap

    # -- lifecycle ----------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal)
            except (NotImplementedError, RuntimeError):
                pass
        log.info("worker %s loading %s (%s, model %s)", self.id, self.stage, self.spec.kind, self.settings.model)
        loading = _in_daemon_thread(self.kind.load)
        stopping = loop.create_task(self._stopped.wait())
        await asyncio.wait({loading, stopping}, timeout=self.settings.load_timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done() and not self._stopped.is_set():
            loading.cancel()
            log.error("worker %s: loading %s took longer than load_timeout_s (%s s): giving up",
                      self.id, self.stage, self.settings.load_timeout_s)
            await self._close()
            return 1
        if self._draining or self._stopped.is_set():
            # told to leave while loading: it never registered, nothing to hand back (the load
            # runs in a daemon thread: one still running does not hold the exit up)
            loading.cancel()
            await self._stopped.wait()  # set by _drain at once: nothing is in flight
            await self._close()
            return 0
        loading.result()  # a load that failed raises here
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                self.transport = await open_transport(self.settings.transport,
                                                      **transport_options(self.settings, self.settings.transport))
        except TimeoutError:
            log.error("worker %s: opening the %s data plane took longer than connect_timeout_s (%s s)",
                      self.id, self.settings.transport, self.settings.connect_timeout_s)
            await self._close()
            return 1
        if self._freeze_heap:
            freeze_startup_heap()
        self._connect()
        loops = [loop.create_task(self._data(), name="data"),
                 loop.create_task(self._heartbeat(), name="heartbeat")]
        try:
            await self._stopped.wait()
        finally:
            pending = loops + list(self._background)
            for t in pending:
                t.cancel()
            _, stuck = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)
            if stuck:
                log.warning("%d task(s) did not stop within %s s: %s", len(stuck), CLOSE_TIMEOUT_S,
                            ", ".join(t.get_name() for t in stuck))
            await self._close()
        return 0

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            self._stopped.set()
            return
        self.drain()

    def stop(self) -> None:
        """Leave now, without draining (as a second signal does)."""
        self._stopped.set()

    def drain(self) -> None:
        """Finish in-flight work, wait for held outputs to be released, then leave."""
        if not self._draining:
            self._draining = True
            log.info("draining: %d task(s) in flight, %d output(s) held", len(self.tasks), len(self.held))
            self._spawn(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (self.tasks or self.held) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.tasks or self.held:
            log.warning("drain timed out with tasks %s and held outputs %s", list(self.tasks), list(self.held))
        self._left = True
        self._send("DISCONNECT")
        await asyncio.sleep(0.05)  # let the DISCONNECT leave before the socket closes
        self._stopped.set()

    async def _close(self) -> None:
        for sender in list(self.senders.values()):
            await self._close_sender(sender)
        self.senders.clear()
        if self.transport is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.transport.aclose()
            except (TransportError, TimeoutError) as exc:
                log.warning("closing the data plane: %r", exc)
        if self._ctl is not None:
            self._ctl.close()
        self._ctx.term()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- control plane ----------------------------------------------------------------
    def _connect(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        if self.settings.curve_broker is not None:  # CURVE: this worker's key, the broker's public one
            from broker.curve import secure_client

            secure_client(sock, self.settings.curve_secret, self.settings.curve_broker)
        sock.connect(self.settings.control)
        self._ctl = ControlSocket(sock, routed=False, on_message=self._on_control,
                                  on_bad=lambda _peer, reason: log.warning("bad control message from the broker: %s",
                                                                           reason))
        self._last_broker = time.monotonic()
        self._send("REGISTER", stage=self.stage, capacity=self.capacity, descriptor=self.transport.descriptor,
                   kind=self.spec.kind, model=self.spec.model,
                   info={**self.kind.info(), "pid": os.getpid(), "host": socket.gethostname(),
                         "gpu": self.spec.gpu})

    def _send(self, message: str, /, **fields) -> None:
        """Queue a message to the broker; what a loop turn queued leaves in one frame.
        PROGRESS and HEARTBEAT wait (briefly) for company: nothing waits on them."""
        if self._ctl is not None:  # None: not connected yet (a signal while the model loads)
            self._ctl.send(protocol.pack(message, **fields), urgent=message not in ("PROGRESS", "HEARTBEAT"))

    def orphan_stats(self) -> dict[str, int]:
        """Unsolicited and orphaned data-plane data: messages and bytes dropped so far, bytes held now."""
        return {"orphans_dropped": self.orphans_dropped, "orphan_bytes_dropped": self.orphan_bytes_dropped,
                "orphan_bytes_held": self._early_bytes}

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if self._left:
                return
            self._expire_early()
            silent = time.monotonic() - self._last_broker
            if silent > self.settings.heartbeat_s * self.settings.liveness:
                log.warning("broker silent for %.1f s: reconnecting", silent)
                self._reset()
                self._connect()
                continue
            stats = {**self.transport.stats(), "transport": self.transport.name, **self.orphan_stats(),
                     "data_refused": self.refused, "outputs_granted": self.outputs_granted}
            running = [[t.job, t.stage] for t in self.tasks.values() if t.running]
            self._send("HEARTBEAT", load=len(self.tasks), stats=stats, running=running)

    def _reset(self) -> None:
        """Forget everything the broker assigned: a new broker incarnation re-plans it."""
        for task in self.tasks.values():
            if task.ctx is not None:
                task.ctx.cancelled.set()
        self.tasks.clear()
        self.held.clear()
        self._sends.clear()
        self.checkpoints.clear()
        self._checkpoint_bytes = 0
        for key in list(self.early):
            self._drop_early(key, "the worker reset", lost=False)
        self._ended.clear()
        self._lost_inputs.clear()

    def _on_control(self, _peer: None, m: dict) -> None:
        self._last_broker = time.monotonic()
        kind = m["k"]
        if kind == "TASK":
            self._on_task(m)
        elif kind == "SEND":
            self._on_send(m)
        elif kind == "RELEASE":
            self._release((m["job"], m["stage"]))
        elif kind == "CANCEL":
            self._on_cancel(m["job"], m["stage"])
        elif kind == "DRAIN":
            self.drain()
        elif kind == "REGISTERED":
            log.info("worker %s registered with the broker for %s", self.id, self.stage)
            try:  # what peers send here must carry credentials made with it (onepiece.credentials)
                self._data_key = bytes.fromhex(m["data_key"]) if m.get("data_key") else None
            except ValueError:
                log.warning("the broker's data key is not hex: data-plane credentials are not checked")
                self._data_key = None
            self.transport.guard(self._data_key)  # connections must prove a link made with it
        elif kind == "ERROR":
            log.warning("broker: %s", m["reason"])
            if m.get("reregister") and not self._left:  # a late heartbeat after DISCONNECT
                self._reset()
                self._connect()

    def _on_task(self, m: dict) -> None:
        key = (m["job"], m["stage"])
        expected = {i["stage"] for i in m["inputs"] if isinstance(i, dict) and isinstance(i.get("stage"), str)}
        task = _Task(m["job"], m["stage"], m, expected)
        self.tasks[key] = task
        self._ended.pop(key, None)  # assigned (again): its inputs are wanted now
        for upstream, tensors in self._take_early(key, task.binding).items():
            self._add_input(task, upstream, tensors)
        if key in self._lost_inputs:
            lost = self._lost_inputs.pop(key)
            if _same(lost, task.binding) and not task.expected <= task.arrived:
                # Its producers sent before this TASK came and what they sent was dropped: they will
                # not send again unless the broker re-binds the task, so say so now.
                self._end(key)
                reason = (f"inputs of {key[0]}/{key[1]} arrived at worker {self.id} before the task and were "
                          f"dropped (past orphan_bytes {self.settings.orphan_bytes} or orphan_ttl_s "
                          f"{self.settings.orphan_ttl_s}, or taken for a late re-send to an earlier attempt)")
                log.warning("%s: reporting the task failed", reason)
                self._send("FAILED", job=key[0], stage=key[1], reason=reason, retryable=True)
                return
        self._maybe_start(task)

    def _on_cancel(self, job: str, stage: str) -> None:
        key = (job, stage)
        self._release(key)
        if key in self.early:
            self._drop_early(key, "the task was cancelled", lost=False)
        task = self.tasks.get(key)
        if task is not None and task.running:
            task.ctx.cancelled.set()  # the stage stops at its next step; its end is remembered then
        else:
            self._end(key)

    def _end(self, key: Key) -> None:
        """The task is over here: forget it, and drop inputs that still come for it."""
        task = self.tasks.pop(key, None)
        _remember(self._ended, key, task.binding if task is not None else None)
        if key not in self.held:  # failed or cancelled: no output will use its grants
            self._give_back(key)

    def _current(self, task: _Task) -> bool:
        """Whether ``task`` is still this worker's task for its key (not reset or replaced)."""
        return self.tasks.get((task.job, task.stage)) is task

    def _release(self, key: Key) -> None:
        self.held.pop(key, None)
        self._sends.pop(key, None)
        self._give_back(key)
        for ckey in [c for c, cp in self.checkpoints.items() if cp.held == key]:
            self._drop_checkpoint(ckey)

    def _drop_checkpoint(self, key: Key) -> None:
        self._checkpoint_bytes -= self.checkpoints.pop(key).nbytes

    # -- data plane -------------------------------------------------------------------
    async def _data(self) -> None:
        while True:
            try:
                msg = await self.transport.recv(timeout=self.settings.heartbeat_s)
            except TransportTimeout:
                continue  # nothing came: wait again (each wait is bounded)
            except PeerGone as exc:
                # An upstream died mid-transfer; the broker re-sends or re-runs it.
                log.warning("%s", exc)
                continue
            except TransportError as exc:
                log.warning("data plane: %s", exc)
                continue
            try:
                self._on_data(msg)
            except Exception:  # noqa: BLE001 - a fault in one message's handling must not end the data plane
                log.exception("data plane: a message from %s (header %.200r) could not be handled; dropped",
                              msg.peer, msg.header)
                msg.release()

    def _on_data(self, msg) -> None:
        h = msg.header
        job, stage, upstream = h.get("job"), h.get("stage"), h.get("from")
        nbytes = _nbytes(msg.tensors)
        if not all(isinstance(x, str) for x in (job, stage, upstream)) or stage != self.stage:
            self._discard(msg, nbytes, "dropped a data message with header %r", h)
            return
        if self._data_key is not None and not self._authorized(h, job, upstream):
            self.refused += 1
            self._discard(msg, nbytes, "job %s: refused data from %s: no credential from the broker for it "
                          "(a stranger, or a peer never told to send it here)", job, upstream)
            return
        if "checkpoint" in h:
            self._keep_checkpoint(msg, job, upstream, h["checkpoint"], nbytes)
            return
        if any(name.startswith(RESUME) for name in msg.tensors) and not self.spec.progress:
            self._discard(msg, nbytes, "job %s: dropped input from %s: a checkpoint for %s, which takes none",
                          job, upstream, stage)
            return
        key, binding = (job, stage), h.get("binding")
        task = self.tasks.get(key)
        if task is not None and not _same(binding, task.binding):
            if binding < task.binding:  # a late re-send to an earlier binding of this task
                self._discard(msg, nbytes, "job %s: dropped input from %s sent for binding %s of %s, not %s",
                              job, upstream, binding, stage, task.binding)
                return
            task = None  # for a later binding, whose TASK is still on its way: kept below as early inputs
        if task is not None:
            if task.running:
                self._discard(msg, nbytes, "job %s: dropped input from %s: %s is already running", job, upstream,
                              stage)
            elif upstream not in task.expected:
                self._discard(msg, nbytes, "job %s: dropped unexpected input from %s", job, upstream)
            else:
                # Copy out of the ring: the stage runs in another thread for a while.
                self._add_input(task, upstream, msg.detach())
                self._maybe_start(task)
            return
        if key in self._ended and _same(binding, self._ended[key]):
            # A late re-send for a binding that ended here: nobody will read it.
            self._discard(msg, nbytes, "job %s: dropped input from %s: %s already ended here", job, upstream, stage)
            return
        self._keep_early(key, binding, upstream, msg, nbytes)

    def _authorized(self, h: dict, job: str, upstream: str) -> bool:
        """Whether the header carries the credential the broker gave its sender for exactly this."""
        if "checkpoint" in h:
            want = credentials.checkpoint_auth(self._data_key, job, upstream, self.stage)
        else:
            binding = h.get("binding")
            want = credentials.data_auth(self._data_key, job, upstream, self.stage,
                                         binding if isinstance(binding, int) else None)
        return credentials.authentic(h.get("auth"), want)

    def _keep_checkpoint(self, msg, job: str, consumer: str, step, nbytes: int) -> None:
        """Keep the state a task of ``consumer`` left here after ``step`` steps: only for a job
        whose outputs this worker holds (the ones that task reads), the newest per task, within
        ``checkpoint_bytes`` (the oldest dropped first)."""
        held = (job, self.stage)
        if held not in self.held or type(step) is not int or step < 1:
            self._discard(msg, nbytes, "job %s: dropped a checkpoint of %s (step %r): no outputs of the job "
                          "are held here", job, consumer, step)
            return
        key = (job, consumer)
        old = self.checkpoints.get(key)
        if old is not None and old.step >= step:
            self._discard(msg, nbytes, "job %s: dropped a checkpoint of %s at step %d: one of step %d is kept",
                          job, consumer, step, old.step)
            return
        if old is not None:
            self._drop_checkpoint(key)
        bound = self.settings.checkpoint_bytes
        while self.checkpoints and self._checkpoint_bytes + nbytes > bound:
            oldest = next(iter(self.checkpoints))
            log.info("dropped the checkpoint of %s/%s: over checkpoint_bytes (%d)", *oldest, bound)
            self._drop_checkpoint(oldest)
        if nbytes > bound:
            self._discard(msg, nbytes, "job %s: dropped a checkpoint of %s: %d bytes, more than checkpoint_bytes",
                          job, consumer, nbytes)
            return
        self.checkpoints[key] = _Checkpoint(step, msg.detach(), nbytes, held)
        self._checkpoint_bytes += nbytes

    def _discard(self, msg, nbytes: int, why: str, *args) -> None:
        msg.release()
        self.orphans_dropped += 1
        self.orphan_bytes_dropped += nbytes
        log.info(why, *args)

    def _keep_early(self, key: Key, binding: int | None, upstream: str, msg, nbytes: int) -> None:
        """Keep inputs that came before their TASK, within orphan_bytes: the oldest go first."""
        self._expire_early()
        entry = self.early.get(key)
        if entry is not None and not _same(entry.binding, binding):  # only the newest binding's are wanted
            if binding is not None and entry.binding is not None and binding < entry.binding:
                self._discard(msg, nbytes, "job %s: dropped input from %s for an earlier binding of %s",
                              key[0], upstream, key[1])
                return
            self._drop_early(key, "inputs for a later binding came", lost=False)
            entry = None
        if entry is not None and upstream in entry.inputs:  # a repeat: the newer copy replaces it
            old = _nbytes(entry.inputs.pop(upstream))
            entry.nbytes -= old
            self._early_bytes -= old
            self._early_messages -= 1
            self.orphans_dropped += 1
            self.orphan_bytes_dropped += old
        bound = self.settings.orphan_bytes
        if nbytes > bound:
            if entry is not None and not entry.inputs:
                del self.early[key]
            _remember(self._lost_inputs, key, binding)
            self._discard(msg, nbytes, "job %s: dropped %d bytes of input from %s for %s that came before its "
                          "task: more than orphan_bytes (%d)", key[0], nbytes, upstream, key[1], bound)
            return
        while self.early and (self._early_bytes + nbytes > bound or self._early_messages >= EARLY_MESSAGES):
            self._drop_early(next(iter(self.early)), "over orphan_bytes")
        entry = self.early.get(key)
        if entry is None:
            entry = self.early[key] = _Early(time.monotonic(), binding)
        entry.inputs[upstream] = msg.detach()
        entry.nbytes += nbytes
        self._early_bytes += nbytes
        self._early_messages += 1

    def _pop_early(self, key: Key) -> _Early:
        entry = self.early.pop(key)
        self._early_bytes -= entry.nbytes
        self._early_messages -= len(entry.inputs)
        return entry

    def _drop_early(self, key: Key, why: str, lost: bool = True) -> None:
        entry = self._pop_early(key)
        self.orphans_dropped += len(entry.inputs)
        self.orphan_bytes_dropped += entry.nbytes
        if lost:
            _remember(self._lost_inputs, key, entry.binding)
        log.info("dropped inputs of %s/%s from %s (%d bytes) that came before their task: %s",
                 key[0], key[1], ", ".join(entry.inputs) or "nobody", entry.nbytes, why)

    def _take_early(self, key: Key, binding: int | None) -> dict[str, dict[str, torch.Tensor]]:
        entry = self.early.get(key)
        if entry is None:
            return {}
        if not _same(entry.binding, binding):  # sent for another binding of the task
            self._drop_early(key, f"sent for binding {entry.binding}, not {binding}", lost=False)
            return {}
        return self._pop_early(key).inputs

    def _expire_early(self) -> None:
        cutoff = time.monotonic() - self.settings.orphan_ttl_s
        while self.early:
            key, entry = next(iter(self.early.items()))
            if entry.at >= cutoff:
                break
            self._drop_early(key, f"no task came for them within orphan_ttl_s ({self.settings.orphan_ttl_s} s)")

    def _add_input(self, task: _Task, upstream: str, tensors: dict[str, torch.Tensor]) -> None:
        if upstream not in task.expected:
            log.warning("job %s: unexpected input from %s", task.job, upstream)
            self.orphans_dropped += 1
            self.orphan_bytes_dropped += _nbytes(tensors)
            return
        step = tensors.pop(RESUME_STEP, None)
        resume = {k.removeprefix(RESUME): tensors.pop(k) for k in [k for k in tensors if k.startswith(RESUME)]}
        if resume and step is not None and step.numel() == 1 and int(step) > task.resume_step:
            task.resume, task.resume_step = resume, int(step)
        task.inputs.update(tensors)
        task.arrived.add(upstream)

    def _maybe_start(self, task: _Task) -> None:
        if task.running or not task.expected <= task.arrived:
            return
        task.running = True
        loop = asyncio.get_running_loop()

        def progress(step: int, total: int) -> None:
            loop.call_soon_threadsafe(functools.partial(self._send, "PROGRESS", job=task.job, stage=task.stage,
                                                        step=int(step), total=int(total)))

        resumed = None
        if task.resume is not None:  # a checkpoint came with the inputs: say only what will be used
            resumed = self.kind.resumable(task.resume, task.body["params"])
        task.ctx = TaskContext(task.job, task.stage, task.body["params"], task.body.get("payload"),
                               self.results, on_progress=progress,
                               resume=task.resume if resumed is not None else None)
        if not self.kind.inline:  # its thread may wait for a grant; the loop itself must not
            task.ctx.output = functools.partial(self._output, task, loop)
        if task.body.get("checkpoint_to") is not None:
            task.ctx.snapshot = functools.partial(self._snapshot, task, loop)
            task.ctx.yield_now = functools.partial(self._yield_now, task)
        self._send("STARTED", job=task.job, stage=task.stage,
                   **({"resumed_from_step": resumed} if resumed else {}))
        if self.kind.inline:  # microseconds of work: a thread hand-off or a task costs more than it
            t0 = time.time()
            try:
                out = self.kind.run(task.inputs, task.ctx)
            except Exception as exc:  # noqa: BLE001 - reported like any stage's failure
                self._failed(task, exc)
                return
            self._finished(task, out, t0)  # DONE leaves in the same frame as STARTED
        else:
            self._spawn(self._execute(task))

    async def _execute(self, task: _Task) -> None:
        t0 = time.time()
        running = asyncio.get_running_loop().run_in_executor(self._executor, self.kind.run, task.inputs, task.ctx)
        done, _ = await asyncio.wait({running}, timeout=self.settings.task_timeout_s)
        if not done:
            running.cancel()  # the loop stops waiting; the thread ends at the stage's next cancel check
            self._fail(task, f"{task.stage} ran longer than task_timeout_s ({self.settings.task_timeout_s} s) "
                             f"on worker {self.id}", retryable=True)
            task.ctx.cancelled.set()
            return
        try:
            out: StageOutput = running.result()
        except Exception as exc:  # noqa: BLE001 - any crash of a stage is reported, not fatal
            self._failed(task, exc)
            return
        self._finished(task, out, t0)

    def _failed(self, task: _Task, exc: Exception) -> None:
        if isinstance(exc, StageCancelled):
            log.info("job %s: %s cancelled", task.job, task.stage)
            if self._current(task):
                self._end((task.job, task.stage))
        elif isinstance(exc, StageFailed):
            self._fail(task, str(exc), retryable=False)
        else:
            log.error("job %s: %s crashed", task.job, task.stage, exc_info=exc)
            self._fail(task, f"{type(exc).__name__}: {exc}", retryable=True)

    # -- step-boundary state (checkpoints and handoffs) -------------------------------
    def _snapshot(self, task: _Task, loop, done: int, make_state) -> None:
        """Called by the stage's thread after each step: take a checkpoint when one is due."""
        s = self.settings
        due = (s.checkpoint_steps > 0 and done - task.saved_step >= s.checkpoint_steps) or \
              (s.checkpoint_s > 0 and time.monotonic() - task.saved_at >= s.checkpoint_s)
        if not due or task.saving or task.ctx.cancelled.is_set() or task.handed_off:
            return
        task.saving = True
        state = make_state()  # the stage's copy: the loop goes on changing its own tensors
        loop.call_soon_threadsafe(lambda: self._spawn(self._checkpoint(task, done, state)))

    def _yield_now(self, task: _Task) -> bool:
        """Polled at each step boundary: a draining worker hands its step-wise tasks off."""
        if self._draining and not task.ctx.cancelled.is_set():
            task.handed_off = True
        return task.handed_off

    async def _leave_state(self, task: _Task, step: int, state: dict[str, torch.Tensor]) -> bool:
        """Send ``state`` to the holder the task's TASK names; False if it could not be sent."""
        to = task.body["checkpoint_to"]
        header = {"job": task.job, "stage": to["stage"], "from": task.stage, "checkpoint": step}
        if task.body.get("checkpoint_auth") is not None:  # the holder checks it
            header["auth"] = task.body["checkpoint_auth"]
        try:
            await self._deliver(str(to["descriptor"].get("id", to["worker"])), to["descriptor"], header, state,
                                self._credential(task.body.get("checkpoint_link")))
            return True
        except Exception as exc:  # noqa: BLE001 - a checkpoint is an optimisation: log and go on
            log.warning("job %s: the state of %s after step %d could not be left with %s: %r",
                        task.job, task.stage, step, to["worker"], exc)
            return False

    async def _checkpoint(self, task: _Task, step: int, state: dict[str, torch.Tensor]) -> None:
        try:
            if await self._leave_state(task, step, state) and self._current(task) and not task.handed_off:
                task.saved_step, task.saved_at = step, time.monotonic()
                self._send("CHECKPOINT", job=task.job, stage=task.stage, step=step,
                           holder=task.body["checkpoint_to"]["worker"])
        finally:
            task.saving = False

    async def _hand_off(self, task: _Task, state: dict[str, torch.Tensor], step: int) -> None:
        """The task stopped at a step boundary because this worker drains: leave its state
        with the holder, then HANDOFF (step 0 if the state could not be left: it starts over)."""
        step = step if await self._leave_state(task, step, state) else 0
        if self._current(task):
            self._end((task.job, task.stage))
            self._send("HANDOFF", job=task.job, stage=task.stage, step=step)
            log.info("job %s: handed %s off after step %d", task.job, task.stage, step)

    def _finished(self, task: _Task, out: StageOutput, t0: float) -> None:
        key = (task.job, task.stage)
        run_s = time.time() - t0
        if not self._current(task):
            return  # re-planned (reset, or a newer TASK) while it ran
        if out.handoff_step is not None and not task.ctx.cancelled.is_set():
            self._spawn(self._hand_off(task, out.tensors, out.handoff_step))  # the task stays ours until HANDOFF
            return
        self._end(key)
        if task.ctx.cancelled.is_set():
            return  # cancelled while it ran
        if out.tensors:
            self.held[key] = out.tensors
        timings = {"wait_s": round(t0 - task.received_at, 6), "run_s": round(run_s, 6),
                   "out_bytes": sum(t.numel() * t.element_size() for t in out.tensors.values())}
        self._send("DONE", job=task.job, stage=task.stage, timings=timings, **({"result": out.result}
                                                                               if out.result else {}))

    def _fail(self, task: _Task, reason: str, retryable: bool) -> None:
        if not self._current(task):
            return  # re-planned while it ran: the broker expects nothing of this one
        self._end((task.job, task.stage))
        if not task.ctx.cancelled.is_set():
            self._send("FAILED", job=task.job, stage=task.stage, reason=reason[:protocol.REASON - 64],
                       retryable=retryable)

    def _on_send(self, m: dict) -> None:
        key = (m["job"], m["stage"])
        tensors = self.held.get(key)
        if tensors is None:
            if key in self.tasks:  # cannot happen in order (DONE precedes any SEND): nothing is lost yet
                log.warning("SEND for %s/%s while it is still a task here: ignored", *key)
                return
            reason = (f"outputs of {key[0]}/{key[1]} are not held here by worker {self.id} (it restarted, "
                      f"reset, failed to send them or had them released)")
            log.warning("SEND for %s/%s but its outputs are not held here: reporting them lost", *key)
            self._send("FAILED", job=key[0], stage=key[1], reason=reason, retryable=True)
            return
        want = m.get("resume_step") or 0
        kept = self.checkpoints.get((m["job"], m["to_stage"]))
        if want > (kept.step if kept is not None else 0) and not m.get("waited"):
            self._spawn(self._send_when_checkpointed(m, want))
            return
        self._send_seq += 1
        seq = self._send_seq
        self._sends.setdefault(key, {})[m["to_stage"]] = seq
        out = {n: t for n, t in tensors.items() if any(_named(n, want) for want in m["names"])} or dict(tensors)
        if kept is not None:  # the consumer's own state from an earlier attempt: it resumes from it
            out.update({RESUME + n: t for n, t in kept.tensors.items()})
            out[RESUME_STEP] = torch.tensor(kept.step, dtype=torch.int64)
        header = {"job": m["job"], "stage": m["to_stage"], "from": m["stage"]}
        if m.get("binding") is not None:
            header["binding"] = m["binding"]
        if m.get("auth") is not None:  # the consumer checks it (onepiece.credentials)
            header["auth"] = m["auth"]
        peer = str(m["descriptor"].get("id", m["to"]))
        self._last_consumer = peer
        sender = self.senders.get(peer)
        if sender is not None:
            try:
                if sender.try_send(header, out):
                    return  # there was room at once: sent without a task of its own
            except TransportError as exc:  # the full path below reconnects
                log.info("send of %s/%s to %s: %s; reconnecting", *key, m["to"], exc)
                self._forget_sender(peer, sender)
                self._spawn(self._close_sender(sender))
        self._spawn(self._send_outputs(m, peer, header, out, seq))

    async def _send_when_checkpointed(self, m: dict, step: int) -> None:
        """A SEND asks to ship the consumer's checkpoint of ``step``, which is still on its way
        here (a handoff's state races the broker's SEND): wait for it, bounded, then send."""
        key = (m["job"], m["to_stage"])
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        while time.monotonic() < deadline:
            kept = self.checkpoints.get(key)
            if kept is not None and kept.step >= step:
                break
            await asyncio.sleep(0.01)
        else:
            log.info("job %s: the checkpoint of %s at step %d did not come within %s s: sending without it",
                     m["job"], m["to_stage"], step, CHECKPOINT_WAIT_S)
        self._on_send({**m, "waited": True})

    async def _send_outputs(self, m: dict, peer: str, header: dict, tensors: dict[str, torch.Tensor],
                            seq: int) -> None:
        key, to_stage = (m["job"], m["stage"]), m["to_stage"]
        error: BaseException | None = None
        for attempt in range(SEND_ATTEMPTS):
            try:
                await self._deliver(peer, m["descriptor"], header, tensors, self._credential(m.get("link")))
                return
            except Exception as exc:  # noqa: BLE001 - transport errors, timeouts, a bad descriptor: all end below
                error = exc
                log.warning("send of %s/%s to %s failed (attempt %d): %r", m["job"], m["stage"], m["to"],
                            attempt + 1, exc)
        if self._sends.get(key, {}).get(to_stage) != seq:
            return  # released meanwhile, or a newer SEND to that stage decides
        # The outputs are fine and stay held; the consumer's worker is unreachable from here (most
        # likely dead): say which, and the broker binds the consumer elsewhere and SENDs again.
        reason = (f"outputs of {key[0]}/{key[1]} could not be sent to {m['to']} ({to_stage}) after "
                  f"{SEND_ATTEMPTS} attempts: {error!r}")
        self._send("FAILED", job=key[0], stage=key[1], reason=reason[:protocol.REASON - 64], retryable=True,
                   to=m["to"], to_stage=to_stage)

    def _output(self, task: _Task, loop, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Called by the stage's thread for an output it is about to write: a tensor in memory the
        consumer its outputs went to last has granted (zero-copy production, Sender.allocate), so
        if the broker sends this one there too, the bytes are already in place; else, or when no
        grant comes within OUTPUT_GRANT_S, an ordinary tensor. A grant the SEND does not use is
        given back at RELEASE."""
        sender = self.senders.get(self._last_consumer) if self._last_consumer is not None else None
        if sender is None or not sender.zero_copy(math.prod(shape) * dtype.itemsize):
            return torch.empty(shape, dtype=dtype)
        future = asyncio.run_coroutine_threadsafe(sender.allocate(shape, dtype, timeout=OUTPUT_GRANT_S), loop)
        try:
            tensor = future.result(OUTPUT_GRANT_S + 1.0)
        except Exception as exc:  # noqa: BLE001 - a grant is an optimisation: any failure falls back
            future.cancel()
            log.debug("job %s: no granted output tensor from %s (%r); an ordinary one", task.job,
                      self._last_consumer, exc)
            return torch.empty(shape, dtype=dtype)
        key = (task.job, task.stage)

        def keep() -> None:
            self._granted.setdefault(key, []).append((sender, tensor))
            self.outputs_granted += 1

        loop.call_soon_threadsafe(keep)
        return tensor

    def _give_back(self, key: Key) -> None:
        """Grants of ``key``'s output tensors that no send used (another consumer got the outputs)."""
        for sender, tensor in self._granted.pop(key, ()):
            self._spawn(self._return_grant(sender, tensor))

    async def _return_grant(self, sender, tensor: torch.Tensor) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await sender.discard(tensor)
        except (TransportError, TimeoutError) as exc:
            log.debug("giving back a granted output tensor: %r", exc)

    def _credential(self, link: str | None) -> credentials.Credential | None:
        """What this worker shows when it connects to a peer the broker gave it ``link`` for."""
        return None if link is None else credentials.Credential(self.id, link)

    async def _deliver(self, peer: str, descriptor: dict, header: dict, tensors: dict[str, torch.Tensor],
                       credential: credentials.Credential | None) -> None:
        """One bounded send to ``peer`` over its (possibly new) sender; on any failure the sender
        is dropped, so the next attempt connects afresh, and the error is raised."""
        sender = None
        try:
            sender = await self._sender(peer, descriptor, credential)
            async with asyncio.timeout(self.settings.send_timeout_s):
                await sender.send(header, tensors, timeout=self.settings.send_timeout_s)
        except Exception:
            if sender is not None:
                self._forget_sender(peer, sender)
                await self._close_sender(sender)
            raise

    async def _sender(self, peer: str, descriptor: dict, credential: credentials.Credential | None):
        """The open sender to ``peer``, connecting at most once at a time (bounded)."""
        timeout = self.settings.connect_timeout_s
        async with asyncio.timeout(timeout):
            async with self._connecting.setdefault(peer, asyncio.Lock()):
                sender = self.senders.get(peer)
                if sender is None:
                    sender = self.senders[peer] = await self.transport.connect(descriptor, timeout=timeout,
                                                                               credential=credential)
                return sender

    def _forget_sender(self, peer: str, sender) -> None:
        if self.senders.get(peer) is sender:
            del self.senders[peer]

    async def _close_sender(self, sender) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await sender.aclose()
        except (TransportError, TimeoutError) as exc:
            log.debug("closing a sender: %r", exc)


async def serve(settings, workflow: Workflow, stage: str) -> int:
    """Run one worker until it is drained or killed."""
    return await Worker(settings, workflow, stage).run()
