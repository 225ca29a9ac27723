"""The broker process: the ZeroMQ control plane around the pure scheduling core.

``broker.core.Core`` decides; this module does the I/O. One ROUTER socket
(``broker.control.ControlSocket``) receives worker and client messages; each
batch of messages is fed to the core, the resulting events are recorded in
the job store and published to event subscribers, and the batch's messages
to workers leave at its end, joined per peer. The store commits on a short
timer (``commit_interval_s``, group commit) rather than per batch; a SUBMIT's
reply waits for the commit that makes its job durable. A timer expires
silent workers and heartbeats live ones. The REST API
(``broker.api``) runs in the same process and talks to :class:`Broker`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import defaultdict
from pathlib import Path

import zmq

from onepiece import credentials
from onepiece.results import LocalStore, Located, open_store
from stages.params import ParamError
from stages.workflow import Workflow, load_workflow

from . import protocol
from .control import ControlSocket
from .core import TERMINAL, Core, JobEvent, Stale, ToWorker
from .curve import Allowlist, CurveError, secure_server
from .errors import CoreError, UnknownJob, UnknownWorker
from .limits import Limits
from .metrics import BrokerMetrics
from .store import JobStore, new_job_id

log = logging.getLogger("onepiece.broker")

DRAIN_BATCH = 256  # messages handled per loop turn at most; short, so the loop stays fair


class Broker:
    """Control-plane service: worker registry, job routing, job store, events."""

    def __init__(self, settings, workflows: dict[str, Workflow] | None = None):
        self.settings = settings
        self.workflows = workflows or {w.name: w for w in map(load_workflow, settings.workflows)}
        liveness_s = settings.heartbeat_s * settings.liveness
        self.core = Core(self.workflows, heartbeat_liveness_s=liveness_s, max_attempts=settings.max_attempts,
                         progress_floor_s=settings.progress_floor_s, progress_cap_s=settings.progress_cap_s,
                         progress_factor=settings.progress_factor, job_deadline_s=settings.job_deadline_s)
        self.store = JobStore(settings.db_path)
        self.results = open_store(settings)  # where results are, and how they are served (onepiece/results.py)
        self.results_dir = self.results.root if isinstance(self.results, LocalStore) else Path(settings.results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = BrokerMetrics(self)
        self.endpoint = settings.control
        self._subscribers: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._ctx: zmq.Context | None = None
        self._ctl: ControlSocket | None = None
        self._tasks: list[asyncio.Task] = []
        self._worker_stats: dict[str, dict] = {}
        self._replies: list[tuple[str, bytes]] = []  # SUBMITTED, sent once their jobs are committed
        self._endings: list[tuple[str, dict]] = []  # terminal events, published once committed
        self._commit_timer: asyncio.TimerHandle | None = None
        self._running: set[str] = set()  # jobs already marked 'running' in the store
        self.active = 0  # unfinished jobs (accepted, not ended): bounded by ``limits``
        self.limits = Limits.from_settings(settings)  # also the REST API's (broker/api.py)
        self.active_by_owner: collections.Counter[str] = collections.Counter()
        self._owner: dict[str, str] = {}  # unfinished job -> its API key's id
        # services that run beside the broker and show in its API (onepiece.links.ManagerLink)
        self.extensions: dict[str, object] = {}
        self._allow = None  # the CURVE allow-list's ZAP handler, with --curve-secret
        self._data_keys: dict[str, bytes] = {}  # worker -> its data-plane key (onepiece.credentials)

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        self._ctx = zmq.Context()
        st = self.settings
        if st.curve_secret is not None:  # CURVE: only allow-listed peers get in
            if st.curve_allow is None:
                self._ctx.term()
                raise CoreError("--curve-secret needs --curve-allow: the directory of the public certificates "
                                "of the workers and managers that may connect")
            try:
                self._allow = Allowlist(self._ctx, st.curve_allow)
                self._allow.start()  # the ZAP handler is there before the socket binds
            except CurveError as exc:
                self._ctx.term()
                raise CoreError(str(exc)) from None
        sock = self._ctx.socket(zmq.ROUTER)
        if self._allow is not None:
            secure_server(sock, st.curve_secret)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker keeps its id
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BODY)
        try:
            sock.bind(self.settings.control)  # "tcp://host:*" picks a free port
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._stop_allowlist()
            self._ctx.term()
            raise CoreError(f"cannot bind the control plane on {self.settings.control}: {exc}") from exc
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._ctl = ControlSocket(sock, routed=True, on_message=self._on_message, on_bad=self._on_bad,
                                  on_batch=self._after_batch, batch=DRAIN_BATCH)
        self._requeue_unfinished()
        self._tasks = [asyncio.get_running_loop().create_task(self._tick(), name="broker-tick")]
        log.info("broker control plane on %s, workflows: %s", self.endpoint, ", ".join(self.workflows))

    async def stop(self) -> None:
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        self.store.commit()  # what ended is durable now, and its streams hear of it
        endings, self._endings = self._endings, []
        for job_id, event in endings:
            self._publish(job_id, event, terminal=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for queues in self._subscribers.values():
            for q in queues:
                q.put_nowait(None)
        self._subscribers.clear()
        if self._ctl is not None:
            self._ctl.close()
            self._stop_allowlist()
            self._ctx.term()
            self._ctl = None
        self.store.close()

    def _stop_allowlist(self) -> None:
        if self._allow is not None:
            self._allow.stop()
            self._allow = None

    def _requeue_unfinished(self) -> None:
        now = time.time()
        owners = self.store.unfinished_owners()
        for job_id, workflow, params, payload, created in self.store.unfinished():
            if workflow not in self.workflows:
                self.store.add_event(job_id, "failed", {"reason": f"workflow {workflow!r} is no longer served"})
                self.store.finish(job_id, "failed", now, f"workflow {workflow!r} is no longer served", None, None)
                continue
            log.warning("re-queueing job %s: the broker stopped while it ran", job_id)
            self.store.add_event(job_id, "requeued", {"reason": "broker restarted"})
            self._count_in(job_id, owners.get(job_id))  # before: the submit may end it at once
            self._apply(self.core.submit(job_id, workflow, params, payload, now, created=created))
        self.store.commit()

    def _count_in(self, job_id: str, owner: str | None) -> None:
        self.active += 1
        if owner is not None:
            self._owner[job_id] = owner
            self.active_by_owner[owner] += 1

    def _count_out(self, job_id: str) -> None:
        self.active = max(0, self.active - 1)
        owner = self._owner.pop(job_id, None)
        if owner is not None:
            self.active_by_owner[owner] -= 1
            if self.active_by_owner[owner] <= 0:
                del self.active_by_owner[owner]

    # -- facade for the REST API ----------------------------------------------
    def submit(self, workflow: str, params: dict, payload: dict | None = None, owner: str | None = None) -> str:
        """Accept a job; it is durable in the store when this returns. CoreError if refused.
        ``owner``: the id of the API key that submitted it (only it, or a read key, sees it)."""
        job_id = self._accept(workflow, params, payload, owner)
        self.store.commit()
        return job_id

    def _accept(self, workflow: str, params: dict, payload: dict | None = None, owner: str | None = None) -> str:
        """Accept a job into the core and the store's open transaction (durable at the next commit)."""
        wf = self.workflows.get(workflow)
        if wf is None:
            raise CoreError(f"unknown workflow {workflow!r}; available: {', '.join(sorted(self.workflows))}")
        # The workflow's declaration decides the values every stage receives, defaults included,
        # whichever door the job came in by (REST has resolved them already: resolving is idempotent).
        try:
            params = wf.resolve_params(params)
        except ParamError as exc:
            raise CoreError(f"workflow {workflow!r}: {exc.message}") from None
        missing = [name for name in wf.images() if wf.params[name].required and not (payload or {}).get(name)]
        if missing:
            raise CoreError(f"workflow {workflow!r} needs the input image {missing[0]!r} in the payload")
        job_id = new_job_id()
        now = time.time()
        self.store.add_job(job_id, workflow, params, payload, now, owner)
        self.metrics.submitted.inc()
        self._count_in(job_id, owner)
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

    def result_location(self, job_id: str) -> Located | None:
        """Where a succeeded job's result is in the result store (a file, or a presigned URL),
        or None. A worker reports the key it stored the result under, and a worker may lie: the
        store locates only this job's key inside itself (onepiece/results.py, R2); anything else
        (``..``, an absolute path, a symlink out, another job's key) is refused, logged, and
        served as no result."""
        job = self.store.job(job_id)
        if job is None or job["state"] != "succeeded" or not job.get("result"):
            return None
        result = job["result"]
        return self.results.locate(job_id, result.get("key") or result.get("path"))

    def result_path(self, job_id: str) -> Path | None:
        """The local file of a succeeded job's result (None for one in an object store)."""
        located = self.result_location(job_id)
        return located.path if located is not None else None

    def stages(self) -> dict:
        """Per stage: workers, queue, load, the progress bound and the tasks that look stuck."""
        return self.core.stages(time.time())

    def readiness(self) -> tuple[list[str], list[str]]:
        """``(missing stages, reasons)``; ready when both are empty. A stage is missing when no
        live worker serves it (stages a node manager starts on demand excepted); a reason
        names a stage whose queued work no worker can take, or a job past its deadline."""
        missing = self.missing_stages()
        manager = self.extensions.get("manager")
        on_demand = manager.on_demand_stages() if manager is not None else set()
        reasons = []
        now = time.time()
        for p in self.core.health(now):
            # a stage scaled to zero gets a worker when work comes: not a fault until that is overdue
            if p["stage"] in on_demand and not p["overdue"] and p["waiting_s"] <= self.core.progress_bound(p["stage"]):
                continue
            reasons.append(p["reason"])
        return missing, reasons

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

    def lost(self, worker_id: str, why: str) -> None:
        """The worker is gone (its launcher saw it exit): re-run its work now. UnknownWorker if
        it is not registered (already lost, or never was)."""
        if not self.core.registered(worker_id):
            raise UnknownWorker(worker_id)
        self._worker_stats.pop(worker_id, None)
        self._apply(self.core.lost(worker_id, why[:200], time.time()))
        log.warning("worker %s lost: %s", worker_id, why[:200])

    def stage_signals(self, now: float) -> dict:
        return self.core.stage_signals(now)

    def attach(self, name: str, extension) -> None:
        self.extensions[name] = extension

    def detach(self, name: str, extension) -> None:
        if self.extensions.get(name) is extension:
            del self.extensions[name]

    def metrics_registry(self):
        return self.metrics.registry

    def worker_stats(self) -> dict[str, dict]:
        """The last ``stats`` each registered worker's heartbeat reported: peer data, its shape
        checked by the protocol's schema, its values not. Those of workers gone are dropped."""
        for wid in [wid for wid in self._worker_stats if not self.core.registered(wid)]:
            del self._worker_stats[wid]
        return self._worker_stats

    # -- control plane ----------------------------------------------------------
    async def _tick(self) -> None:
        hb = protocol.pack("HEARTBEAT")
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            self._apply(self.core.expire(time.time()))
            for name, stage in self.core.stages().items():
                for w in stage["workers"]:
                    self._send(w["id"], hb, urgent=False)
            self._after_batch()

    def _after_batch(self) -> None:
        """Commit within ``commit_interval_s`` of the first uncommitted write."""
        if self._commit_timer is None and (self._replies or self._endings or self.store.dirty):
            self._commit_timer = asyncio.get_running_loop().call_later(self.settings.commit_interval_s,
                                                                       self._commit)

    def _commit(self) -> None:
        """Group commit, on the store's writer thread; SUBMIT replies leave once it is done."""
        self._commit_timer = None
        replies, self._replies = self._replies, []
        endings, self._endings = self._endings, []
        loop = asyncio.get_running_loop()
        self.store.commit_soon().add_done_callback(
            lambda f: loop.call_soon_threadsafe(self._committed, f, replies, endings))

    def _committed(self, done, replies: list[tuple[str, bytes]], endings: list[tuple[str, dict]]) -> None:
        error = done.exception()
        if error is not None:  # the writes stay queued in the store: try again, replies held
            log.error("the job store could not commit (will retry): %s", error)
            self._replies[:0] = replies
            self._endings[:0] = endings
            self._after_batch()
            return
        for wid, body in replies:  # a client hears its job id only once the job is durable
            self._send(wid, body)
        for job_id, event in endings:  # and a job's end only once a restart cannot run it again
            self._publish(job_id, event, terminal=True)

    def _send(self, worker_id: str, body: bytes, urgent: bool = True) -> None:
        """Queue a message; it leaves at the end of the current batch or loop turn (``urgent``),
        else with the worker's next urgent one (``ControlSocket.send``)."""
        if self._ctl is not None:
            # surrogateescape round-trips any routing id: libzmq gives a DEALER without ROUTING_ID a
            # binary one (0x00 + 4 bytes), which "replace" would mangle, so its replies went nowhere
            self._ctl.send(body, worker_id.encode("utf-8", "surrogateescape"), urgent=urgent)

    def _on_bad(self, ident: bytes | None, reason: str) -> None:
        self.metrics.bad_messages.inc()
        held = self.metrics.log_limit.admit(protocol.problem(reason))  # a burst must not flood the log
        if held is not None:
            log.warning("dropped a bad control message from %r: %.300s%s", (ident or b"")[:32], reason, held)

    def _on_message(self, ident: bytes, body: dict) -> None:
        wid = ident.decode("utf-8", "surrogateescape")
        try:
            self._apply(self._dispatch(wid, body))
        except UnknownWorker:
            self._send(wid, protocol.pack("ERROR", reason="unknown worker: register again", reregister=True))
        except CoreError as exc:
            self._send(wid, protocol.pack("ERROR", reason=str(exc)[:protocol.REASON]))
            held = self.metrics.log_limit.admit(f"refused {body['k']}")
            if held is not None:
                log.warning("refused %s from %.64r: %.300s%s", body["k"], wid, exc, held)

    def _dispatch(self, wid: str, m: dict) -> list:
        """One valid message (``protocol.validate`` has checked every field it reads) -> commands."""
        core, now, kind = self.core, time.time(), m["k"]
        if kind == "HEARTBEAT":
            running = [tuple(k) for k in m.get("running") or () if len(k) == 2]
            cmds = core.heartbeat(wid, now, m.get("load"), running)  # UnknownWorker for a stranger: nothing kept
            if m.get("stats") is not None:
                self._worker_stats[wid] = m["stats"]
            return cmds
        if kind == "REGISTER":
            cmds = core.register(wid, m["stage"], m["capacity"], m["descriptor"], now, m.get("info") or {},
                                 kind=m.get("kind"), model=m.get("model"))
            self._worker_stats.pop(wid, None)  # a new incarnation counts from zero
            key = self._data_keys[wid] = credentials.new_key()  # a new incarnation, a new key (C2)
            if len(self._data_keys) > 1024:  # keys of workers long gone
                self._data_keys = {w: k for w, k in self._data_keys.items() if core.registered(w)}
            # before any TASK or SEND of cmds: the worker knows its key when data comes
            self._send(wid, protocol.pack("REGISTERED", heartbeat_s=self.settings.heartbeat_s,
                                          liveness=self.settings.liveness, data_key=key.hex()))
            log.info("worker %.64r registered for %s (%.32r)", wid, m["stage"], m["descriptor"].get("transport"))
            return cmds
        if kind == "STARTED":
            return core.started(wid, m["job"], m["stage"], now, m.get("resumed_from_step"))
        if kind == "CHECKPOINT":
            return core.checkpointed(wid, m["job"], m["stage"], m["step"], m["holder"], now)
        if kind == "HANDOFF":
            return core.handoff(wid, m["job"], m["stage"], m["step"], now)
        if kind == "PROGRESS":
            return core.progress(wid, m["job"], m["stage"], m["step"], m["total"], now)
        if kind == "DONE":
            return core.done(wid, m["job"], m["stage"], now, timings=m.get("timings"), result=m.get("result"))
        if kind == "FAILED":
            if m.get("to") is not None and m.get("to_stage") is not None:
                return core.unreachable(wid, m["job"], m["stage"], m["to"], m["to_stage"], m["reason"], now)
            return core.failed(wid, m["job"], m["stage"], m["reason"], m["retryable"], now)
        if kind == "DISCONNECT":
            self._worker_stats.pop(wid, None)
            log.info("worker %s left", wid)
            return core.disconnect(wid, now)
        if kind == "SUBMIT":
            refusal = self.limits.submit(None, time.monotonic(), 0, self.active)  # the REST API's bound too
            if refusal is not None:
                raise CoreError(refusal.message)
            job_id = self._accept(m["workflow"], m["params"], m.get("payload"))
            self._replies.append((wid, protocol.pack("SUBMITTED", job=job_id)))  # sent once it is durable
            return []
        raise CoreError(f"{kind} is not a message a broker accepts")

    def _credential(self, c: ToWorker) -> None:
        """Give a SEND the credentials its consumer checks, and a TASK that leaves checkpoints the
        ones its holder checks (onepiece.credentials: MACs with the receiver's data key): the link
        that lets the sender connect, and the MAC of what it sends."""
        b = c.body
        if c.kind == "SEND":
            key = self._data_keys.get(b["to"])
            if key is not None:
                b["auth"] = credentials.data_auth(key, b["job"], b["stage"], b["to_stage"], b.get("binding"))
                b["link"] = credentials.link_key(key, c.worker_id)
        elif c.kind == "TASK" and b.get("checkpoint_to") is not None:
            holder = b["checkpoint_to"]
            key = self._data_keys.get(holder["worker"])
            if key is not None:
                b["checkpoint_auth"] = credentials.checkpoint_auth(key, b["job"], b["stage"], holder["stage"])
                b["checkpoint_link"] = credentials.link_key(key, c.worker_id)

    def _apply(self, commands: list) -> None:
        for c in commands:
            if isinstance(c, ToWorker):  # nothing waits on a RELEASE: it rides with the next message
                if c.kind in ("SEND", "TASK"):
                    self._credential(c)
                self._send(c.worker_id, protocol.pack(c.kind, **c.body), urgent=c.kind != "RELEASE")
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
            if e.type == "succeeded" and job.get("finished") is not None:
                self.metrics.observe_job(self.workflows[job["workflow"]], job["finished"] - job["created"])
            self.core.forget(e.job_id)
            self._running.discard(e.job_id)
            self._count_out(e.job_id)
            log.info("job %s %s%s", e.job_id, e.type, f": {e.data['reason']}" if e.data.get("reason") else "")
            # Published once durable: a client that saw a job end must never see it run again
            # because the broker died before the commit (the store would re-queue it).
            self._endings.append((e.job_id, event))
            self._after_batch()
        else:
            self._publish(e.job_id, event, terminal=False)

    def _publish(self, job_id: str, event: dict, terminal: bool) -> None:
        for q in self._subscribers.get(job_id, ()):
            q.put_nowait(event)
            if terminal:
                q.put_nowait(None)
        if terminal:
            self._subscribers.pop(job_id, None)
