"""The stage worker's data plane: bounded unsolicited data, honest FAILED for lost outputs,
and a bound on every wait (issue 10: no job hangs and none is lost).

Real components on the test's event loop: ``stages.worker.Worker`` with synthetic stages, real
shm endpoints, and either the real broker (``broker.service.Broker``) or a raw ZeroMQ ROUTER
that plays the broker so a test can say exactly what the worker is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid

import pytest
import torch
import zmq
import zmq.asyncio

from broker import protocol
from broker.service import Broker
from onepiece import credentials
from onepiece.config import load_settings
from stages.kinds import StageKind, StageOutput
from stages.worker import Worker
from stages.workflow import loads_workflow
from transports import Refused, open_transport

from ..helpers import chain3

MiB = 1 << 20
WAIT_S = 30.0  # a generous cap so a broken worker fails the test instead of hanging it

pytestmark = pytest.mark.timeout(120)


def workflow(name: str, b_service: float = 0.01, a_bytes: int = 1024):
    text = chain3(name, b_service)
    if a_bytes != 1024:
        text = text.replace("output_bytes = 1024", f"output_bytes = {a_bytes}", 1)
    return loads_workflow(text)


def settings_for(tmp_path, **kw):
    kw.setdefault("heartbeat_s", 0.5)
    kw.setdefault("liveness", 10)
    return load_settings(env={}, data_dir=tmp_path, control="tcp://127.0.0.1:*", transport="shm",
                         ring_bytes=32 * MiB, **kw)


async def until(predicate, what: str, timeout: float = WAIT_S):
    """Poll ``predicate`` until it is true (the cap only stops a broken run from hanging)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def our_segments() -> list[str]:
    prefix = f"onepiece-{os.getpid()}-"
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def filler(nbytes: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((nbytes,), 3, dtype=torch.uint8)}


@pytest.fixture(autouse=True)
def shm_is_left_clean():
    yield
    assert our_segments() == []


@pytest.fixture
async def endpoints():
    """Factory for shm endpoints (a test's data-plane peers), closed at teardown."""
    opened = []

    async def open_(**options):
        t = await open_transport("shm", **{"ring_bytes": 32 * MiB, **options})
        opened.append(t)
        return t

    yield open_
    for t in reversed(opened):
        await t.aclose()


class Workers:
    """In-process workers, stopped and awaited at teardown."""

    def __init__(self):
        self.running: list[tuple[Worker, asyncio.Task]] = []

    def start(self, settings, wf, stage: str, **kw) -> tuple[Worker, asyncio.Task]:
        w = Worker(settings, wf, stage, **kw)
        task = asyncio.get_running_loop().create_task(w.run(), name=f"worker-{stage}")
        self.running.append((w, task))
        return w, task

    async def stop(self) -> None:
        for w, task in self.running:
            w.stop()
        for w, task in self.running:
            async with asyncio.timeout(WAIT_S):
                await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def workers():
    ws = Workers()
    yield ws
    await ws.stop()


class FakeBroker:
    """A ZeroMQ ROUTER playing the broker: records what workers say, answers REGISTER and
    HEARTBEAT (so the worker never thinks the broker is gone), sends what a test tells it to."""

    def __init__(self, **registered):
        self.registered = registered  # more fields of REGISTERED (the real broker's data_key)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.messages: list[dict] = []
        self.bad: list[str] = []
        self.ident: bytes | None = None
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            ident, frame = await self.sock.recv_multipart()
            good, bad = protocol.unpack_frame(frame)
            self.bad += bad
            for m in good:
                self.messages.append(m)
                if m["k"] == "REGISTER":
                    self.ident = ident
                    await self.sock.send_multipart([ident, protocol.pack("REGISTERED", heartbeat_s=0.5,
                                                                         liveness=10, **self.registered)])
                elif m["k"] == "HEARTBEAT":
                    await self.sock.send_multipart([ident, protocol.pack("HEARTBEAT")])

    async def tell(self, *bodies: bytes) -> None:
        """Send these messages to the worker in one frame (handled in one batch, in order)."""
        for frame in protocol.frames(list(bodies)):
            await self.sock.send_multipart([self.ident, frame])

    def of(self, kind: str, job: str | None = None) -> list[dict]:
        return [m for m in self.messages if m["k"] == kind and (job is None or m.get("job") == job)]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.sock.close()
        self.ctx.term()


@pytest.fixture
async def fake_broker():
    fb = FakeBroker()
    yield fb
    await fb.close()


async def start_worker(workers, fake_broker, tmp_path, stage: str, wf=None, **kw) -> Worker:
    settings = settings_for(tmp_path, **kw).replace(control=fake_broker.endpoint)
    w, _ = workers.start(settings, wf or workflow("wd"), stage)
    await until(lambda: fake_broker.ident is not None and w.transport is not None, "registration")
    return w


@contextlib.asynccontextmanager
async def chain_through_broker(tmp_path, workers, wf, **settings):
    """The real broker and one in-process worker per stage of ``wf`` (a, b, c), registered;
    yields (broker, {stage: worker}), and stops them all."""
    settings = settings_for(tmp_path, workflows=["unused"], **settings)
    broker = Broker(settings, workflows={wf.name: wf})
    await broker.start()
    try:
        wsettings = settings.replace(control=broker.endpoint)
        by_stage = {stage: workers.start(wsettings, wf, stage)[0] for stage in ("a", "b", "c")}
        await until(lambda: all(len(s["workers"]) == 1 for s in broker.stages().values()), "registration")
        yield broker, by_stage
    finally:
        await workers.stop()
        await broker.stop()


def task_msg(job: str, stage: str, inputs: list[str], binding: int | None = None) -> bytes:
    extra = {} if binding is None else {"binding": binding}
    return protocol.pack("TASK", job=job, workflow="wd", stage=stage, attempt=1, params={},
                         inputs=[{"stage": up, "names": ["x"]} for up in inputs], **extra)


def send_msg(job: str, stage: str, to_stage: str, descriptor: dict, to: str = "consumer") -> bytes:
    return protocol.pack("SEND", job=job, stage=stage, to=to, to_stage=to_stage, descriptor=descriptor,
                         names=["x"])


def new_job() -> str:
    return uuid.uuid4().hex


class Events:
    """A job's events as the real broker publishes them."""

    def __init__(self, broker: Broker, job: str):
        self.seen, self._queue = broker.subscribe(job)
        self._over = False

    def _pull(self) -> None:
        while not self._over and not self._queue.empty():
            e = self._queue.get_nowait()
            if e is None:
                self._over = True
            else:
                self.seen.append(e)

    @property
    def types(self) -> list[str]:
        self._pull()
        return [e["type"] for e in self.seen]

    def ended(self) -> bool:
        return bool(set(self.types) & {"succeeded", "failed", "cancelled"})


# -- 1. unsolicited and orphaned data is bounded ---------------------------------------------


async def test_a_flood_of_unsolicited_tensors_stays_under_the_bound_and_a_real_job_still_succeeds(
        tmp_path, workers, endpoints):
    bound = 16 * MiB
    wf = workflow("flood")
    async with chain_through_broker(tmp_path, workers, wf, orphan_bytes=bound) as (broker, by_stage):
        b = by_stage["b"]

        peer = await endpoints()
        # a stranger cannot even connect: b has a data key, and no link made with it
        with pytest.raises(Refused, match="no data-plane credential"):
            await peer.connect(b.transport.descriptor)
        # a peer the broker gave a link (as it does in a SEND) connects; its messages without
        # the broker's credential are refused outright: nothing of them is kept
        key = broker._data_keys[b.id]
        sender = await peer.connect(b.transport.descriptor,
                                    credential=credentials.Credential("p", credentials.link_key(key, "p")))
        for _ in range(3):
            await sender.send({"job": new_job(), "stage": "b", "from": "a"}, filler(4 * MiB))
        await until(lambda: b.refused == 3, "the refusals")
        assert b.early == {} and b.orphans_dropped == 3
        b.orphans_dropped = b.orphan_bytes_dropped = 0  # the counts below are the flood's
        # a flood with credentials (as a worker the broker told to send could make for jobs that
        # never reach b): the orphan bound holds

        def auth(job):
            return credentials.data_auth(key, job, "a", "b", None)

        jobs = [new_job() for _ in range(12)]
        for job in jobs:  # 12 x 4 MiB of well-formed inputs for jobs nobody assigned
            await sender.send({"job": job, "stage": "b", "from": "a", "auth": auth(job)}, filler(4 * MiB))
        await until(lambda: b.orphans_dropped + sum(len(e.inputs) for e in b.early.values()) == 12, "arrival")

        stats = b.orphan_stats()
        assert stats == {"orphans_dropped": 8, "orphan_bytes_dropped": 8 * 4 * MiB, "orphan_bytes_held": bound}
        assert list(b.early) == [(job, "b") for job in jobs[-4:]]  # the oldest went first
        # The heartbeat carries the three numbers to the broker (for its /metrics).
        await until(lambda: broker.worker_stats().get(b.id, {}).get("orphans_dropped") == 8, "heartbeat")
        assert broker.worker_stats()[b.id]["data_refused"] == 3
        assert broker.worker_stats()[b.id]["connections_refused"] == 1
        reported = broker.worker_stats()[b.id]
        assert {k: reported[k] for k in stats} == stats
        assert all(type(reported[k]) is int for k in stats)

        # A real job still goes through the flooded worker (its input to b may come before b's
        # TASK and push one more flood message out: the bound holds either way).
        job = broker.submit(wf.name, {})
        events = Events(broker, job)
        await until(events.ended, "the job")
        assert events.types[-1] == "succeeded", events.types
        assert b.orphan_stats()["orphan_bytes_held"] <= bound

        # A late re-send of that job's inputs to b (its task already ran there) is not kept.
        before = b.orphan_stats()
        await sender.send({"job": job, "stage": "b", "from": "a", "auth": auth(job)}, filler(MiB))
        await until(lambda: b.orphans_dropped == before["orphans_dropped"] + 1, "the late re-send")
        assert b.orphan_stats() == {**before, "orphans_dropped": before["orphans_dropped"] + 1,
                                    "orphan_bytes_dropped": before["orphan_bytes_dropped"] + MiB}
        assert (job, "b") not in b.early
        await until(lambda: not b.held, "RELEASE of b's outputs")  # a RELEASE rides with later messages
        await sender.aclose()


async def test_early_inputs_expire_after_the_ttl(tmp_path, workers, fake_broker, endpoints):
    w = await start_worker(workers, fake_broker, tmp_path, "b", orphan_ttl_s=0.2, heartbeat_s=0.1)
    peer = await endpoints()
    sender = await peer.connect(w.transport.descriptor)
    await sender.send({"job": new_job(), "stage": "b", "from": "a"}, filler(MiB))
    await until(lambda: w.orphans_dropped == 1, "expiry")  # nothing else arrives: the heartbeat expires it
    assert w.orphan_stats() == {"orphans_dropped": 1, "orphan_bytes_dropped": MiB, "orphan_bytes_held": 0}
    assert w.early == {}
    await sender.aclose()


async def test_a_message_larger_than_the_bound_and_malformed_ones_are_dropped(
        tmp_path, workers, fake_broker, endpoints):
    w = await start_worker(workers, fake_broker, tmp_path, "b", orphan_bytes=2 * MiB)
    peer = await endpoints()
    sender = await peer.connect(w.transport.descriptor)
    await sender.send({"job": new_job(), "stage": "b", "from": "a"}, filler(3 * MiB))
    await sender.send({"job": new_job(), "stage": "not-mine", "from": "a"}, filler(MiB))
    await sender.send({"job": 5, "stage": "b"}, filler(MiB))
    await until(lambda: w.orphans_dropped == 3, "the drops")
    assert w.orphan_stats() == {"orphans_dropped": 3, "orphan_bytes_dropped": 5 * MiB, "orphan_bytes_held": 0}
    await sender.aclose()


async def test_inputs_kept_before_their_task_are_used_and_evicted_ones_fail_the_task_for_a_retry(
        tmp_path, workers, fake_broker, endpoints):
    w = await start_worker(workers, fake_broker, tmp_path, "b", orphan_bytes=8 * MiB)
    peer = await endpoints()
    sender = await peer.connect(w.transport.descriptor)
    evicted, kept, other = new_job(), new_job(), new_job()
    for job in (evicted, kept, other):  # 3 x 4 MiB under an 8 MiB bound: the first is evicted
        await sender.send({"job": job, "stage": "b", "from": "a", "binding": 1}, filler(4 * MiB))
    await until(lambda: w.orphans_dropped == 1 and len(w.early) == 2, "eviction")
    assert list(w.early) == [(kept, "b"), (other, "b")]

    # Its TASK came after its inputs: it runs with them.
    await fake_broker.tell(task_msg(kept, "b", ["a"], binding=1))
    await until(lambda: fake_broker.of("DONE", kept), "DONE")
    assert (kept, "b") in w.held and w.orphan_stats()["orphan_bytes_held"] == 4 * MiB

    # Its inputs were dropped before the TASK came: the worker says so at once (retryable),
    # so the broker re-binds it and its producers send again, instead of a task that waits forever.
    await fake_broker.tell(task_msg(evicted, "b", ["a"], binding=1))
    await until(lambda: fake_broker.of("FAILED", evicted), "FAILED")
    (failed,) = fake_broker.of("FAILED", evicted)
    assert failed["stage"] == "b" and failed["retryable"] is True and "dropped" in failed["reason"]
    assert (evicted, "b") not in w.tasks and not fake_broker.of("STARTED", evicted)

    # Re-bound here (a new binding), it runs once its inputs come again, in whichever order
    # the data plane and the control plane deliver the re-send and the TASK.
    await sender.send({"job": evicted, "stage": "b", "from": "a", "binding": 1}, filler(MiB))  # late: dropped
    await sender.send({"job": evicted, "stage": "b", "from": "a", "binding": 2}, filler(MiB))  # early: kept
    await until(lambda: (evicted, "b") in w.early, "the early re-send")
    await fake_broker.tell(task_msg(evicted, "b", ["a"], binding=2))
    await until(lambda: fake_broker.of("DONE", evicted), "DONE after the re-send")
    assert len(fake_broker.of("FAILED", evicted)) == 1
    await sender.aclose()


async def test_inputs_sent_for_another_binding_of_a_task_are_never_taken_for_its_own(
        tmp_path, workers, fake_broker, endpoints):
    w = await start_worker(workers, fake_broker, tmp_path, "b")
    peer = await endpoints()
    sender = await peer.connect(w.transport.descriptor)
    job = new_job()
    await fake_broker.tell(task_msg(job, "b", ["a"], binding=7))
    await until(lambda: (job, "b") in w.tasks, "the task")
    await sender.send({"job": job, "stage": "b", "from": "a", "binding": 6}, filler(MiB))  # an earlier binding's
    await until(lambda: w.orphans_dropped == 1, "the stale input dropped")
    assert not w.tasks[(job, "b")].arrived and not fake_broker.of("STARTED", job)
    await sender.send({"job": job, "stage": "b", "from": "a", "binding": 7}, filler(MiB))
    await until(lambda: fake_broker.of("DONE", job), "DONE")
    await sender.aclose()


async def test_inputs_for_a_task_that_ended_or_was_cancelled_are_not_kept(
        tmp_path, workers, fake_broker, endpoints):
    w = await start_worker(workers, fake_broker, tmp_path, "b")
    peer = await endpoints()
    sender = await peer.connect(w.transport.descriptor)
    ran, cancelled = new_job(), new_job()
    await fake_broker.tell(task_msg(ran, "b", ["a"]), task_msg(cancelled, "b", ["a"]))
    await sender.send({"job": ran, "stage": "b", "from": "a"}, filler(MiB))
    await until(lambda: fake_broker.of("DONE", ran), "DONE")
    await fake_broker.tell(protocol.pack("CANCEL", job=cancelled, stage="b"))
    await until(lambda: (cancelled, "b") not in w.tasks, "the cancel")

    for job in (ran, cancelled):  # late re-sends
        await sender.send({"job": job, "stage": "b", "from": "a"}, filler(2 * MiB))
    await until(lambda: w.orphans_dropped == 2, "the drops")
    assert w.orphan_stats() == {"orphans_dropped": 2, "orphan_bytes_dropped": 4 * MiB, "orphan_bytes_held": 0}
    assert not fake_broker.of("STARTED", cancelled)
    await sender.aclose()


# -- 2. a SEND the worker cannot honour is answered FAILED -------------------------------------


async def test_a_send_for_outputs_not_held_here_is_answered_failed_retryable(tmp_path, workers, fake_broker,
                                                                             endpoints):
    await start_worker(workers, fake_broker, tmp_path, "a")
    consumer = await endpoints()
    job = new_job()
    await fake_broker.tell(send_msg(job, "a", "b", consumer.descriptor))
    await until(lambda: fake_broker.of("FAILED", job), "FAILED")
    (failed,) = fake_broker.of("FAILED", job)
    assert failed["stage"] == "a" and failed["retryable"] is True and "not held" in failed["reason"]


async def test_the_same_through_the_real_broker_core(tmp_path, workers, endpoints):
    """The core reads a FAILED for outputs it thinks held as "outputs lost": it re-runs the task."""
    wf = workflow("lost")
    settings = settings_for(tmp_path, workflows=["unused"])
    broker = Broker(settings, workflows={wf.name: wf})
    await broker.start()
    try:
        wsettings = settings.replace(control=broker.endpoint)
        a, _ = workers.start(wsettings, wf, "a")
        await until(lambda: len(broker.stages()["a"]["workers"]) == 1, "registration")
        job = broker.submit(wf.name, {})
        events = Events(broker, job)
        await until(lambda: (job, "a") in a.held, "a's outputs")
        a.held.clear()  # as if it had restarted: it no longer holds what the broker thinks it does
        workers.start(wsettings, wf, "b")  # b binds, and a is told to SEND to it
        await until(lambda: "stage_retry" in events.types, "the re-run of a")
        retry = next(e for e in events.seen if e["type"] == "stage_retry")
        assert retry["data"]["stage"] == "a" and "not held" in retry["data"]["reason"]
        workers.start(wsettings, wf, "c")
        await until(events.ended, "the job")
        assert events.types[-1] == "succeeded", events.seen[-1]
    finally:
        await workers.stop()
        await broker.stop()


async def held_outputs(fake_broker, w: Worker) -> str:
    job = new_job()
    await fake_broker.tell(task_msg(job, "a", []))
    await until(lambda: fake_broker.of("DONE", job) and (job, "a") in w.held, "DONE")
    return job


async def test_a_send_that_fails_every_attempt_is_reported_naming_the_consumer_and_the_outputs_kept(
        tmp_path, workers, fake_broker, endpoints):
    w = await start_worker(workers, fake_broker, tmp_path, "a")
    job = await held_outputs(fake_broker, w)
    dead = await endpoints()
    gone = dead.descriptor
    await dead.aclose()  # nobody listens there any more
    await fake_broker.tell(send_msg(job, "a", "b", gone, to="b-dead"))
    await until(lambda: fake_broker.of("FAILED", job), "FAILED")
    (failed,) = fake_broker.of("FAILED", job)
    assert failed["retryable"] is True and "could not be sent" in failed["reason"]
    assert (failed["to"], failed["to_stage"]) == ("b-dead", "b")  # whom it could not reach
    # the outputs are fine: kept for the consumer the broker binds next
    assert (job, "a") in w.held
    live = await endpoints()
    await fake_broker.tell(send_msg(job, "a", "b", live.descriptor))
    msg = await live.recv(timeout=WAIT_S)
    assert msg.header["job"] == job and msg.tensors["x"].numel() == 1024
    msg.release()


async def test_a_failed_send_superseded_by_a_newer_one_that_succeeds_is_not_reported(
        tmp_path, workers, fake_broker, endpoints):
    w = await start_worker(workers, fake_broker, tmp_path, "a")
    job = await held_outputs(fake_broker, w)
    dead = await endpoints()
    gone = dead.descriptor
    await dead.aclose()
    live = await endpoints()
    # The broker re-bound the consumer: the SEND to the dead one and the new one come together.
    await fake_broker.tell(send_msg(job, "a", "b", gone), send_msg(job, "a", "b", live.descriptor))
    msg = await live.recv(timeout=WAIT_S)
    assert msg.header == {"job": job, "stage": "b", "from": "a"}
    assert msg.tensors["x"].numel() == 1024
    msg.release()
    await until(lambda: not w._background, "both sends to end")
    probe = new_job()  # everything the worker said before this answer has arrived when it does
    await fake_broker.tell(send_msg(probe, "a", "b", live.descriptor))
    await until(lambda: fake_broker.of("FAILED", probe), "the probe's FAILED")
    assert fake_broker.of("FAILED", job) == []
    assert (job, "a") in w.held  # still held for its consumer, until RELEASE
    await fake_broker.tell(protocol.pack("RELEASE", job=job, stage="a"))
    await until(lambda: not w.held, "RELEASE")


# -- 3. every wait has a bound -------------------------------------------------------------


async def test_a_consumer_that_never_reads_costs_send_timeout_then_failed(tmp_path, workers, fake_broker,
                                                                         endpoints):
    wf = workflow("big", a_bytes=4 * MiB)
    w = await start_worker(workers, fake_broker, tmp_path, "a", wf=wf, send_timeout_s=0.3)
    job = await held_outputs(fake_broker, w)
    stuck = await endpoints(ring_bytes=1 * MiB)  # smaller than the message, and never read
    await fake_broker.tell(send_msg(job, "a", "b", stuck.descriptor))
    await until(lambda: fake_broker.of("FAILED", job), "FAILED")
    (failed,) = fake_broker.of("FAILED", job)
    assert failed["retryable"] is True and "could not be sent" in failed["reason"]
    assert w.senders == {}  # the broken connection was closed, not kept


async def test_a_task_that_runs_past_task_timeout_is_failed_retryable(tmp_path, workers, fake_broker):
    wf = workflow("slow", b_service=60)
    w = await start_worker(workers, fake_broker, tmp_path, "b", wf=wf, task_timeout_s=0.3)
    job = new_job()
    await fake_broker.tell(task_msg(job, "b", []))
    await until(lambda: fake_broker.of("FAILED", job), "FAILED")
    (failed,) = fake_broker.of("FAILED", job)
    assert failed["retryable"] is True and "task_timeout_s" in failed["reason"]
    assert w.tasks == {} and not fake_broker.of("DONE", job)


class _HangingLoad(StageKind):
    def __init__(self, spec, release: threading.Event):
        super().__init__(spec)
        self.release = release

    def load(self) -> None:
        self.release.wait(60)

    def run(self, inputs, ctx):
        return StageOutput({})


async def test_a_model_load_past_load_timeout_exits_with_1_without_registering(tmp_path, fake_broker):
    wf = workflow("hang")
    release = threading.Event()
    settings = settings_for(tmp_path, load_timeout_s=0.3).replace(control=fake_broker.endpoint)
    w = Worker(settings, wf, "a", kind=_HangingLoad(wf.stages["a"], release))
    try:
        async with asyncio.timeout(WAIT_S):
            assert await w.run() == 1
        assert fake_broker.messages == []
    finally:
        release.set()


def test_settings_have_the_bounds_and_take_them_from_the_environment(tmp_path):
    s = load_settings(env={"ONEPIECE_ORPHAN_BYTES": str(MiB), "ONEPIECE_SEND_TIMEOUT_S": "2.5"}, data_dir=tmp_path)
    assert s.orphan_bytes == MiB and s.send_timeout_s == 2.5
    d = load_settings(env={})
    assert d.orphan_bytes > 0 and d.orphan_ttl_s > 0 and d.send_timeout_s > 0 and d.connect_timeout_s > 0
    assert d.load_timeout_s > 0 and d.task_timeout_s > 0


# -- 5. data-plane credentials: only what the broker authorised is kept ---------------------


KEY = bytes(range(32))  # the data key the fake broker gives, as the real one does


async def test_data_without_the_brokers_credential_is_refused_before_a_byte_is_kept(tmp_path, workers, endpoints):
    fb = FakeBroker(data_key=KEY.hex())
    try:
        w = await start_worker(workers, fb, tmp_path, "b")
        await until(lambda: w._data_key == KEY, "the data key")
        peer = await endpoints()
        sender = await peer.connect(w.transport.descriptor,
                                    credential=credentials.Credential("p", credentials.link_key(KEY, "p")))
        job = new_job()
        good = credentials.data_auth(KEY, job, "a", "b", 7)
        lies = [
            {"job": job, "stage": "b", "from": "a", "binding": 7},  # no credential at all
            {"job": job, "stage": "b", "from": "a", "binding": 7, "auth": "0" * 64},
            {"job": new_job(), "stage": "b", "from": "a", "binding": 7, "auth": good},  # another job's
            {"job": job, "stage": "b", "from": "a", "binding": 8, "auth": good},  # another binding's
            {"job": job, "stage": "b", "from": "c", "binding": 7, "auth": good},  # another producer stage's
            {"job": job, "stage": "b", "from": "a", "binding": 7, "checkpoint": 3, "auth": good},
            {"job": job, "stage": "b", "from": "a", "binding": 7,
             "auth": credentials.data_auth(bytes(32), job, "a", "b", 7)},  # made with another key
        ]
        for header in lies:
            await sender.send(header, filler(MiB))
        await until(lambda: w.refused == len(lies), "the refusals")
        assert w.early == {} and w.orphan_stats()["orphan_bytes_held"] == 0
        await sender.send({"job": job, "stage": "b", "from": "a", "binding": 7, "auth": good}, filler(MiB))
        await until(lambda: (job, "b") in w.early, "the authorised input, kept for its TASK")
        assert w.refused == len(lies)
        await sender.aclose()
    finally:
        await fb.close()


async def test_a_large_output_is_computed_into_memory_its_consumer_granted(tmp_path, workers):
    """Zero-copy production through the real broker: once a's outputs have gone to b, a asks b for
    the next output tensor before it writes it (TaskContext.output, Sender.allocate); the SEND to b
    then moves no payload bytes, and b reads exactly what a wrote; b's pool stays within its bound."""
    wf = workflow("zc", a_bytes=16 * MiB)
    async with chain_through_broker(tmp_path, workers, wf) as (broker, by_stage):
        a, b = by_stage["a"], by_stage["b"]
        seen: list[tuple[int, bool]] = []
        run = b.kind.run

        def checked(inputs, ctx):
            x = inputs["x"]
            seen.append((x.numel(), bool((x == 7).all())))
            return run(inputs, ctx)

        b.kind.run = checked
        for _ in range(3):
            job = broker.submit(wf.name, {})
            events = Events(broker, job)
            await until(events.ended, "the job")
            assert events.types[-1] == "succeeded", events.seen[-1]
        assert seen == [(16 * MiB, True)] * 3
        assert a.outputs_granted == 2  # the first job's consumer was not known yet
        stats = b.transport.stats()
        assert 16 * MiB <= stats["grant_pool_bytes"] <= stats["grant_pool_limit"]
