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
If the broker goes silent for longer than its liveness, the worker
reconnects and registers again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq

from broker import protocol
from broker.control import ControlSocket
from onepiece.heap import freeze_startup_heap
from transports import PeerGone, TransportError, open_transport

from .kinds import StageCancelled, StageFailed, StageKind, StageOutput, TaskContext, make_stage
from .workflow import Workflow

log = logging.getLogger("onepiece.worker")

EARLY_DATA_TTL_S = 300.0  # inputs that arrive before their TASK wait this long at most
DRAIN_TIMEOUT_S = 600.0
SEND_ATTEMPTS = 2


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
                                       dtype=settings.dtype)
        self.capacity = max(1, settings.capacity)
        self.results_dir = Path(settings.results_dir)
        self.tasks: dict[tuple[str, str], _Task] = {}
        self.early: dict[tuple[str, str], tuple[float, dict[str, dict[str, torch.Tensor]]]] = {}
        self.held: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.senders: dict[str, object] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
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
        await loop.run_in_executor(self._executor, self.kind.load)
        if self._draining:  # told to leave while loading: it never registered, nothing to hand back
            await self._stopped.wait()
            await self._close()
            return 0
        self.transport = await open_transport(self.settings.transport,
                                              **transport_options(self.settings, self.settings.transport))
        if self._freeze_heap:
            freeze_startup_heap()
        self._connect()
        loops = [loop.create_task(self._data(), name="data"),
                 loop.create_task(self._heartbeat(), name="heartbeat")]
        try:
            await self._stopped.wait()
        finally:
            for t in loops + list(self._background):
                t.cancel()
            await asyncio.gather(*loops, *self._background, return_exceptions=True)
            await self._close()
        return 0

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            self._stopped.set()
            return
        self.drain()

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
            try:
                await sender.aclose()
            except TransportError:
                pass
        if self.transport is not None:
            await self.transport.aclose()
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
        sock.connect(self.settings.control)
        self._ctl = ControlSocket(sock, routed=False, on_message=self._on_control,
                                  on_bad=lambda _peer, reason: log.warning("bad control message from the broker: %s",
                                                                           reason))
        self._last_broker = time.monotonic()
        self._send("REGISTER", stage=self.stage, capacity=self.capacity, descriptor=self.transport.descriptor,
                   info={**self.kind.info(), "pid": os.getpid(), "host": socket.gethostname(),
                         "gpu": self.spec.gpu})

    def _send(self, kind: str, **fields) -> None:
        """Queue a message to the broker; what a loop turn queued leaves in one frame.
        PROGRESS and HEARTBEAT wait (briefly) for company: nothing waits on them."""
        if self._ctl is not None:  # None: not connected yet (a signal while the model loads)
            self._ctl.send(protocol.pack(kind, **fields), urgent=kind not in ("PROGRESS", "HEARTBEAT"))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if self._left:
                return
            silent = time.monotonic() - self._last_broker
            if silent > self.settings.heartbeat_s * self.settings.liveness:
                log.warning("broker silent for %.1f s: reconnecting", silent)
                self._reset()
                self._connect()
                continue
            stats = {**self.transport.stats(), "transport": self.transport.name}
            self._send("HEARTBEAT", load=len(self.tasks), stats=stats)

    def _reset(self) -> None:
        """Forget everything the broker assigned: a new broker incarnation re-plans it."""
        for task in self.tasks.values():
            if task.ctx is not None:
                task.ctx.cancelled.set()
        self.tasks.clear()
        self.held.clear()
        self.early.clear()

    def _on_control(self, _peer: None, m: dict) -> None:
        self._last_broker = time.monotonic()
        kind = m["k"]
        if kind == "TASK":
            self._on_task(m)
        elif kind == "SEND":
            self._on_send(m)
        elif kind == "RELEASE":
            self.held.pop((m["job"], m["stage"]), None)
        elif kind == "CANCEL":
            self._on_cancel(m["job"], m["stage"])
        elif kind == "DRAIN":
            self.drain()
        elif kind == "REGISTERED":
            log.info("worker %s registered with the broker for %s", self.id, self.stage)
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
        _, early = self.early.pop(key, (0.0, {}))
        for upstream, tensors in early.items():
            self._add_input(task, upstream, tensors)
        self._maybe_start(task)

    def _on_cancel(self, job: str, stage: str) -> None:
        self.held.pop((job, stage), None)
        self.early.pop((job, stage), None)
        task = self.tasks.get((job, stage))
        if task is None:
            return
        if task.running:
            task.ctx.cancelled.set()  # the stage stops at its next step
        else:
            del self.tasks[(job, stage)]

    # -- data plane -------------------------------------------------------------------
    async def _data(self) -> None:
        while True:
            try:
                msg = await self.transport.recv()
            except PeerGone as exc:
                # An upstream died mid-transfer; the broker re-sends or re-runs it.
                log.warning("%s", exc)
                continue
            except TransportError as exc:
                log.warning("data plane: %s", exc)
                continue
            h = msg.header
            job, stage, upstream = h.get("job"), h.get("stage"), h.get("from")
            # Copy out of the ring: the stage runs in another thread for a while.
            tensors = msg.detach()
            if not all(isinstance(x, str) for x in (job, stage, upstream)) or stage != self.stage:
                log.warning("dropped a data message with header %r", h)
                continue
            task = self.tasks.get((job, stage))
            if task is None:
                self._expire_early()
                self.early.setdefault((job, stage), (time.time(), {}))[1][upstream] = tensors
                continue
            self._add_input(task, upstream, tensors)
            self._maybe_start(task)

    def _expire_early(self) -> None:
        cutoff = time.time() - EARLY_DATA_TTL_S
        for key in [k for k, (t, _) in self.early.items() if t < cutoff]:
            log.warning("dropping inputs of %s/%s: no task arrived for them", *key)
            del self.early[key]

    def _add_input(self, task: _Task, upstream: str, tensors: dict[str, torch.Tensor]) -> None:
        if upstream not in task.expected:
            log.warning("job %s: unexpected input from %s", task.job, upstream)
            return
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

        task.ctx = TaskContext(task.job, task.stage, task.body["params"], task.body.get("payload"),
                               self.results_dir, on_progress=progress)
        self._send("STARTED", job=task.job, stage=task.stage)
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
        try:
            out: StageOutput = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.kind.run, task.inputs, task.ctx)
        except Exception as exc:  # noqa: BLE001 - any crash of a stage is reported, not fatal
            self._failed(task, exc)
            return
        self._finished(task, out, t0)

    def _failed(self, task: _Task, exc: Exception) -> None:
        if isinstance(exc, StageCancelled):
            log.info("job %s: %s cancelled", task.job, task.stage)
            self.tasks.pop((task.job, task.stage), None)
        elif isinstance(exc, StageFailed):
            self._fail(task, str(exc), retryable=False)
        else:
            log.error("job %s: %s crashed", task.job, task.stage, exc_info=exc)
            self._fail(task, f"{type(exc).__name__}: {exc}", retryable=True)

    def _finished(self, task: _Task, out: StageOutput, t0: float) -> None:
        key = (task.job, task.stage)
        run_s = time.time() - t0
        if self.tasks.pop(key, None) is None or task.ctx.cancelled.is_set():
            return  # cancelled or re-planned while it ran
        if out.tensors:
            self.held[key] = out.tensors
        timings = {"wait_s": round(t0 - task.received_at, 6), "run_s": round(run_s, 6),
                   "out_bytes": sum(t.numel() * t.element_size() for t in out.tensors.values())}
        self._send("DONE", job=task.job, stage=task.stage, timings=timings, **({"result": out.result}
                                                                               if out.result else {}))

    def _fail(self, task: _Task, reason: str, retryable: bool) -> None:
        self.tasks.pop((task.job, task.stage), None)
        if not task.ctx.cancelled.is_set():
            self._send("FAILED", job=task.job, stage=task.stage, reason=reason, retryable=retryable)

    def _on_send(self, m: dict) -> None:
        key = (m["job"], m["stage"])
        tensors = self.held.get(key)
        if tensors is None:
            log.warning("SEND for %s/%s but its outputs are not held here", *key)
            return
        names = [n for n in m["names"] if n in tensors] or list(tensors)
        header = {"job": m["job"], "stage": m["to_stage"], "from": m["stage"]}
        out = {n: tensors[n] for n in names}
        peer = str(m["descriptor"].get("id", m["to"]))
        sender = self.senders.get(peer)
        try:
            if sender is not None and sender.try_send(header, out):
                return  # there was room at once: sent without a task of its own
        except TransportError:
            pass  # the full path below reconnects
        self._spawn(self._send_outputs(m, peer, header, out))

    async def _send_outputs(self, m: dict, peer: str, header: dict, tensors: dict[str, torch.Tensor]) -> None:
        for attempt in range(SEND_ATTEMPTS):
            try:
                async with self._connecting.setdefault(peer, asyncio.Lock()):
                    sender = self.senders.get(peer)
                    if sender is None:
                        sender = self.senders[peer] = await self.transport.connect(m["descriptor"])
                await sender.send(header, tensors)
                return
            except TransportError as exc:
                self.senders.pop(peer, None)
                log.warning("send of %s/%s to %s failed (attempt %d): %s", m["job"], m["stage"], m["to"],
                            attempt + 1, exc)
        # The broker notices a dead consumer by its heartbeats and re-binds;
        # the outputs stay held for the SEND that follows.


async def serve(settings, workflow: Workflow, stage: str) -> int:
    """Run one worker until it is drained or killed."""
    return await Worker(settings, workflow, stage).run()
