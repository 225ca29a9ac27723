"""Rendezvous over real shared memory: large messages land in regions the consumer grants, a stage
can compute straight into them, a slow consumer and a dead producer give them back.

(rdma runs the same protocol through the fake NIC: tests/transports/test_rdma.py. The last two
tests need a CUDA device and are skipped without one; a lent H200 ran them.)
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import numpy
import pytest
import torch

from transports import PeerGone, ProtocolError, TransportError, TransportTimeout, codec, open_transport

from .conftest import ROOT, shm_entries, shm_leaks

MiB = 1 << 20
OPTIONS = {"ring_bytes": 4 * MiB, "grant_min_bytes": 2 * MiB, "grant_bytes": 32 * MiB}


@pytest.fixture
async def pair():
    """Two shm endpoints and a sender from the first to the second, all closed at teardown."""
    before = shm_entries()
    a = await open_transport("shm", **OPTIONS)
    b = await open_transport("shm", **OPTIONS)
    sender = await a.connect(b.descriptor, timeout=10)
    yield a, b, sender
    await sender.aclose()
    await a.aclose()
    await b.aclose()
    assert shm_leaks(before) == set()


def in_region(endpoint, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` views one of ``endpoint``'s granted regions (no copy was made for it)."""
    ptr = tensor.data_ptr()
    for region in endpoint._regions.values():
        base = numpy.frombuffer(region.view, numpy.uint8).ctypes.data
        if base <= ptr < base + region.view.nbytes:
            return True
    return False


def payload(mib: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (mib * MiB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


async def test_a_large_message_lands_in_a_granted_region_that_is_reused(pair):
    _, b, sender = pair
    for i in range(3):
        x = payload(6, i)
        await sender.send({"i": i}, {"x": x, "small": torch.arange(10)})
        with await b.recv(timeout=10) as msg:
            assert msg.header == {"i": i} and msg.zero_copy
            assert torch.equal(msg.tensors["x"], x) and torch.equal(msg.tensors["small"], torch.arange(10))
            assert in_region(b, msg.tensors["x"])
        # The same size again gets the same pre-faulted region back: the pool does not grow
        # (6 MiB and the small tensor, rounded up to 2 MiB).
        assert b.stats()["grant_pool_bytes"] == 8 * MiB
    assert b.stats()["grant_pool_limit"] == 32 * MiB


async def test_send_then_recv_in_one_task_does_not_wait_for_a_grant(pair):
    """The consumer is not in recv when the request comes: its doorbell answers it."""
    _, b, sender = pair
    x = payload(3, 1)
    await asyncio.wait_for(sender.send({"i": 0}, {"x": x}, timeout=5), 10)
    with await b.recv(timeout=10) as msg:
        assert torch.equal(msg.tensors["x"], x)


async def test_allocate_lets_the_compute_write_where_the_consumer_reads(pair):
    _, b, sender = pair
    frames = await sender.allocate((3, 1024, 1024), torch.float32)
    torch.manual_seed(0)
    expected = torch.randn(3, 1024, 1024)
    frames.copy_(expected)  # "the compute"
    # Before any send, the consumer's own region already holds the bytes: they were written once.
    [region] = b._regions.values()
    assert torch.equal(torch.frombuffer(region.view, dtype=torch.float32, count=expected.numel()),
                       expected.reshape(-1))
    await sender.send({"frames": 1}, {"frames": frames})
    with await b.recv(timeout=10) as msg:
        assert torch.equal(msg.tensors["frames"], expected) and in_region(b, msg.tensors["frames"])
    # The producer keeps reading its output (a worker holds it until RELEASE): when the consumer
    # grants that region again, the producer first gives its tensor a copy of its own.
    assert torch.equal(frames, expected)
    again = payload(12, 9)
    await sender.send({"again": 1}, {"x": again})
    with await b.recv(timeout=10) as msg:
        assert torch.equal(msg.tensors["x"], again)
    assert torch.equal(frames, expected) and not in_region(b, frames)


async def test_an_allocation_given_back_unused_frees_its_region(pair):
    _, b, sender = pair
    t = await sender.allocate((4 * MiB,), torch.uint8)
    t.fill_(3)
    await sender.discard(t)
    x = payload(30, 2)  # needs nearly the whole pool: only fits once the discarded grant is back
    await sender.send({"i": 1}, {"x": x})
    with await b.recv(timeout=10) as msg:
        assert torch.equal(msg.tensors["x"], x)
    assert bool((t == 3).all())  # the discarded tensor was copied out before its region was written


async def test_a_slow_consumer_holding_grants_has_them_copied_out_instead_of_stalling(pair):
    """The consumer holds two 12 MiB messages of a 32 MiB pool and asks for a third: before it
    waits, it copies the oldest out (G5), and the held tensors keep their values."""
    _, b, sender = pair
    sent = [payload(12, i) for i in range(3)]
    async def send_all():
        for i, x in enumerate(sent):
            await sender.send({"i": i}, {"x": x})

    sending = asyncio.create_task(send_all())
    held = [await b.recv(timeout=10), await b.recv(timeout=10)]
    third = await b.recv(timeout=10)
    await sending
    assert [m.header["i"] for m in (*held, third)] == [0, 1, 2]
    assert not held[0].zero_copy and held[1].zero_copy  # the oldest was copied out, the other still views
    for msg, x in zip((*held, third), sent):
        assert torch.equal(msg.tensors["x"], x)
        msg.release()
    assert b.stats()["grant_pool_bytes"] <= 32 * MiB


async def test_a_message_larger_than_the_pool_streams_through_the_ring(pair):
    _, b, sender = pair
    x = payload(40, 3)
    receiving = asyncio.create_task(b.recv(timeout=20))
    await sender.send({"big": 1}, {"x": x}, timeout=20)
    with await receiving as msg:
        assert torch.equal(msg.tensors["x"], x) and not in_region(b, msg.tensors["x"])


async def test_when_no_region_can_be_made_the_message_streams_instead(pair, monkeypatch):
    """A full /dev/shm (simulated: filling the machine's would disturb everything else on it) makes
    region creation fail: the request is denied, the message streams through the ring and arrives."""
    _, b, sender = pair

    def full(size):
        raise TransportError(f"cannot allocate {size >> 20} MiB of shared memory in /dev/shm: [Errno 28]")

    monkeypatch.setattr(b, "_make_region", full)
    x = payload(6, 5)
    receiving = asyncio.create_task(b.recv(timeout=20))
    await sender.send({"i": 1}, {"x": x}, timeout=20)
    with await receiving as msg:
        assert torch.equal(msg.tensors["x"], x) and not in_region(b, msg.tensors["x"])
    assert b.stats()["grant_pool_bytes"] == 0


async def test_a_put_for_a_grant_never_made_is_refused_and_the_endpoint_serves_on(pair):
    a, b, sender = pair
    producer = sender._producer
    assert producer.try_write(*producer.put(99, codec.encode({"lie": 1}, {"x": torch.zeros(4 * MiB)})))
    sender._channel.ring()
    with pytest.raises(ProtocolError, match="holds no grant"):
        await b.recv(timeout=10)
    async with await a.connect(b.descriptor, timeout=10) as fresh:
        x = payload(5, 4)
        await fresh.send({"ok": 1}, {"x": x})
        with await b.recv(timeout=10) as msg:
            assert torch.equal(msg.tensors["x"], x)


HOLDER = textwrap.dedent("""
    import asyncio, json, sys
    import torch
    from transports import open_transport

    async def main():
        a = await open_transport("shm")
        sender = await a.connect(json.loads(sys.argv[1]), timeout=10)
        t = await sender.allocate((8 << 20,), torch.uint8)
        print("granted", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


@pytest.mark.timeout(60)
async def test_a_producer_that_dies_holding_a_grant_gives_it_back():
    before = shm_entries()
    b = await open_transport("shm", **OPTIONS)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, __import__("json").dumps(b.descriptor)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        receiving = asyncio.create_task(b.recv(timeout=30))
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == "granted" and not receiving.done()
        assert b.stats()["grant_pool_bytes"] == 8 * MiB
        proc.kill()
        with pytest.raises(PeerGone, match="never put"):
            await receiving
        with pytest.raises(TransportTimeout):  # reported once
            await b.recv(timeout=0.3)
        assert b.stats()["grant_pool_bytes"] == 0  # its region is destroyed, not kept for a dead peer
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        await b.aclose()
    assert shm_leaks(before) == set()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
async def test_a_device_tensor_goes_by_rendezvous_into_a_pinned_region(pair):
    _, b, sender = pair
    x = torch.randn(3, 1024, 1024, device="cuda")  # 12 MiB: by rendezvous
    for i in range(2):
        await sender.send({"i": i}, {"x": x, "small": torch.arange(5, device="cuda")})
        with await b.recv(timeout=10) as msg:
            assert msg.zero_copy and msg.tensors["x"].device.type == "cpu"
            assert torch.equal(msg.tensors["x"], x.cpu())
            assert torch.equal(msg.tensors["small"], torch.arange(5))
    # The region was registered with CUDA once (a nonzero address), and it was the same region twice.
    assert len(sender._pinned) == 1 and all(sender._pinned.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
async def test_a_stage_copies_its_device_output_straight_into_a_granted_tensor(pair):
    _, b, sender = pair
    video = torch.rand(3, 9, 256, 256, device="cuda")  # 7 MiB of frames, as vae_decode makes them
    out = await sender.allocate(tuple(video.shape), video.dtype)
    assert out.device.type == "cpu"
    out.copy_(video)  # the one device-to-host copy
    await sender.send({"frames": 1}, {"video": out})
    with await b.recv(timeout=10) as msg:
        assert torch.equal(msg.tensors["video"], video.cpu())
    assert torch.equal(out, video.cpu())
