"""The double-ring protocol wired back to back: two bytearrays, no processes, no sleeps."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transports import codec
from transports.errors import ProtocolError
from transports.ring import (
    CHUNK,
    CONTROL_BYTES,
    CREDIT_BYTES,
    GRANULE,
    MSG,
    START,
    Assembler,
    RingConfig,
    RingConsumer,
    RingProducer,
    record_bytes,
)


class Memory:
    """A peer's region seen through one-sided writes, with a doorbell counter.

    ``cut`` limits how many bytes of the *next* write land, to model a
    record that is still arriving; ``land_rest`` delivers the remainder.
    """

    def __init__(self, size: int):
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.bells = 0
        self.cut: int | None = None
        self.pending: list[tuple[int, bytes]] = []

    def write(self, offset: int, parts) -> None:
        data = b"".join(bytes(p) for p in parts)
        if self.cut is not None:
            now, later = data[: self.cut], data[self.cut :]
            self.cut = None
            self.pending.append((offset + len(now), later))
            data = now
        self.buf[offset : offset + len(data)] = data

    def land_rest(self) -> None:
        for offset, data in self.pending:
            self.buf[offset : offset + len(data)] = data
        self.pending.clear()

    def notify(self) -> None:
        self.bells += 1


def pair(config: RingConfig):
    data, credit = Memory(config.data_region_bytes), Memory(CREDIT_BYTES)
    producer = RingProducer(config, data, credit.view)
    consumer = RingConsumer(config, data.view, credit)
    return producer, consumer, Assembler(consumer), data, credit


def message(i: int, nbytes: int, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed * 100003 + i)
    return {"i": i}, {"x": torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)}


def send(producer: RingProducer, header, tensors) -> list:
    """Write a message's records; return those that did not fit (to retry)."""
    return list(producer.records(codec.encode(header, tensors)))


def test_single_message_is_a_view_into_the_ring():
    producer, consumer, asm, data, _ = pair(RingConfig.for_size(64 << 10))
    header, tensors = message(0, 1000)
    for rec in send(producer, header, tensors):
        assert producer.try_write(*rec)
    rec = consumer.poll()
    assert rec.kind == MSG
    out = asm.feed(rec)
    assert out.meta["h"] == header and torch.equal(out.tensors["x"], tensors["x"])
    # The tensor really lives in the ring: changing the ring changes it.
    out.tensors["x"][0] = 7
    assert 7 in bytes(data.buf[CONTROL_BYTES : CONTROL_BYTES + 4096])
    assert consumer.poll() is None


def test_message_larger_than_the_ring_streams_as_chunks():
    config = RingConfig.for_size(64 << 10)
    producer, consumer, asm, _, _ = pair(config)
    header, tensors = message(1, 300_000)
    records = send(producer, header, tensors)
    assert records[0][0] == START and all(r[0] == CHUNK for r in records[1:])
    out, pending = None, list(records)
    while pending or out is None:
        while pending and producer.try_write(*pending[0]):
            pending.pop(0)
        while (rec := consumer.poll()) is not None:
            out = asm.feed(rec) or out
    assert torch.equal(out.tensors["x"], tensors["x"]) and out.record is None
    assert consumer.held == 0  # every chunk was released once copied


def test_producer_never_overwrites_unreleased_records():
    config = RingConfig(size=8192, hwm=2048, chunk=1024)
    producer, consumer, asm, _, _ = pair(config)
    held = []
    i = 0
    while True:
        header, tensors = message(i, 900)
        (rec,) = send(producer, header, tensors)
        if not producer.try_write(*rec):
            break
        out = asm.feed(consumer.poll())
        held.append((out, tensors["x"].clone()))
        i += 1
    assert i >= 5
    # Full: every held view is still intact, and nothing more fits until a release.
    assert all(torch.equal(o.tensors["x"], x) for o, x in held)
    assert not producer.try_write(*rec)
    first = held[0][0].record
    consumer.release(first.start, first.end)
    assert producer.try_write(*rec)


def test_credit_advances_only_over_a_contiguous_prefix():
    producer, consumer, asm, _, credit = pair(RingConfig(size=16384, hwm=4096, chunk=1024))
    recs = []
    for i in range(4):
        (r,) = send(producer, *message(i, 500))
        assert producer.try_write(*r)
        recs.append(consumer.poll())
    assert not consumer.release(recs[2].start, recs[2].end)
    assert not consumer.release(recs[1].start, recs[1].end)
    assert consumer.released == 0 and producer.refresh_credit() == 0
    assert consumer.release(recs[0].start, recs[0].end)
    assert consumer.released == recs[2].end == producer.refresh_credit()
    assert consumer.held == recs[3].end - recs[3].start


def test_pad_record_when_the_tail_is_too_small():
    config = RingConfig(size=8192, hwm=2048, chunk=1024)
    producer, consumer, asm, _, _ = pair(config)
    (r,) = send(producer, *message(0, 5000))
    assert producer.try_write(*r)
    rec = consumer.poll()
    consumer.release(rec.start, rec.end)
    tail = config.size - producer.write_pos
    (r2,) = send(producer, *message(1, 3000))
    assert record_bytes(r2[2]) > tail
    assert producer.try_write(*r2)
    rec2 = consumer.poll()  # the PAD is consumed and released inside poll
    assert rec2.start == config.size and rec2.kind == MSG
    assert torch.equal(asm.feed(rec2).tensors["x"], message(1, 3000)[1]["x"])
    assert consumer.released == config.size


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=0, max_value=2200), size=st.integers(min_value=0, max_value=2000))
def test_a_torn_record_is_never_consumed(cut, size):
    producer, consumer, asm, data, _ = pair(RingConfig(size=8192, hwm=2048, chunk=1024))
    header, tensors = message(0, size)
    (r,) = send(producer, header, tensors)
    total = record_bytes(r[2])
    data.cut = min(cut, total - 1)
    assert producer.try_write(*r)
    assert consumer.poll() is None  # anything short of the trailer is not a record
    data.land_rest()
    assert torch.equal(asm.feed(consumer.poll()).tensors["x"], tensors["x"])


def test_a_torn_credit_write_is_ignored():
    producer, consumer, asm, _, credit = pair(RingConfig(size=8192, hwm=2048, chunk=1024))
    (r,) = send(producer, *message(0, 100))
    producer.try_write(*r)
    rec = consumer.poll()
    credit.cut = 8  # only the position lands, not its check word
    consumer.release(rec.start, rec.end)
    assert producer.refresh_credit() == 0
    credit.land_rest()
    assert producer.refresh_credit() == rec.end


def test_doorbells_follow_the_flags():
    producer, consumer, asm, data, credit = pair(RingConfig(size=8192, hwm=2048, chunk=1024))
    assert not producer.consumer_sleeping()
    consumer.set_sleeping(True)
    assert producer.consumer_sleeping()
    (r,) = send(producer, *message(0, 100))
    producer.try_write(*r)
    rec = consumer.poll()
    consumer.release(rec.start, rec.end)
    assert data.bells == 0  # P was not waiting: no doorbell for credit
    producer.set_waiting(True)
    (r,) = send(producer, *message(1, 100))
    producer.try_write(*r)
    rec = consumer.poll()
    consumer.release(rec.start, rec.end)
    assert credit.bells == 1


def test_chunk_outside_a_streamed_message_is_a_protocol_error():
    producer, consumer, asm, _, _ = pair(RingConfig(size=8192, hwm=2048, chunk=1024))
    producer.try_write(CHUNK, (b"x" * 10,), 10)
    with pytest.raises(ProtocolError):
        asm.feed(consumer.poll())


def test_garbage_meta_is_a_protocol_error():
    producer, consumer, asm, _, _ = pair(RingConfig(size=8192, hwm=2048, chunk=1024))
    producer.try_write(MSG, (b"\x10\x00\x00\x00" + b"\xc1" * 60,), 64)
    with pytest.raises(ProtocolError):
        asm.feed(consumer.poll())


def test_config_rejects_records_that_could_not_circulate():
    with pytest.raises(ValueError):
        RingConfig(size=4096, hwm=4096, chunk=64)
    with pytest.raises(ValueError):
        RingConfig(size=4096, hwm=1024, chunk=4096)
    c = RingConfig.for_size(32 << 20)
    assert c.max_record <= c.size - c.hwm and c.size % GRANULE == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=20_000), min_size=1, max_size=40),
    ring=st.sampled_from([4096, 8192, 12288, 65536]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_random_traffic_across_the_wrap_point(sizes, ring, seed):
    """Random sizes, random holding and out-of-order releases, with the
    consumer's high-water rule: every message arrives intact and in order,
    and the producer always makes progress (I6, I7)."""
    rnd = random.Random(seed)
    config = RingConfig.for_size(ring)
    producer, consumer, asm, _, _ = pair(config)
    expected = [message(i, n, seed) for i, n in enumerate(sizes)]
    queue = [rec for h, t in expected for rec in send(producer, h, t)]
    got: list = []
    held: list = []
    stalls = 0
    while len(got) < len(expected):
        progressed = False
        while queue and producer.try_write(*queue[0]):
            queue.pop(0)
            progressed = True
        while (rec := consumer.poll()) is not None:
            progressed = True
            out = asm.feed(rec)
            if out is None:
                continue
            got.append((out.meta["h"], {k: v.clone() for k, v in out.tensors.items()}))
            if out.record is not None:
                held.append(out.record)
        # Release some held records, in random order.
        rnd.shuffle(held)
        for r in held[: rnd.randint(0, len(held))]:
            consumer.release(r.start, r.end)
            held.remove(r)
        if consumer.poll() is None and consumer.over_high_water():
            # The consumer is about to wait: it must first drop below the mark.
            held.sort(key=lambda r: r.start)
            while held and consumer.over_high_water():
                r = held.pop(0)
                consumer.release(r.start, r.end)
        if not progressed:
            stalls += 1
            assert stalls < 3, "no progress although the consumer obeys the high-water rule"
        else:
            stalls = 0
    for (h, t), (gh, gt) in zip(expected, got):
        assert gh == h and torch.equal(gt["x"], t["x"])


def test_stale_bytes_from_an_earlier_lap_are_not_records():
    config = RingConfig(size=4096, hwm=1024, chunk=512)
    producer, consumer, asm, data, _ = pair(config)
    for i in range(20):  # several laps
        for r in send(producer, *message(i, 700)):
            assert producer.try_write(*r)
        rec = consumer.poll()
        assert asm.feed(rec).meta["h"] == {"i": i}
        consumer.release(rec.start, rec.end)
        assert consumer.poll() is None
    assert producer.write_pos > 3 * config.size
