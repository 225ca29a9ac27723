"""The broker process: the ZeroMQ control plane around the pure scheduling core.

``broker.core.Core`` decides; this module does the I/O. One ROUTER socket
receives worker and client messages; each batch of messages is fed to the
core, the resulting commands are sent to workers, recorded in the job store
and published to event subscribers, then the store commits once per batch.
A timer expires silent workers and heartbeats live ones. The REST API
(``broker.api``) runs in the same process and talks to :class:`Broker`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from pathlib import Path

import zmq
import zmq.asyncio

from stages.workflow import Workflow, load_workflow

from . import protocol
from .core import TERMINAL, Core, JobEvent, Stale, ToWorker
from .errors import CoreError, UnknownJob, UnknownWorker
from .metrics import BrokerMetrics
from .store import JobStore

log = logging.getLogger("onepiece.broker")

DRAIN_BATCH = 256  # a batch is one transaction; keep it short so the loop stays fair


class Broker:
    """Control-plane service: worker registry, job routing, job store, events."""

    def __init__(self, settings, workflows: dict[str, Workflow] | None = None):
        self.settings = settings
        self.workflows = workflows or {w.name: w for w in map(load_workflow, settings.workflows)}
        liveness_s = settings.heartbeat_s * settings.liveness
        self.core = Core(self.workflows, heartbeat_liveness_s=liveness_s, max_attempts=settings.max_attempts)
        self.store = JobStore(settings.db_path)
        self.results_dir = Path(settings.results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = BrokerMetrics(self)
        self.endpoint = settings.control
        self._subscribers: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock = None
        self._tx = None
        self._tasks: list[asyncio.Task] = []
        self._worker_stats: dict[str, dict] = {}
        self._replies: list[tuple[str, bytes]] = []  # SUBMITTED, sent once the batch is committed
        self._running: set[str] = set()  # jobs already marked 'running' in the store
        # services that run beside the broker and show in its API: "manager" -> manager.service.Manager
        self.extensions: dict[str, object] = {}

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker keeps its id
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BODY)
        try:
            self._sock.bind(self.settings.control)  # "tcp://host:*" picks a free port
        except zmq.ZMQError as exc:
            raise CoreError(f"cannot bind the control plane on {self.settings.control}: {exc}") from exc
        self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._tx = zmq.Socket.shadow(self._sock.underlying)
        self._requeue_unfinished()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive(), name="broker-rx"),
                       loop.create_task(self._tick(), name="broker-tick")]
        log.info("broker control plane on %s, workflows: %s", self.endpoint, ", ".join(self.workflows))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for queues in self._subscribers.values():
            for q in queues:
                q.put_nowait(None)
        self._subscribers.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._ctx.term()
            self._sock = None
        self.store.close()

    def _requeue_unfinished(self) -> None:
        now = time.time()
        for job_id, workflow, params, payload, _created in self.store.unfinished():
            if workflow not in self.workflows:
                self.store.add_event(job_id, "failed", {"reason": f"workflow {workflow!r} is no longer served"})
                self.store.finish(job_id, "failed", now, f"workflow {workflow!r} is no longer served", None, None)
                continue
            log.warning("re-queueing job %s: the broker stopped while it ran", job_id)
            self.store.add_event(job_id, "requeued", {"reason": "broker restarted"})
            self._apply(self.core.submit(job_id, workflow, params, payload, now))
        self.store.commit()

    # -- facade for the REST API ----------------------------------------------
    def submit(self, workflow: str, params: dict, payload: dict | None = None) -> str:
        """Accept a job; it is durable in the store when this returns. CoreError if refused."""
        job_id = self._accept(workflow, params, payload)
        self.store.commit()
        self._rearm()
        return job_id

    def _accept(self, workflow: str, params: dict, payload: dict | None = None) -> str:
        """Accept a job into the core and the store's open transaction (durable at the next commit)."""
        if workflow not in self.workflows:
            raise CoreError(f"unknown workflow {workflow!r}; available: {', '.join(sorted(self.workflows))}")
        job_id = uuid.uuid4().hex
        now = time.time()
        self.store.add_job(job_id, workflow, params, payload, now)
        self.metrics.submitted.inc()
        self._apply(self.core.submit(job_id, workflow, params, payload, now))
        return job_id

    def job(self, job_id: str) -> dict | None:
        live = self.core.job(job_id)
        stored = self.store.job(job_id)
        if stored is None:
            return None
        if live is not None:
            stored.update({k: live[k] for k in ("state", "reason", "stages") if k in live})
        return stored

    def cancel(self, job_id: str, reason: str = "cancelled by client") -> bool:
        """True if the job was active and is now cancelled; UnknownJob if no such job."""
        try:
            cmds = self.core.cancel(job_id, time.time(), reason)
        except UnknownJob:
            if self.store.job(job_id) is None:
                raise
            return False
        self._apply(cmds)
        self.store.commit()
        self._rearm()
        return bool(cmds)

    def subscribe(self, job_id: str) -> tuple[list[dict], asyncio.Queue]:
        """Past events and a queue of the live ones (None ends the stream); UnknownJob if none."""
        job = self.store.job(job_id)
        if job is None:
            raise UnknownJob(job_id)
        q: asyncio.Queue = asyncio.Queue()
        history = self.store.events(job_id)
        if job["state"] in TERMINAL and self.core.job(job_id) is None:
            q.put_nowait(None)
        else:
            self._subscribers[job_id].add(q)
        return history, q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        subs = self._subscribers.get(job_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._subscribers[job_id]

    def result_path(self, job_id: str) -> Path | None:
        job = self.store.job(job_id)
        if job is None or job["state"] != "succeeded" or not job.get("result"):
            return None
        path = Path(job["result"].get("path", ""))
        return path if path.is_file() else None

    def stages(self) -> dict:
        return self.core.stages()

    def missing_stages(self) -> list[str]:
        """Stages of the served workflows that have no live, non-draining worker, less those
        a node manager starts on demand (scaled to zero on purpose)."""
        have = {name for name, s in self.core.stages().items()
                if any(not w["draining"] for w in s["workers"])}
        needed = {s for wf in self.workflows.values() for s in wf.stages}
        manager = self.extensions.get("manager")
        if manager is not None:
            needed -= manager.on_demand_stages()
        return sorted(needed - have)

    def drain(self, worker_id: str) -> None:
        """Bind nothing new to the worker and tell it to finish its tasks and leave
        (UnknownWorker if it is not registered)."""
        self._apply(self.core.drain(worker_id, time.time()))
        self._rearm()

    def worker_stats(self) -> dict[str, dict]:
        return self._worker_stats

    # -- control plane ----------------------------------------------------------
    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            self._on_frames(frames)
            # Drain what is already queued without awaiting, then commit once.
            for _ in range(DRAIN_BATCH):
                try:
                    frames = self._tx.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_frames(frames)
            self.store.commit()  # one transaction for the whole batch
            for wid, body in self._replies:  # a client hears its job id only once the job is durable
                self._send(wid, body)
            self._replies.clear()
            # Awaiting a recv that is already satisfied does not yield: while messages keep coming
            # this loop would starve the tick (heartbeats, expiry) and the REST API for seconds.
            await asyncio.sleep(0)

    async def _tick(self) -> None:
        hb = protocol.pack("HEARTBEAT")
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            self._apply(self.core.expire(time.time()))
            for name, stage in self.core.stages().items():
                for w in stage["workers"]:
                    self._send(w["id"], hb)
            self.store.commit()
            self._rearm()

    def _rearm(self) -> None:
        """Call after sending from outside ``_receive`` (the tick, REST and manager calls).

        ``_send`` goes through the shadow socket ``_tx``; libzmq processes the socket's
        command mailbox on every send and can consume the ZMQ_FD edge that the pending
        asyncio ``recv_multipart`` in ``_receive`` waits for. The messages then sit unread
        until an unrelated edge comes (a worker reconnecting): the broker goes deaf.
        EVENTS read through the asyncio socket re-checks and wakes the receive.
        """
        if self._sock is not None:
            self._sock.get(zmq.EVENTS)

    def _send(self, worker_id: str, body: bytes) -> None:
        try:
            self._tx.send_multipart([worker_id.encode("utf-8", "surrogateescape"), body], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("could not send to %s: %s", worker_id, exc)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.metrics.bad_messages.inc()
            log.debug("dropped a control message of %d frames", len(frames))
            return
        ident, raw = frames
        try:
            body = protocol.unpack(raw)
        except protocol.BadMessage as exc:
            self.metrics.bad_messages.inc()
            log.warning("dropped a bad control message from %r: %s", ident[:32], exc)
            return
        # surrogateescape round-trips any routing id: libzmq gives a DEALER without ROUTING_ID a
        # binary one (0x00 + 4 bytes), which "replace" would mangle, so its replies went nowhere
        wid = ident.decode("utf-8", "surrogateescape")
        try:
            self._apply(self._dispatch(wid, body))
        except UnknownWorker:
            self._send(wid, protocol.pack("ERROR", reason="unknown worker: register again", reregister=True))
        except CoreError as exc:
            self._send(wid, protocol.pack("ERROR", reason=str(exc)))
            log.warning("refused %s from %s: %s", body["k"], wid, exc)

    def _dispatch(self, wid: str, m: dict) -> list:
        core, now, kind = self.core, time.time(), m["k"]
        if kind == "HEARTBEAT":
            if isinstance(m.get("stats"), dict):
                self._worker_stats[wid] = m["stats"]
            load = m.get("load")
            return core.heartbeat(wid, now, load if isinstance(load, int) else None)
        if kind == "REGISTER":
            info = m.get("info") if isinstance(m.get("info"), dict) else {}
            cmds = core.register(wid, m["stage"], max(1, m["capacity"]), m["descriptor"], now, info)
            self._send(wid, protocol.pack("REGISTERED", heartbeat_s=self.settings.heartbeat_s,
                                          liveness=self.settings.liveness))
            log.info("worker %s registered for %s (%s)", wid, m["stage"], m["descriptor"].get("transport"))
            return cmds
        if kind == "STARTED":
            return core.started(wid, m["job"], m["stage"], now)
        if kind == "PROGRESS":
            return core.progress(wid, m["job"], m["stage"], m["step"], m["total"], now)
        if kind == "DONE":
            timings = m.get("timings") if isinstance(m.get("timings"), dict) else None
            result = m.get("result") if isinstance(m.get("result"), dict) else None
            return core.done(wid, m["job"], m["stage"], now, timings=timings, result=result)
        if kind == "FAILED":
            return core.failed(wid, m["job"], m["stage"], m["reason"], m["retryable"], now)
        if kind == "DISCONNECT":
            self._worker_stats.pop(wid, None)
            log.info("worker %s left", wid)
            return core.disconnect(wid, now)
        if kind == "SUBMIT":
            payload = m.get("payload") if isinstance(m.get("payload"), dict) else None
            job_id = self._accept(m["workflow"], m["params"], payload)
            self._replies.append((wid, protocol.pack("SUBMITTED", job=job_id)))
            return []
        raise CoreError(f"{kind} is not a message a broker accepts")

    def _apply(self, commands: list) -> None:
        for c in commands:
            if isinstance(c, ToWorker):
                self._send(c.worker_id, protocol.pack(c.kind, **c.body))
            elif isinstance(c, JobEvent):
                self._on_event(c)
            elif isinstance(c, Stale):
                self.metrics.stale_messages.inc()
                log.debug("stale %s from %s for %s/%s: %s", c.message, c.worker_id, c.job_id, c.stage, c.reason)

    def _on_event(self, e: JobEvent) -> None:
        seq = self.store.add_event(e.job_id, e.type, e.data)
        if e.type == "stage_assigned" and e.job_id not in self._running:  # running once a task is bound
            self._running.add(e.job_id)
            self.store.set_state(e.job_id, "running")
        elif e.type == "stage_finished":
            self.metrics.observe_stage(e.data)
        event = {"seq": seq, "ts": time.time(), "type": e.type, "data": e.data}
        terminal = e.type in TERMINAL
        if terminal:
            job = self.core.job(e.job_id) or {}
            self.store.finish(e.job_id, e.type, time.time(), e.data.get("reason"), e.data.get("result"),
                              job.get("stages"))
            self.metrics.finished.labels(e.type).inc()
            self.core.forget(e.job_id)
            self._running.discard(e.job_id)
            log.info("job %s %s%s", e.job_id, e.type, f": {e.data['reason']}" if e.data.get("reason") else "")
        for q in self._subscribers.get(e.job_id, ()):
            q.put_nowait(event)
            if terminal:
                q.put_nowait(None)
        if terminal:
            self._subscribers.pop(e.job_id, None)
