"""Rendezvous grants (transports/grants.py, ring.py I9) back to back: bytearrays, no processes, no sleeps."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transports import codec
from transports.errors import ProtocolError
from transports.grants import MAX_OPEN, Deny, Destroy, Grant, GrantPool, State, rounded
from transports.ring import (
    CREDIT_BYTES,
    GRANT_OFFSET,
    Assembled,
    Assembler,
    Dropped,
    GrantSlot,
    Requested,
    RingConfig,
    RingConsumer,
    RingProducer,
)

from .test_ring import Memory, message

MiB = 1 << 20


def check(pool: GrantPool) -> None:
    """G1-G3 and G7 hold in any reachable state."""
    assert pool.total <= pool.limit  # G2
    answering = {rid for rid in pool._answering.values()}
    for region in pool.regions.values():
        assert region.size % pool.granule == 0
        if region.state is State.FREE:
            assert region.req is None and region.id not in answering and not region.orphan
        else:
            assert pool._answering[(region.conn, region.req)] == region.id  # G1: its own connection's request
    if pool.pending:  # G7: the head waits only when it cannot fit even after destroying FREE regions
        need = rounded(pool.pending[0][2], pool.granule)
        assert pool.limit - pool.total + pool.bytes_in(State.FREE) < need <= pool.limit


def test_a_request_gets_a_region_of_its_connection_and_it_is_reused():
    pool = GrantPool(64 * MiB)
    [g] = pool.request("a", 1, 5 * MiB)
    assert g == Grant("a", 1, g.region, 6 * MiB, True)
    pool.put("a", 1)
    assert pool.release(g.region) == []
    [again] = pool.request("a", 2, 4 * MiB)
    assert again == Grant("a", 2, g.region, 6 * MiB, False)  # pre-faulted region again, not a new one
    [other] = pool.request("b", 1, 4 * MiB)
    assert other.region != g.region and other.new  # G1: b never gets a's region


def test_a_request_that_could_never_fit_is_denied_and_streams():
    pool = GrantPool(16 * MiB)
    assert pool.request("a", 1, 17 * MiB) == [Deny("a", 1)]
    assert not pool.pending and pool.total == 0


def test_a_slow_consumer_holding_grants_makes_requests_wait_then_evicts():
    pool = GrantPool(8 * MiB)
    [g1] = pool.request("a", 1, 6 * MiB)
    pool.put("a", 1)  # the application holds the message
    assert pool.request("b", 1, 4 * MiB) == []  # waits: 8 MiB bound, 6 held
    assert pool.evictable() == 2 * MiB  # copying the held message out is what frees it (G5)
    actions = pool.release(g1.region)
    assert actions == [Destroy("a", g1.region), Grant("b", 1, actions[1].region, 4 * MiB, True)]
    check(pool)


def test_granted_but_unwritten_regions_are_not_for_the_consumer_to_evict():
    pool = GrantPool(8 * MiB)
    pool.request("a", 1, 6 * MiB)  # granted, the producer is still writing
    assert pool.request("b", 1, 4 * MiB) == []
    assert pool.evictable() == 0  # it comes back by itself: PUT then release, DROP, or a.close


def test_a_peer_that_dies_holding_a_grant_gives_it_back():
    pool = GrantPool(8 * MiB)
    [g] = pool.request("a", 1, 6 * MiB)
    assert pool.request("b", 1, 6 * MiB) == []
    actions = pool.close("a")
    assert actions[0] == Destroy("a", g.region) and isinstance(actions[1], Grant) and actions[1].conn == "b"
    with pytest.raises(ProtocolError):
        pool.put("a", 1)


def test_a_held_region_outlives_its_connection_until_released():
    pool = GrantPool(8 * MiB)
    [g] = pool.request("a", 1, 6 * MiB)
    pool.put("a", 1)
    assert pool.close("a") == []  # a message still views it
    assert pool.release(g.region) == [Destroy("a", g.region)]
    assert pool.total == 0


@pytest.mark.parametrize("bad", [
    lambda p: p.put("a", 9),  # PUT without a grant
    lambda p: p.drop("a", 9),
    lambda p: p.request("a", 1, 0),
    lambda p: (p.request("a", 1, MiB), p.request("a", 1, MiB)),  # a request number repeats
])
def test_a_lying_producer_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        bad(GrantPool(8 * MiB))


def test_a_producer_holding_too_many_requests_open_is_a_protocol_error():
    pool = GrantPool(8 * MiB)
    for req in range(1, MAX_OPEN + 1):  # granted or waiting: all open
        pool.request("liar", req, MiB)
    with pytest.raises(ProtocolError, match="requests open"):
        pool.request("liar", MAX_OPEN + 1, MiB)
    pool.request("honest", 1, MiB)  # another connection is not held to the liar's count


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["req", "put", "drop", "release", "close", "evict"]),
                              st.sampled_from(["a", "b", "c"]), st.integers(1, 40 * MiB)), max_size=60))
def test_random_pool_histories_keep_the_invariants(ops):
    pool = GrantPool(48 * MiB)
    granted: dict[tuple, int] = {}
    held: list[int] = []
    reqs = {"a": 0, "b": 0, "c": 0}

    def apply(actions):
        for act in actions:
            if isinstance(act, Grant):
                assert (act.conn, act.req) not in granted
                granted[(act.conn, act.req)] = act.region

    for op, conn, n in ops:
        if op == "req":
            reqs[conn] += 1
            apply(pool.request(conn, reqs[conn], n))
        elif op in ("put", "drop"):
            mine = [k for k in granted if k[0] == conn]
            if mine:
                key = mine[0]
                region = granted.pop(key)
                if op == "put":
                    pool.put(*key)
                    held.append(region)
                else:
                    apply(pool.drop(*key))
        elif op == "release" and held:
            apply(pool.release(held.pop(0)))
        elif op == "close":
            granted = {k: v for k, v in granted.items() if k[0] != conn}
            apply(pool.close(conn))
        elif op == "evict":
            while pool.evictable() and held:
                apply(pool.release(held.pop(0)))
        check(pool)
    # Liveness: with every message released and every grant written, nothing waits (G5).
    while held or granted or pool.pending:
        for key in list(granted):
            pool.put(*key)
            held.append(granted.pop(key))
        while held:
            apply(pool.release(held.pop(0)))
        check(pool)
        assert granted or not pool.pending


# -- the whole rendezvous over the ring: producer, consumer, pool, one-sided memory -------------

class Consumer:
    """What ringtransport does on C's side, without I/O: answer REQs from the pool, deliver PUTs."""

    def __init__(self, config: RingConfig, pool: GrantPool, data: Memory, credit: Memory):
        self.consumer = RingConsumer(config, data.view, credit)
        self.asm = Assembler(self.consumer)
        self.pool = pool
        self.memory: dict[int, bytearray] = {}

    def act(self, actions) -> None:
        for a in actions:
            if isinstance(a, Destroy):
                self.memory.pop(a.region)
            elif isinstance(a, Deny):
                self.consumer.grant(GrantSlot(a.req, 0, 0, b""))
            else:
                if a.new:
                    self.memory[a.region] = bytearray(a.size)
                self.asm.granted[a.req] = memoryview(self.memory[a.region])
                self.consumer.grant(GrantSlot(a.req, a.region, a.size, str(a.region).encode()))

    def poll(self) -> list:
        out = []
        while (rec := self.consumer.poll()) is not None:
            done = self.asm.feed(rec)
            if isinstance(done, Requested):
                self.act(self.pool.request(self, done.req, done.nbytes))
            elif isinstance(done, Dropped):
                self.act(self.pool.drop(self, done.req))
            elif isinstance(done, Assembled):
                region = self.pool.put(self, done.grant).id if done.grant is not None else None
                out.append((done, rec, region))
        return out


class Producer:
    """RingSender's rendezvous as a step machine: REQ, wait for the grant, copy, PUT."""

    def __init__(self, config: RingConfig, data: Memory, credit: Memory, regions: Consumer):
        self.producer = RingProducer(config, data, credit.view)
        self.regions = regions  # how P reaches a granted region: here, C's bytearray by id
        self.queue: list = []  # records still to write
        self.waiting: tuple | None = None  # (req, message) waiting for its grant
        self.req = 0

    def submit(self, header, tensors) -> None:
        self.queue.append(codec.encode(header, tensors))

    def step(self) -> bool:
        p, progressed = self.producer, False
        while True:
            if self.waiting is not None:
                req, msg = self.waiting
                slot = p.grant(req)
                if slot is None:
                    return progressed
                self.waiting = None
                if slot.length:
                    region = memoryview(self.regions.memory[slot.region])
                    pos = 0
                    for part in msg.parts:
                        region[pos : pos + part.nbytes] = part
                        pos += part.nbytes
                    self.queue.insert(0, p.put(req, msg))
                else:
                    self.queue[0:0] = list(p.records(msg))
                progressed = True
            if not self.queue:
                return progressed
            head = self.queue[0]
            if isinstance(head, codec.Encoded):
                if p.by_rendezvous(head.nbytes):
                    self.req += 1
                    self.queue[0] = (self.req, head, p.request(self.req, head.nbytes))
                else:
                    self.queue[0:1] = list(p.records(head))
                continue
            asking = len(head) == 3
            if not p.try_write(*(head[2] if asking else head)):
                return progressed
            self.queue.pop(0)
            if asking:
                self.waiting = head[:2]
            progressed = True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=80_000), min_size=1, max_size=30),
    limit=st.sampled_from([32 << 10, 64 << 10]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_rendezvous_and_ring_traffic_arrive_intact_in_order_without_stalling(sizes, limit, seed):
    """Small messages through the ring, large ones by rendezvous (and the too-large ones denied and
    streamed), a consumer that holds messages at random and obeys I7 and G5 before it would wait:
    every message arrives intact and in order, and something always moves (I6, G5)."""
    rnd = random.Random(seed)
    # grant_max a little over the pool: some requests are denied and streamed (G6)
    config = RingConfig(size=16384, hwm=4096, chunk=2048, grant_min=6000, grant_max=limit + 4096)
    pool = GrantPool(limit, granule=16 << 10)  # a few large messages at once, and some never fit
    data, credit = Memory(config.data_region_bytes), Memory(CREDIT_BYTES)
    c = Consumer(config, pool, data, credit)
    p = Producer(config, data, credit, c)
    expected = [message(i, n, seed) for i, n in enumerate(sizes)]
    for h, t in expected:
        p.submit(h, t)
    got, held, stalls = [], [], 0
    while len(got) < len(expected):
        progressed = p.step()
        for done, rec, region in c.poll():
            progressed = True
            got.append((done.meta["h"], {k: v.clone() for k, v in done.tensors.items()}))
            if done.record is not None or region is not None:
                held.append((done, rec, region))
        rnd.shuffle(held)
        for item in held[: rnd.randint(0, len(held))]:
            held.remove(item)
            release(c, *item)
        # About to wait: drop below the high-water mark (I7), and copy out held grants that keep
        # a waiting request from fitting (G5).
        held.sort(key=lambda item: item[1].start)
        while held and (c.consumer.over_high_water() or pool.evictable()):
            release(c, *held.pop(0))
        check(pool)
        if not progressed:
            stalls += 1
            assert stalls < 3, "no progress although the consumer obeys I7 and G5"
        else:
            stalls = 0
    for (h, t), (gh, gt) in zip(expected, got, strict=True):
        assert gh == h and torch.equal(gt["x"], t["x"])


def release(c: Consumer, done, rec, region) -> None:
    if region is not None:
        c.act(c.pool.release(region))
    else:
        c.consumer.release(rec.start, rec.end)


def test_a_torn_or_stale_grant_slot_is_not_believed():
    config = RingConfig(size=8192, hwm=2048, chunk=1024, grant_min=4096, grant_max=1 << 20)
    data, credit = Memory(config.data_region_bytes), Memory(CREDIT_BYTES)
    consumer = RingConsumer(config, data.view, credit)
    producer = RingProducer(config, data, credit.view)
    credit.cut = 20  # the body lands only in part; the check word comes later
    consumer.grant(GrantSlot(3, 7, 1 << 20, b"seg"))
    assert producer.grant(3) is None or producer.grant(3).region == 7
    credit.land_rest()
    assert producer.grant(3) == GrantSlot(3, 7, 1 << 20, b"seg")
    assert producer.grant(4) is None  # the slot still holds grant 3: not an answer to request 4
    credit.buf[GRANT_OFFSET] ^= 1  # a corrupt request number
    assert producer.grant(3) is None


def test_a_put_without_a_grant_and_an_oversized_put_are_protocol_errors():
    config = RingConfig(size=8192, hwm=2048, chunk=1024, grant_min=64, grant_max=1 << 20)
    data, credit = Memory(config.data_region_bytes), Memory(CREDIT_BYTES)
    consumer = RingConsumer(config, data.view, credit)
    asm = Assembler(consumer)
    producer = RingProducer(config, data, credit.view)
    msg = codec.encode({"i": 0}, {"x": torch.zeros(1000, dtype=torch.uint8)})
    assert producer.try_write(*producer.put(5, msg))
    with pytest.raises(ProtocolError, match="no grant"):
        asm.feed(consumer.poll())
    asm.granted[6] = memoryview(bytearray(100))  # smaller than the PUT says
    assert producer.try_write(*producer.put(6, msg))
    with pytest.raises(ProtocolError, match="into a grant of 100"):
        asm.feed(consumer.poll())
