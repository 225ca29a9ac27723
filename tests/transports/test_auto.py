"""The auto transport: which medium it picks per peer, how it says so, and one
recv() over all of them. Peers are real processes where the choice depends on
being a separate process (shm); crafted descriptor copies stand in for peers
on other hosts, which these tests cannot start."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import msgpack
import pytest
import torch

from transports import PeerGone, TransportTimeout, open_transport
from transports.auto import AutoTransport, choose
from transports.tcp import FRAME, MAGIC

from .conftest import Peer, shm_entries, shm_leaks
from .peer import checksum, messages

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def opened():
    """Factory: ``await opened(name, **options)`` opens an endpoint (auto by default), closed at teardown."""
    ends = []

    async def open_(name: str = "auto", **options):
        transport = await open_transport(name, **({"ring_bytes": 4 << 20} if name != "tcp" else {}), **options)
        ends.append(transport)
        return transport

    yield open_
    for transport in reversed(ends):
        await transport.aclose()


@pytest.fixture
def peer_process():
    """Factory: ``await peer_process(role, *args)`` starts an auto peer process; killed at teardown."""
    started: list[Peer] = []

    async def start(role: str, *args: str) -> Peer:
        peer = Peer(["auto", json.dumps({"ring_bytes": 4 << 20}), role, *args])
        started.append(peer)
        peer.descriptor = await peer.line()
        return peer

    yield start
    for peer in started:
        peer.close()


def choice_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transports.auto" and " -> " in r.getMessage()]


async def test_two_processes_on_this_host_pick_shm_both_ways(opened, peer_process, caplog):
    before = shm_entries()
    caplog.set_level(logging.INFO, logger="transports.auto")
    endpoint = await opened()
    echo = await peer_process("echo", "3", json.dumps(endpoint.descriptor))
    assert echo.descriptor["transport"] == "auto" and "shm" in echo.descriptor["media"]
    spec = {"count": 3, "sizes": [10, 1 << 20, 5 << 20], "seed": 7}
    async with await endpoint.connect(echo.descriptor, timeout=30) as sender:
        for header, tensors in messages(spec):
            await sender.send(header, tensors, timeout=30)
        for header, tensors in messages(spec):
            with await endpoint.recv(timeout=30) as msg:
                assert msg.header == header and checksum(msg.tensors) == checksum(tensors)
    assert await echo.until("echoed") == {"echoed": 3}
    assert await echo.wait() == 0
    stats = endpoint.stats()
    assert stats["auto_choices"] == {"shm": 1} and stats["auto_fallbacks"] == {}
    assert stats["messages_sent"] == stats["messages_received"] == 3
    assert endpoint._media["shm"].stats()["messages_received"] == 3  # the echo came back over shm too
    [line] = choice_lines(caplog)
    assert f"peer {echo.descriptor['id'][:8]} -> shm (same host, shared /dev/shm" in line
    await endpoint.aclose()
    assert shm_leaks(before) == set()


async def test_peer_on_another_host_gets_tcp(opened, caplog):
    caplog.set_level(logging.INFO, logger="transports.auto")
    a, b = await opened(), await opened()
    elsewhere = json.loads(json.dumps(b.descriptor))  # a crafted copy: b as if it ran on another host
    elsewhere["host_id"] = "another-host"
    async with await a.connect(elsewhere, timeout=10) as sender:
        await sender.send({"seq": 0}, {"x": torch.arange(100)}, timeout=10)
    with await b.recv(timeout=10) as msg:
        assert msg.header == {"seq": 0} and torch.equal(msg.tensors["x"], torch.arange(100))
    assert a.stats()["auto_choices"] == {"tcp": 1}
    assert b._media["tcp"].stats()["messages_received"] == 1
    [line] = choice_lines(caplog)
    assert "-> tcp" in line and "different host" in line


async def test_choice_logged_once_per_peer_and_counted(opened, caplog):
    caplog.set_level(logging.INFO, logger="transports.auto")
    a, b, c = await opened(), await opened(), await opened()
    for peer in (b, b, b, c):
        sender = await a.connect(peer.descriptor, timeout=10)
        await sender.aclose()
    assert a.stats()["auto_choices"] == {"shm": 4}
    lines = choice_lines(caplog)
    assert len(lines) == 2
    assert sum(b.id[:8] in line for line in lines) == 1 and sum(c.id[:8] in line for line in lines) == 1


async def test_plain_single_medium_descriptors_are_accepted(opened):
    a = await opened()
    for name in ("tcp", "shm"):
        plain = await opened(name)
        async with await a.connect(plain.descriptor, timeout=10) as sender:
            await sender.send({"to": name}, timeout=10)
        with await plain.recv(timeout=10) as msg:
            assert msg.header == {"to": name}
    assert a.stats()["auto_choices"] == {"tcp": 1, "shm": 1}


async def test_failed_preferred_medium_falls_back_loudly(opened, caplog):
    caplog.set_level(logging.INFO, logger="transports.auto")
    a, b = await opened(), await opened()
    broken = json.loads(json.dumps(b.descriptor))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        broken["media"]["shm"]["port"] = s.getsockname()[1]
    async with await a.connect(broken, timeout=10) as sender:
        await sender.send({"seq": 1}, timeout=10)
    with await b.recv(timeout=10) as msg:
        assert msg.header == {"seq": 1}
    assert a.stats()["auto_choices"] == {"tcp": 1} and a.stats()["auto_fallbacks"] == {"shm": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("shm failed at connect" in w and "trying tcp" in w for w in warnings)
    [line] = choice_lines(caplog)
    assert "-> tcp" in line and "shm failed" in line


async def test_one_recv_serves_every_medium_and_survives_cancellation(opened):
    a, b = await opened(), await opened()
    elsewhere = dict(b.descriptor, host_id="another-host")
    over_shm = await a.connect(b.descriptor, timeout=10)
    over_tcp = await a.connect(elsewhere, timeout=10)
    with pytest.raises(TransportTimeout):
        await b.recv(timeout=0.1)
    waiting = asyncio.create_task(b.recv())
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for i in range(4):
        await over_shm.send({"via": "shm", "i": i}, timeout=10)
        await over_tcp.send({"via": "tcp", "i": i}, timeout=10)
    got = []
    for _ in range(8):
        with await b.recv(timeout=10) as msg:
            got.append((msg.header["via"], msg.header["i"]))
    assert sorted(got) == sorted([(via, i) for via in ("shm", "tcp") for i in range(4)])
    assert [i for via, i in got if via == "shm"] == list(range(4))  # in order per sender
    assert [i for via, i in got if via == "tcp"] == list(range(4))
    await over_shm.aclose()
    await over_tcp.aclose()


async def test_peer_gone_from_any_medium_reaches_recv(opened):
    b = await opened()
    tcp = b.descriptor["media"]["tcp"]
    hello = msgpack.packb({"hello": "dying-peer"})
    meta = msgpack.packb({"v": 1, "h": {}, "n": 64, "t": [["x", "uint8", [64], 0, 64]]})
    reader, writer = await asyncio.open_connection(tcp["host"], tcp["port"])
    writer.write(FRAME.pack(MAGIC, len(hello), 0) + hello + FRAME.pack(MAGIC, len(meta), 64) + meta + bytes(10))
    await writer.drain()
    writer.write_eof()  # ends 54 bytes short of its message
    await asyncio.wait_for(reader.read(), 10)  # the handshake's frames, unread, would turn the end into a reset
    writer.close()
    await writer.wait_closed()
    with pytest.raises(PeerGone, match="dying-peer"):
        await b.recv(timeout=10)
    with pytest.raises(TransportTimeout):
        await b.recv(timeout=0.1)


@pytest.fixture
def fake_rdma(monkeypatch):
    """rdma over test_rdma's FakeNIC, a test double: no RDMA hardware exists on the development machines."""
    from transports import rdma

    from .test_rdma import FakeNIC

    nic = FakeNIC()
    monkeypatch.setattr(rdma, "_VERBS", nic.verbs())
    return nic


async def test_hosts_with_rdma_ports_pick_rdma(opened, fake_rdma, caplog):
    caplog.set_level(logging.INFO, logger="transports.auto")
    a, b = await opened(), await opened()
    assert "rdma" in a.descriptor["media"]
    elsewhere = dict(b.descriptor, host_id="another-host")  # a crafted copy: b on another host
    async with await a.connect(elsewhere, timeout=10) as sender:
        await sender.send({"seq": 0}, {"x": torch.arange(1000)}, timeout=10)
    with await b.recv(timeout=10) as msg:
        assert torch.equal(msg.tensors["x"], torch.arange(1000))
    assert a.stats()["auto_choices"] == {"rdma": 1}
    assert b._media["rdma"].stats()["messages_received"] == 1
    [line] = choice_lines(caplog)
    assert "-> rdma (both ends have an active RDMA port (Ethernet); different host)" in line


async def test_rdma_path_that_fails_its_probe_falls_back_to_tcp(opened, fake_rdma, caplog):
    caplog.set_level(logging.INFO, logger="transports.auto")
    a, b = await opened(), await opened()
    fake_rdma.fail_if = lambda write: True  # no RDMA WRITE gets through: as if the fabrics were apart
    async with await a.connect(dict(b.descriptor, host_id="another-host"), timeout=10) as sender:
        await sender.send({"seq": 0}, timeout=10)
    with await b.recv(timeout=10) as msg:
        assert msg.header == {"seq": 0}
    assert a.stats()["auto_choices"] == {"tcp": 1} and a.stats()["auto_fallbacks"] == {"rdma": 1}
    assert any("rdma failed at connect" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def rdma_medium(**port) -> dict:
    info = dict(device="mlx5_0", port=1, link_layer="Ethernet", lid=0, gid_index=3, gid_type="RoCEv2", mtu=5,
                gid="0000:0000:0000:0000:0000:ffff:0a00:0005", commit="auto", fabric=None)
    return {"transport": "rdma", "id": "r", "host": "10.0.0.5", "port": 1, "rdma": {**info, **port}}


def auto_descriptor(host: str, media: dict) -> dict:
    """A crafted descriptor: RDMA ports and other hosts cannot exist on the development machines."""
    return {"transport": "auto", "id": host, "host_id": host, "shm_ns": "ns",
            "media": {name: {"transport": name, **d} for name, d in media.items()}}


@pytest.mark.parametrize(("mine", "theirs", "same_host", "order", "note"), [
    ({"shm": {}, "rdma": rdma_medium(), "tcp": {}}, {"shm": {}, "rdma": rdma_medium(), "tcp": {}}, True,
     ["shm", "rdma", "tcp"], None),
    ({"shm": {}, "rdma": rdma_medium(), "tcp": {}}, {"shm": {}, "rdma": rdma_medium(), "tcp": {}}, False,
     ["rdma", "tcp"], "different host"),
    ({"shm": {}, "rdma": rdma_medium(), "tcp": {}}, {"rdma": rdma_medium(), "tcp": {}}, True,
     ["rdma", "tcp"], "peer offers no shm"),
    ({"shm": {}, "tcp": {}}, {"shm": {}, "rdma": rdma_medium(), "tcp": {}}, True,
     ["shm", "tcp"], "no RDMA port here"),
    ({"rdma": rdma_medium(), "tcp": {}}, {"rdma": rdma_medium(link_layer="InfiniBand"), "tcp": {}}, False,
     ["tcp"], "Ethernet here, InfiniBand at the peer"),
    ({"rdma": rdma_medium(fabric="a"), "tcp": {}}, {"rdma": rdma_medium(fabric="b"), "tcp": {}}, False,
     ["tcp"], "fabrics differ"),
])
def test_ranking(mine, theirs, same_host, order, note):
    picks, notes = choose(auto_descriptor("h1", mine), auto_descriptor("h1" if same_host else "h2", theirs))
    assert [name for name, _ in picks] == order
    if note:
        assert any(note in n for n in notes), notes


def test_auto_class_is_registered():
    from transports import transport_class

    assert transport_class("auto") is AutoTransport


# -- the transport contract over auto (two processes on this host: it runs over shm) --
