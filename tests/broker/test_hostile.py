"""Hostile peers on the control plane are contained (issue 10).

The schema table alone (pure: every message our senders produce passes, every
malformed field is refused naming it), then a real Broker with its REST API
and a raw pyzmq DEALER playing the hostile peer: nothing an unregistered peer
sends is kept, /metrics survives any stats a worker reports, every malformed
message is refused and counted while a valid worker still registers and gets
work, and a burst of bad messages writes a handful of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from broker import protocol
from broker.api import start_api
from broker.core import Core, ToWorker
from broker.metrics import LogLimiter
from broker.protocol import BadMessage, validate
from broker.service import Broker
from onepiece.config import load_settings
from stages.workflow import load_workflow
from transports.base import open_transport

V = protocol.VERSION
JOB = "0192f0a1b2c3d4e5f60718293a4b5c6d"


def msg(kind: str, **fields) -> dict:
    return {"v": V, "k": kind, **fields}


def refusal(body: object) -> str:
    with pytest.raises(BadMessage) as info:
        validate(body)
    return str(info.value)


# -- the schema, pure ---------------------------------------------------------------------------------

RDMA_LIKE = {  # the deepest descriptor a worker publishes: auto -> media -> rdma -> its port
    "transport": "auto", "id": "w1", "host_id": "h" * 32, "shm_ns": "ns",
    "media": {"rdma": {"transport": "rdma", "id": "w1-rdma", "host": "10.0.0.1", "port": 4000, "host_id": "h",
                       "ring_bytes": 32 << 20,
                       "rdma": {"link_layer": "Ethernet", "mtu": 5, "gid": "fe80:0000:0000:0000:0000:0000:0000:0001",
                                "lid": 0, "port_num": 1, "commit": "auto", "fabric": "roce"}}},
}


async def test_every_message_our_workers_and_clients_send_validates():
    transport = await open_transport("auto", media=("shm", "tcp"))
    try:
        descriptor = transport.descriptor
        stats = {**transport.stats(), "transport": transport.name,
                 "orphans_dropped": 3, "orphan_bytes_dropped": 4096, "orphan_bytes_held": 0}
    finally:
        await transport.aclose()
    assert isinstance(stats["auto_choices"], dict)
    info = {"kind": "synthetic", "model": None, "load_s": 0.012, "pid": os.getpid(), "host": "node-1", "gpu": False}
    bodies = [
        protocol.pack("REGISTER", stage="a", capacity=32, descriptor=descriptor, info=info),
        protocol.pack("REGISTER", stage="a", capacity=1, descriptor=RDMA_LIKE, info=info),
        protocol.pack("HEARTBEAT", load=3, stats=stats),
        protocol.pack("HEARTBEAT"),
        protocol.pack("STARTED", job=JOB, stage="a"),
        protocol.pack("PROGRESS", job=JOB, stage="b", step=3, total=40),
        protocol.pack("DONE", job=JOB, stage="a", timings={"wait_s": -0.000001, "run_s": 0.000012, "out_bytes": 16}),
        protocol.pack("DONE", job=JOB, stage="c", timings={"wait_s": 0.1, "run_s": 2.5, "out_bytes": 0},
                      result={"path": "/data/results/x.mp4", "frames": 81, "synthetic": True, "seconds": 0.05}),
        protocol.pack("FAILED", job=JOB, stage="a", reason="RuntimeError: " + "x" * 2000, retryable=True),
        protocol.pack("DISCONNECT"),
        protocol.pack("SUBMIT", workflow="zero3", params={"n": 5, "t": time.time()}),
        protocol.pack("SUBMIT", workflow="wan_i2v", params={"prompt": "p" * 2000, "seed": 2**63 - 1,
                                                            "guidance_scale": 5.0},
                      payload={"image": os.urandom(1 << 20)}),
    ]
    good, bad = protocol.unpack_frame(protocol.packed_array(bodies))
    assert bad == []
    assert len(good) == len(bodies)


def test_every_message_the_broker_sends_validates():
    wf = load_workflow("synthetic3")
    core = Core({wf.name: wf})
    out = []
    for i, stage in enumerate("abc"):
        out += core.register(f"w-{stage}", stage, 4, {**RDMA_LIKE, "id": f"w-{stage}"}, float(i), {"pid": i})
    out += core.submit(JOB, wf.name, {"prompt": "p", "seed": 1}, {"image": b"\x89PNG" + bytes(1000)}, 3.0)
    out += core.started("w-a", JOB, "a", 3.1)
    out += core.progress("w-a", JOB, "a", 1, 2, 3.2)
    out += core.done("w-a", JOB, "a", 3.3, timings={"run_s": 1.0})
    out += core.done("w-b", JOB, "b", 3.4, timings={"run_s": 1.0})
    out += core.drain("w-c", 3.5)
    out += core.cancel(JOB, 3.6)
    bodies = [protocol.pack(c.kind, **c.body) for c in out if isinstance(c, ToWorker)]
    assert {"TASK", "SEND", "DRAIN"} <= {c.kind for c in out if isinstance(c, ToWorker)}
    bodies += [protocol.pack("REGISTERED", heartbeat_s=2.5, liveness=3), protocol.pack("HEARTBEAT"),
               protocol.pack("ERROR", reason="unknown worker: register again", reregister=True),
               protocol.pack("ERROR", reason="unknown stage 'x'"), protocol.pack("SUBMITTED", job=JOB)]
    good, bad = protocol.unpack_frame(protocol.packed_array(bodies))
    assert bad == []
    assert len(good) == len(bodies)


def nested(depth: int) -> dict:
    d: dict = {"x": 1}
    for _ in range(depth):
        d = {"x": d}
    return d


# (message, the field its refusal must name): wrong nested types and sizes, one or more per kind
BAD: list[tuple[dict, str]] = [
    (msg("REGISTER", stage="a", capacity=0, descriptor={}), "capacity"),
    (msg("REGISTER", stage="a", capacity=1 << 40, descriptor={}), "capacity"),
    (msg("REGISTER", stage="a", capacity=True, descriptor={}), "capacity"),
    (msg("REGISTER", stage="a" * 300, capacity=1, descriptor={}), "stage"),
    (msg("REGISTER", stage="a", capacity=1, descriptor=nested(20)), "descriptor"),
    (msg("REGISTER", stage="a", capacity=1, descriptor={f"k{i}": i for i in range(5000)}), "descriptor"),
    (msg("REGISTER", stage="a", capacity=1, descriptor={b"bytes key": 1}), "descriptor"),
    (msg("REGISTER", stage="a", capacity=1, descriptor={"id": "x" * 100_000}), "descriptor"),
    (msg("REGISTER", stage="a", capacity=1, descriptor={}, info=["pid", 1]), "info"),
    (msg("REGISTER", stage="a", capacity=1, descriptor={}, info={"pid": msgpack.ExtType(1, b"x")}), "info"),
    (msg("HEARTBEAT", load=-1), "load"),
    (msg("HEARTBEAT", load="3"), "load"),
    (msg("HEARTBEAT", stats=[1, 2]), "stats"),
    (msg("HEARTBEAT", stats={"bytes_sent": [1]}), "stats.bytes_sent"),
    (msg("HEARTBEAT", stats={"auto_choices": {"shm": "many"}}), "stats.auto_choices.shm"),
    (msg("HEARTBEAT", stats={"auto_choices": {"shm": {"deeper": 1}}}), "stats.auto_choices.shm"),
    (msg("HEARTBEAT", stats={"bytes_sent": math.nan}), "stats.bytes_sent"),
    (msg("HEARTBEAT", stats={"bytes_sent": math.inf}), "stats.bytes_sent"),
    (msg("HEARTBEAT", stats={f"k{i}": i for i in range(1000)}), "stats"),
    (msg("HEARTBEAT", stats={"auto_choices": {f"t{i}": i for i in range(1000)}}), "stats.auto_choices"),
    (msg("HEARTBEAT", stats={"transport": "t" * 10_000}), "stats.transport"),
    (msg("HEARTBEAT", stats={"k" * 1000: 1}), "stats"),
    (msg("STARTED", job=["x"], stage="a"), "job"),
    (msg("STARTED", job=JOB, stage="a" * 1000), "stage"),
    (msg("PROGRESS", job=JOB, stage="a", step=-1, total=10), "step"),
    (msg("PROGRESS", job=JOB, stage="a", step=1, total="10"), "total"),
    (msg("PROGRESS", job=JOB, stage="a", step=1 << 40, total=1), "step"),
    (msg("STARTED", job=JOB, stage="a", resumed_from_step=-3), "resumed_from_step"),
    (msg("CHECKPOINT", job=JOB, stage="a", step=0, holder="w"), "step"),
    (msg("CHECKPOINT", job=JOB, stage="a", step=4, holder=["w"]), "holder"),
    (msg("HANDOFF", job=JOB, stage="a", step="7"), "step"),
    (msg("TASK", job=JOB, stage="a", attempt=1, params={}, inputs=[], checkpoint_to={"worker": "w", "stage": "b"}),
     "checkpoint_to.descriptor"),
    (msg("TASK", job=JOB, stage="a", attempt=1, params={}, inputs=[], resume_step=-1), "resume_step"),
    (msg("SEND", job=JOB, stage="a", to="w", to_stage="b", descriptor={}, names=[], resume_step="x"), "resume_step"),
    (msg("REGISTER", stage="a", capacity=1, descriptor={}, model=["m"]), "model"),
    (msg("DONE", job=JOB, stage="a", timings={"run_s": "fast"}), "timings.run_s"),
    (msg("DONE", job=JOB, stage="a", timings={"run_s": math.nan}), "timings.run_s"),
    (msg("DONE", job=JOB, stage="a", timings=[1.0]), "timings"),
    (msg("DONE", job=JOB, stage="a", timings={f"t{i}": 1 for i in range(1000)}), "timings"),
    (msg("DONE", job=JOB, stage="a", result=[1]), "result"),
    (msg("DONE", job=JOB, stage="a", result=nested(50)), "result"),
    (msg("FAILED", job=JOB, stage="a", reason="x" * 100_000, retryable=True), "reason"),
    (msg("FAILED", job=JOB, stage="a", reason="boom", retryable="yes"), "retryable"),
    (msg("SUBMIT", workflow=7, params={}), "workflow"),
    (msg("SUBMIT", workflow="synthetic3", params=[1]), "params"),
    (msg("SUBMIT", workflow="synthetic3", params=nested(50)), "params"),
    (msg("SUBMIT", workflow="synthetic3", params={}, payload="image"), "payload"),
    (msg("TASK", job=JOB, stage="a", attempt=1, params={}, inputs=[{"stage": 5, "names": []}]), "inputs[0].stage"),
    (msg("TASK", job=JOB, stage="a", attempt=1, params={}, inputs=["a"]), "inputs[0]"),
    (msg("TASK", job=JOB, stage="a", attempt=0, params={}, inputs=[]), "attempt"),
    (msg("SEND", job=JOB, stage="a", to="w", to_stage="b", descriptor={}, names=[1]), "names[0]"),
    (msg("RELEASE", job=JOB, stage=None), "stage"),
    (msg("CANCEL", job=JOB * 100, stage="a"), "job"),
    (msg("REGISTERED", heartbeat_s=-1.0, liveness=3), "heartbeat_s"),
    (msg("ERROR", reason="x", reregister="yes"), "reregister"),
    (msg("SUBMITTED", job=None), "job"),
]


@pytest.mark.parametrize("body, field", BAD, ids=[f"{b['k']}-{f}-{i}" for i, (b, f) in enumerate(BAD)])
def test_a_malformed_field_is_refused_naming_it(body, field):
    reason = refusal(body)
    assert reason.startswith(f"{body['k']}: field '{field}'"), reason
    assert len(reason) < 300  # a peer's input is never echoed at length
    assert protocol.problem(reason) == body["k"]


def test_optional_fields_may_be_absent_or_nil_and_unknown_ones_are_ignored():
    assert validate(msg("HEARTBEAT", load=None, stats=None))
    assert validate(msg("DONE", job=JOB, stage="a"))
    assert validate(msg("DONE", job=JOB, stage="a", timings=None, result=None))
    assert validate(msg("REGISTER", stage="a", capacity=1, descriptor={}))
    assert validate(msg("STARTED", job=JOB, stage="a", later_version_field=[1, 2]))
    # the old wording for a missing or mistyped field is kept
    assert refusal(msg("STARTED", stage="a")) == "STARTED: field 'job' missing or not str"
    assert refusal(msg("PROGRESS", job=JOB, stage="a", step=True, total=1)) == \
        "PROGRESS: field 'step' missing or not int"


def test_refusals_of_hostile_input_are_short_and_fall_in_few_problem_kinds():
    reasons = [refusal(msg("X" * 1_000_000)), refusal({"v": "9" * 1_000_000, "k": "DONE"}), refusal([1]),
               refusal(msg(["REGISTER"] * 1_000_000)), refusal(msg(msgpack.ExtType(1, b"x" * 1_000_000)))]
    reasons += protocol.unpack_frame(b"\xc1" * 1000)[1] + protocol.unpack_frame(b"x" * (protocol.MAX_BODY + 1))[1]
    assert {protocol.problem(r) for r in reasons} == {"unknown kind", "version", "not a map", "not msgpack",
                                                      "frame too large"}
    assert protocol.problem("anything else at all") == "other"
    for bad in (msg("HEARTBEAT", stats={b"k" * 10_000_000: 1}), msg("HEARTBEAT", stats={"k" * 10_000_000: 1}),
                msg("REGISTER", stage="a", capacity=1, descriptor={"x": [{b"k" * 10_000_000: 1}]}),
                msg("HEARTBEAT", load="9" * 10_000_000)):
        reasons.append(refusal(bad))
        assert protocol.problem(reasons[-1]) == bad["k"]
    assert all(len(r) < 300 for r in reasons), [len(r) for r in reasons]


def test_every_kind_in_the_protocol_has_a_declaration():
    kinds = {"REGISTER", "HEARTBEAT", "STARTED", "PROGRESS", "CHECKPOINT", "HANDOFF", "DONE", "FAILED",
             "DISCONNECT", "SUBMIT",
             "REGISTERED", "TASK", "SEND", "RELEASE", "CANCEL", "DRAIN", "ERROR", "SUBMITTED"}
    assert set(protocol.SCHEMA) == kinds


def test_the_log_limiter_writes_one_line_per_key_and_interval_and_counts_the_rest():
    now = [100.0]
    limit = LogLimiter(interval_s=5.0, max_keys=3, clock=lambda: now[0])
    assert limit.admit("a") == ""
    assert [limit.admit("a") for _ in range(999)] == [None] * 999
    assert limit.admit("b") == ""  # another kind of problem has its own line
    now[0] += 5.0
    assert "999" in limit.admit("a")  # the next line says how many were held back
    assert limit.admit("a") is None
    now[0] += 60.0
    assert "1 more" in limit.admit("a") and limit.admit("b") == ""
    # keys past max_keys share one, so varied input cannot open a line each
    assert limit.admit("c") == ""
    assert [limit.admit(f"k{i}") for i in range(100)] == [""] + [None] * 99


# -- a real broker and a hostile DEALER ---------------------------------------------------------------


class Peer:
    """A raw DEALER on the broker's control socket; remembers everything the broker sent it."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, ident: bytes):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, ident)
        self.sock.connect(endpoint)
        self.got: list[dict] = []

    async def send(self, *bodies: dict | bytes) -> None:
        for body in bodies:
            await self.sock.send(body if isinstance(body, bytes) else msgpack.packb(body))

    async def expect(self, kind: str, timeout: float = 30.0) -> dict:
        """The next message of ``kind`` (earlier ones of other kinds are kept in ``got``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            frame = await asyncio.wait_for(self.sock.recv(), max(left, 0.01))
            good, bad = protocol.unpack_frame(frame)
            assert bad == [], bad  # what the broker sends passes the same schema
            for m in good:
                self.got.append(m)
            for m in good:
                if m["k"] == kind:
                    return m

    def close(self) -> None:
        self.sock.close(linger=0)


class Stack:
    """A running broker with its REST API, and the raw peers a test opened on it."""

    def __init__(self, broker: Broker, port: int, ctx: zmq.asyncio.Context, http: aiohttp.ClientSession):
        self.broker, self.port, self.ctx, self.http = broker, port, ctx, http
        self.peers: list[Peer] = []

    def peer(self, ident: bytes) -> Peer:
        p = Peer(self.ctx, self.broker.endpoint, ident)
        self.peers.append(p)
        return p

    async def metrics(self) -> str:
        async with self.http.get(f"http://127.0.0.1:{self.port}/metrics") as resp:
            text = await resp.text()
            assert resp.status == 200, text[:2000]
            return text

    def bad(self) -> float:
        return self.broker.metrics.bad_messages._value.get()


async def until(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture
async def stack(tmp_path):
    # a long heartbeat: no raw peer of a test is expired while it runs
    settings = load_settings(env={}, data_dir=tmp_path, control="tcp://127.0.0.1:*", workflows=["synthetic3"],
                             heartbeat_s=30.0)
    broker = Broker(settings)
    await broker.start()
    runner = None
    ctx = zmq.asyncio.Context()
    s = None
    try:
        runner, port = await start_api(broker, "127.0.0.1", 0)
        async with aiohttp.ClientSession() as http:
            s = Stack(broker, port, ctx, http)
            yield s
    finally:
        for p in s.peers if s is not None else ():
            p.close()
        ctx.term()
        if runner is not None:
            await runner.cleanup()
        await broker.stop()


async def register(peer: Peer, stage: str = "a") -> dict:
    await peer.send(msg("REGISTER", stage=stage, capacity=2, descriptor={"transport": "tcp", "id": "x"},
                        info={"pid": 1}))
    return await peer.expect("REGISTERED")


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            out[labels] = float(value)
    return out


async def test_an_unregistered_heartbeat_is_not_kept_and_metrics_stay_up(stack):
    evil = stack.peer(b"evil")
    # malformed stats: refused at the boundary
    await evil.send(msg("HEARTBEAT", load=1, stats={"bytes_sent": "x", "auto_choices": [1, 2]}))
    await until(lambda: stack.bad() == 1)
    # well-formed stats from a peer that never registered: told to register, nothing kept
    await evil.send(msg("HEARTBEAT", load=1, stats={"transport": "tcp", "bytes_sent": 5, "auto_choices": {"tcp": 1}}))
    error = await evil.expect("ERROR")
    assert error["reregister"] is True
    assert stack.broker._worker_stats == {}
    assert stack.broker.worker_stats() == {}
    text = await stack.metrics()
    assert samples(text, "onepiece_transport_choices_total") == {}
    assert "onepiece_bad_control_messages_total 1.0" in text


async def test_a_registered_worker_with_hostile_stats_cannot_break_metrics(stack):
    good, evil = stack.peer(b"good"), stack.peer(b"evil")
    await register(good, "a")
    await register(evil, "a")
    await good.send(msg("HEARTBEAT", load=0, stats={
        "transport": "tcp", "bytes_sent": 100, "bytes_received": 50, "auto_choices": {"shm": 2},
        "orphans_dropped": 2, "orphan_bytes_dropped": 300, "orphan_bytes_held": 40, "data_refused": 4,
        "connections_refused": 5}))
    hostile = {"transport": "tcp", "bytes_sent": 1e308, "bytes_received": -5, "messages_sent": "many",
               "auto_choices": {"shm": -1, "tcp": 3, "rdma": -(2**63), "x": 2**63},
               "orphans_dropped": "lots", "orphan_bytes_dropped": -1, "orphan_bytes_held": 1e308}
    await evil.send(msg("HEARTBEAT", load=0, stats=hostile))
    await until(lambda: stack.broker._worker_stats.get("evil") == hostile and "good" in stack.broker._worker_stats)
    text = await stack.metrics()
    assert samples(text, "onepiece_transport_bytes_total") == {
        '{direction="sent",stage="a",transport="tcp"}': 100.0,
        '{direction="received",stage="a",transport="tcp"}': 50.0}
    assert samples(text, "onepiece_transport_choices_total") == {
        '{stage="a",transport="shm"}': 2.0, '{stage="a",transport="tcp"}': 3.0}
    assert samples(text, "onepiece_orphan_dropped_messages_total") == {'{stage="a"}': 2.0}
    assert samples(text, "onepiece_orphan_dropped_bytes_total") == {'{stage="a"}': 300.0}
    assert samples(text, "onepiece_orphan_held_bytes") == {'{stage="a"}': 40.0}
    assert samples(text, "onepiece_data_refused_messages_total") == {'{stage="a"}': 4.0}
    assert samples(text, "onepiece_data_refused_connections_total") == {'{stage="a"}': 5.0}
    # junk that does not fit the schema never reaches the broker's state at all
    before = stack.bad()
    for stats in ({"transport": {"nested": {"junk": [1]}}}, {f"k{i}": i for i in range(10_000)},
                  {"bytes_sent": math.inf}, {"auto_choices": {"shm": {"a": {"b": 1}}}}, {"x": b"\x00" * 100}):
        await evil.send(msg("HEARTBEAT", load=0, stats=stats))
    await until(lambda: stack.bad() == before + 5)
    assert stack.broker._worker_stats["evil"] == hostile
    assert "onepiece_orphan_held_bytes" in await stack.metrics()


async def test_every_kind_with_bad_nested_fields_is_refused_and_counted_and_the_broker_keeps_serving(stack):
    evil = stack.peer(b"evil")
    await register(evil, "a")  # a registered peer: its refusals come from the schema, not the registry
    before = stack.bad()
    await evil.send(*(body for body, _ in BAD))
    await until(lambda: stack.bad() == before + len(BAD))
    (w,) = stack.broker.core.stages()["a"]["workers"]
    assert w["id"] == "evil" and w["capacity"] == 2 and w["info"] == {"pid": 1}  # no bad REGISTER got through
    assert stack.broker._worker_stats.get("evil") is None
    await evil.send(msg("DISCONNECT"))
    await until(lambda: not stack.broker.core.stages()["a"]["workers"])
    worker = stack.peer(b"worker-a")
    await register(worker, "a")
    job = stack.broker.submit("synthetic3", {"steps": 1})
    task = await worker.expect("TASK")
    assert task["job"] == job and task["stage"] == "a"
    await worker.send(msg("STARTED", job=job, stage="a"),
                      msg("DONE", job=job, stage="a", timings={"wait_s": 0.0, "run_s": 0.001, "out_bytes": 16}))
    await until(lambda: stack.broker.job(job)["stages"]["a"]["state"] == "done")
    assert 'onepiece_stage_workers{stage="a"} 1.0' in await stack.metrics()


async def test_a_burst_of_bad_messages_writes_a_handful_of_log_lines(stack, caplog):
    caplog.set_level(logging.INFO, logger="onepiece")
    evil = stack.peer(b"evil")
    burst: list[bytes] = []
    for i in range(2000):
        burst.append([
            b"\xc1" + os.urandom(63),  # not msgpack (0xc1 is never used)
            msgpack.packb(msg(f"NOPE{i}")),  # a new unknown kind each time
            msgpack.packb({"v": i, "k": "DONE"}),
            msgpack.packb(msg("HEARTBEAT", stats={"auto_choices": {f"x{i}": "y"}})),
            msgpack.packb(msg("STARTED", job=i, stage="a")),
            msgpack.packb(msg("REGISTER", stage="a", capacity=i + 10_000, descriptor={})),
            msgpack.packb([msg("PROGRESS", job=JOB, stage="a", step=-i, total=1), "not a map"]),
        ][i % 7])
    caplog.clear()
    before = stack.bad()
    for frame in burst:
        await evil.sock.send(frame)
    batches = sum(i % 7 == 6 for i in range(2000))  # their frames hold two bad messages
    await until(lambda: stack.bad() == before + 2000 + batches)
    lines = [r for r in caplog.records if r.name.startswith("onepiece") and r.levelno >= logging.WARNING]
    # one line per kind of problem (8 here) and 5 s: a burst that outlasts 5 s may add a second round
    assert 1 <= len(lines) <= 16, [r.getMessage()[:120] for r in lines]
    assert all(len(r.getMessage()) < 600 for r in lines)
    # a burst of requests the core refuses (a valid REGISTER for a stage nobody serves) is quiet too
    caplog.clear()
    evil.got.clear()
    for i in range(500):
        await evil.send(msg("REGISTER", stage=f"nope{i}", capacity=1, descriptor={}))
    while sum(m["k"] == "ERROR" for m in evil.got) < 500:
        await evil.expect("ERROR")
    lines = [r for r in caplog.records if r.name.startswith("onepiece") and r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 2, [r.getMessage()[:120] for r in lines]
    await stack.metrics()


async def test_a_submit_on_the_control_socket_is_validated_as_over_rest(stack):
    """The attack seen before: SUBMIT sent straight to the control socket skipped REST's
    validation (steps=5000 was accepted). Now the workflow's parameters are checked the same way:
    an out-of-range or unknown parameter is an ERROR naming it, and no job is made."""
    client = stack.peer(b"submitter")
    before = stack.broker.store.counts()
    for params, field in (({"steps": 5000}, "steps"), ({"work": {"b": 1e9}}, "work"), ({"nope": 1}, "nope")):
        await client.send(msg("SUBMIT", workflow="synthetic3", params=params))
        error = await client.expect("ERROR")
        assert field in error["reason"], error
    assert stack.broker.store.counts() == before
    await client.send(msg("SUBMIT", workflow="synthetic3", params={"steps": 5}))
    job = (await client.expect("SUBMITTED"))["job"]
    assert stack.broker.job(job)["params"]["steps"] == 5
