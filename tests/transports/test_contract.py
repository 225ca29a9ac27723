"""The contract every transport keeps, checked across real processes.

Each test runs once per transport in ``conftest.OPTIONS``; the other end of
every exchange is a ``tests.transports.peer`` process. Contents are compared
by sha256 digests computed on both sides.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from transports import PeerGone, TransportTimeout, codec

from .conftest import shm_entries, shm_leaks
from .peer import checksum, messages

pytestmark = pytest.mark.timeout(120)


def spec(**fields) -> str:
    return json.dumps(fields)


async def send_all(sender, spec: dict, started: asyncio.Event | None = None) -> list[str]:
    sums = []
    for header, tensors in messages(spec):
        if started is not None:
            started.set()
        await sender.send(header, tensors, timeout=60)
        sums.append(checksum(tensors))
    return sums


async def receive(endpoint, count: int) -> list[tuple[dict, str, str]]:
    out = []
    for _ in range(count):
        with await endpoint.recv(timeout=60) as msg:
            out.append((msg.header, msg.peer, checksum(msg.tensors)))
    return out


async def assert_still_serves(endpoint, peers) -> None:
    """A fresh peer can connect to ``endpoint`` and ``endpoint`` to it."""
    echo = await peers("echo", "1", json.dumps(endpoint.descriptor))
    tensors = {"x": torch.arange(1000, dtype=torch.float32)}
    async with await endpoint.connect(echo.descriptor, timeout=30) as sender:
        await sender.send({"seq": 0}, tensors, timeout=30)
        with await endpoint.recv(timeout=30) as msg:
            assert msg.header == {"seq": 0}
            assert torch.equal(msg.tensors["x"], tensors["x"])
    assert await echo.until("echoed") == {"echoed": 1}
    assert await echo.wait() == 0


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """Per dtype: a transposed and a strided (non-contiguous) tensor, a 0-d and a 0-element one."""
    out = {}
    base = torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4)
    for name, dt in codec.DTYPES.items():
        if dt == torch.bool:
            t = base % 3 == 0
        elif dt.is_complex:
            t = torch.complex(base.double(), -base.double() / 3).to(dt)
        elif dt.is_floating_point:
            t = (base / 4).to(dt)
            t[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
        else:
            info = torch.iinfo(dt)
            t = (base + 6 if info.min == 0 else base).to(dt)
            t[0, 0], t[0, 1] = info.max, info.min
        out[f"{name}_transposed"] = t.t()
        out[f"{name}_strided"] = t[:, ::2]
        out[f"{name}_0d"] = t[1, 1].clone()
        out[f"{name}_empty"] = t[:0]
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (so NaN and -0.0 count)."""
    bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


async def test_ordering(endpoint, peers):
    sink = await peers("sink", "500")
    order = {"count": 500, "sizes": [i * 37 % 5000 for i in range(50)], "name": "test"}
    async with await endpoint.connect(sink.descriptor, timeout=30) as sender:
        sums = await send_all(sender, order)
    lines = await sink.lines(500)
    assert [line["seq"] for line in lines] == list(range(500))
    assert [line["sum"] for line in lines] == sums
    assert len({line["peer"] for line in lines}) == 1


async def test_all_dtypes_round_trip(endpoint, peers):
    echo = await peers("echo", "2", json.dumps(endpoint.descriptor))
    tensors = all_dtype_tensors()
    header = {"seq": 0, "nested": {"a": [1, 2.5, None, True, "s"]}, "raw": b"\x00\xff"}
    async with await endpoint.connect(echo.descriptor, timeout=30) as sender:
        await sender.send(header, tensors, timeout=30)
        await sender.send({"seq": 1}, timeout=30)
        with await endpoint.recv(timeout=30) as msg:
            assert msg.header == header
            assert msg.tensors.keys() == tensors.keys()
            for name, t in tensors.items():
                assert same(msg.tensors[name], t), name
        with await endpoint.recv(timeout=30) as msg:
            assert msg.header == {"seq": 1} and msg.tensors == {}
    assert await echo.until("echoed") == {"echoed": 2}


@pytest.mark.timeout(300)
async def test_sizes(endpoint, peers):
    sizes = [0, 1, 4 << 10, 1 << 20, 16 << 20, 64 << 20, [185 << 20, "bfloat16"]]
    src = await peers("source", json.dumps(endpoint.descriptor), spec(sizes=sizes))
    got = await receive(endpoint, len(sizes))
    report = await src.until("sent")
    assert [header["seq"] for header, _, _ in got] == list(range(len(sizes)))
    assert [digest for _, _, digest in got] == report["sums"]


async def test_many_senders_to_one_receiver(endpoint, peers):
    target = json.dumps(endpoint.descriptor)
    sources = await asyncio.gather(*(
        peers("source", target, spec(count=100, sizes=[100, 3000, 70000], seed=k, name=f"p{k}"))
        for k in range(4)
    ))
    got = await receive(endpoint, 400)
    for k, src in enumerate(sources):
        mine = [(header["seq"], peer, digest) for header, peer, digest in got if header["src"] == f"p{k}"]
        assert [seq for seq, _, _ in mine] == list(range(100))
        assert [digest for _, _, digest in mine] == (await src.until("sent"))["sums"]
        assert len({peer for _, peer, _ in mine}) == 1
    assert len({peer for _, peer, _ in got}) == 4


async def test_bidirectional_with_full_rings(endpoint, peers):
    # 80 MiB each way: more than a 16 MiB ring, and more than tcp buffers unread.
    mine = {"count": 80, "sizes": [1 << 20], "seed": 1, "name": "test"}
    theirs = {"count": 80, "sizes": [1 << 20], "seed": 2, "name": "peer"}
    peer = await peers("exchange", json.dumps(endpoint.descriptor), json.dumps(theirs))
    async with await endpoint.connect(peer.descriptor, timeout=30) as sender:
        started = asyncio.Event()
        sending = asyncio.create_task(send_all(sender, mine, started))
        await started.wait()
        got = await receive(endpoint, 80)
        sums = await sending
    lines = await peer.lines(80)
    assert [line["sum"] for line in lines] == sums
    assert [digest for _, _, digest in got] == (await peer.until("sent"))["sums"]


async def test_slow_consumer(endpoint, peers):
    # 96 MiB: sends must wait for the sink, whatever the transport buffers.
    sink = await peers("sink", "24", "--delay", "0.05")
    slow = {"count": 24, "sizes": [4 << 20], "seed": 3}
    async with await endpoint.connect(sink.descriptor, timeout=30) as sender:
        sums = await send_all(sender, slow)
    lines = await sink.lines(24)
    assert [line["seq"] for line in lines] == list(range(24))
    assert [line["sum"] for line in lines] == sums


async def test_consumer_holding_messages(endpoint, peers):
    src = await peers("source", json.dumps(endpoint.descriptor), spec(count=100, sizes=[1 << 20], seed=4))
    held, released = [], []
    for i in range(100):
        msg = await endpoint.recv(timeout=60)
        assert msg.header["seq"] == i
        if i < 50:
            held.append(msg)  # 50 MiB kept unreleased: more than a 16 MiB ring
        else:
            with msg:
                released.append(checksum(msg.tensors))
    sums = (await src.until("sent"))["sums"]
    assert [checksum(msg.tensors) for msg in held] == sums[:50]
    assert released == sums[50:]
    for msg in held:
        msg.release()


@pytest.mark.timeout(180)
async def test_producer_killed_mid_message(endpoint, peers):
    before = shm_entries()
    src = await peers("source", json.dumps(endpoint.descriptor), spec(sizes=[[185 << 20, "bfloat16"]], go=True))
    assert await src.line() == {"connected": True}
    # The event loop stays blocked from here to the kill, on purpose: the endpoint
    # cannot drain the connection, so the producer is stuck inside its 185 MiB send.
    src.tell("go")
    assert src.line_blocking() == {"sending": 0}
    time.sleep(0.5)
    src.kill()
    with pytest.raises(PeerGone):
        await endpoint.recv(timeout=60)
    with pytest.raises(TransportTimeout):  # reported once
        await endpoint.recv(timeout=0.5)
    await assert_still_serves(endpoint, peers)
    await endpoint.aclose()
    assert shm_leaks(before) == set()


@pytest.mark.timeout(180)
async def test_consumer_killed_while_send_waits(endpoint, peers):
    before = shm_entries()
    stall = await peers("stall")
    sender = await endpoint.connect(stall.descriptor, timeout=30)
    payload = {"x": torch.zeros(4 << 20, dtype=torch.uint8)}
    pending = None
    for i in range(200):  # up to 800 MiB, far more than any transport buffers
        send = asyncio.create_task(sender.send({"seq": i}, payload, timeout=60))
        done, _ = await asyncio.wait({send}, timeout=2)
        if not done:
            pending = send
            break
        send.result()
    assert pending is not None, "send never waited for a consumer that does not receive"
    stall.kill()
    with pytest.raises(PeerGone):
        await pending
    await sender.aclose()
    await assert_still_serves(endpoint, peers)
    await endpoint.aclose()
    assert shm_leaks(before) == set()


async def test_try_send_sends_all_or_nothing_and_keeps_the_order(endpoints, transport_name):
    """try_send is the no-wait path: True means the message is on its way, False that nothing was
    sent (a full ring, a streamed message, or a medium without such a path); order holds with send()."""
    a, b = await endpoints(), await endpoints()
    sender = await a.connect(b.descriptor, timeout=30)
    big = {"x": torch.full((1 << 20,), 3, dtype=torch.uint8)}  # 1 MiB: a 16 MiB ring fills up
    sent = []
    for i in range(64):
        if sender.try_send({"seq": i}, big):
            sent.append(i)
        else:
            break
    if transport_name in ("shm", "auto"):
        assert 0 < len(sent) < 64  # it stopped at the full ring instead of waiting

    async def drain() -> list[int]:
        got = []
        for _ in range(len(sent) + 1):
            with await b.recv(timeout=30) as msg:
                got.append(msg.header["seq"])
                assert torch.equal(msg.tensors["x"], big["x"])
        return got

    receiving = asyncio.create_task(drain())
    await sender.send({"seq": 1000}, big, timeout=30)  # waits for the room the receiver makes
    assert await receiving == sent + [1000]
    if sender.try_send({"seq": 2000}, {"x": torch.arange(4)}):
        with await b.recv(timeout=30) as msg:
            assert msg.header == {"seq": 2000} and msg.tensors["x"].tolist() == [0, 1, 2, 3]
    await sender.aclose()
