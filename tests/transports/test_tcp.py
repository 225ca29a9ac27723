"""TCP-specific behaviour: hostile bytes on the port, refused connections,
timeouts, size limits and use after close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading

import msgpack
import pytest
import torch

from transports import (
    MessageTooLarge, PeerGone, TransportClosed, TransportTimeout, TransportUnavailable, open_transport,
)
from transports.host import host_id
from transports.tcp import FRAME, MAGIC, TcpTransport

pytestmark = pytest.mark.timeout(60)


def frame(meta: bytes, payload_len: int = 0, magic: bytes = MAGIC) -> bytes:
    return FRAME.pack(magic, len(meta), payload_len) + meta


HELLO = frame(msgpack.packb({"hello": "raw-client"}))
GOOD_META = msgpack.packb({"v": 1, "h": {}, "n": 4, "t": [["x", "float32", [1], 0, 4]]})

GARBAGE = {
    "random bytes": os.urandom(4096),
    "absurd meta length": FRAME.pack(MAGIC, 0xFFFF_FFFF, 0),
    "absurd payload length": HELLO + FRAME.pack(MAGIC, len(GOOD_META), 1 << 62) + GOOD_META,
    "truncated header": b"OPT1\x05\x00",
    "http request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "no hello first": frame(GOOD_META, 4) + b"\0" * 4,
    "hello with a payload": FRAME.pack(MAGIC, len(HELLO) - FRAME.size, 10) + HELLO[FRAME.size:] + b"\0" * 10,
    "meta not msgpack": HELLO + frame(b"\xc1" * 10, 4) + b"\0" * 4,
    "meta wrong version": HELLO + frame(msgpack.packb({"v": 9, "h": {}, "n": 0, "t": []})),
    "meta disagrees with frame": HELLO + frame(GOOD_META, 8) + b"\0" * 8,
    "tensor outside payload": HELLO + frame(msgpack.packb(
        {"v": 1, "h": {}, "n": 4, "t": [["x", "float32", [2], 0, 8]]}), 4) + b"\0" * 4,
}


@pytest.fixture
async def tcp():
    """Factory for TCP endpoints closed at teardown."""
    opened = []

    async def open_(**options) -> TcpTransport:
        opened.append(await open_transport("tcp", **options))
        return opened[-1]

    yield open_
    for transport in opened:
        await transport.aclose()


async def raw_exchange(port: int, data: bytes) -> tuple[str, bytes | None]:
    """Write ``data`` to the port, half-close, and read until the endpoint closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local = "%s:%s" % writer.get_extra_info("sockname")[:2]
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        reply = None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return local, reply


def handshake_keys(reply: bytes | None) -> list[set[str]]:
    """The keys of each handshake frame the endpoint sent (its challenge, its verdict);
    AssertionError if the reply holds anything else."""
    keys, rest = [], reply or b""
    while rest:
        magic, n, payload = FRAME.unpack_from(rest)
        assert magic == MAGIC and payload == 0, rest
        keys.append(set(msgpack.unpackb(rest[FRAME.size:FRAME.size + n])))
        rest = rest[FRAME.size + n:]
    return keys


async def exchange_one(receiver: TcpTransport, sender_endpoint: TcpTransport) -> None:
    async with await sender_endpoint.connect(receiver.descriptor, timeout=10) as sender:
        await sender.send({"ok": 1}, {"x": torch.ones(3)}, timeout=10)
    with await receiver.recv(timeout=10) as msg:
        assert msg.header == {"ok": 1} and torch.equal(msg.tensors["x"], torch.ones(3))


async def test_descriptor(tcp):
    transport = await tcp(advertise_host="example.invalid")
    d = transport.descriptor
    assert d["transport"] == "tcp" and d["host"] == "example.invalid" and d["port"] > 0
    assert d["id"] == transport.id and d["host_id"] == host_id()


async def test_port_in_use(tcp):
    taken = await tcp()
    with pytest.raises(TransportUnavailable, match=str(taken.descriptor["port"])):
        await tcp(port=taken.descriptor["port"])


async def test_connect_needs_a_tcp_descriptor(tcp):
    with pytest.raises(ValueError):
        await (await tcp()).connect({"transport": "shm", "id": "x"})


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_drops_only_that_connection(tcp, caplog, data):
    receiver, other = await tcp(), await tcp()
    with caplog.at_level(logging.WARNING, logger="transports.tcp"):
        local, reply = await raw_exchange(receiver.descriptor["port"], data)
    assert handshake_keys(reply) in ([], [{"challenge"}], [{"challenge"}, {"ok"}])  # no word beyond the handshake
    assert any(local in r.getMessage() for r in caplog.records), caplog.text
    # Nothing was delivered for the bad connection: the next message is the good one.
    await exchange_one(receiver, other)


async def test_truncated_message_raises_peer_gone_once(tcp):
    receiver, other = await tcp(), await tcp()
    _, reply = await raw_exchange(receiver.descriptor["port"], HELLO + frame(GOOD_META, 4) + b"\0\0")
    assert handshake_keys(reply) == [{"challenge"}, {"ok"}]
    with pytest.raises(PeerGone, match=r"raw-client .* mid-message after \d+ of \d+ bytes"):
        await receiver.recv(timeout=10)
    await exchange_one(receiver, other)


async def test_clean_close_between_messages_is_not_an_error(tcp):
    receiver = await tcp()
    await raw_exchange(receiver.descriptor["port"], HELLO + frame(GOOD_META, 4) + b"\0" * 4)
    with await receiver.recv(timeout=10) as msg:
        assert msg.peer == "raw-client" and msg.tensors["x"].tolist() == [0.0]
    with pytest.raises(TransportTimeout):
        await receiver.recv(timeout=0.2)


async def test_connect_to_closed_port(tcp):
    transport = await tcp()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerGone, match=str(port)):
        await transport.connect({"transport": "tcp", "id": "x", "host": "127.0.0.1", "port": port}, timeout=10)


@pytest.fixture
def deaf_port():
    """A listening socket that is never accepted from: the kernel's buffers fill and stay full."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.fixture
def deaf_peer():
    """A peer that completes the handshake (challenge, hello, ok), then never reads again."""
    done = threading.Event()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        s.settimeout(30)

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = s.accept()
                with conn:
                    conn.sendall(frame(msgpack.packb({"challenge": os.urandom(16)})))
                    conn.recv(256)  # the hello
                    conn.sendall(frame(msgpack.packb({"ok": True})))
                    done.wait(30)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield s.getsockname()[1]
        done.set()
        thread.join(10)


async def test_connect_to_a_peer_that_never_speaks_times_out(tcp, deaf_port):
    transport = await tcp()
    with pytest.raises(TransportTimeout, match="timed out"):
        await transport.connect({"transport": "tcp", "id": "deaf", "host": "127.0.0.1", "port": deaf_port},
                                timeout=0.5)


async def test_send_timeout_when_peer_never_reads(tcp, deaf_peer):
    transport = await tcp()
    sender = await transport.connect({"transport": "tcp", "id": "deaf", "host": "127.0.0.1", "port": deaf_peer},
                                     timeout=10)
    with pytest.raises(TransportTimeout):
        await sender.send({}, {"x": torch.zeros(64 << 20, dtype=torch.uint8)}, timeout=0.05)
    # Half a frame went out and cannot be taken back, so the sender is finished.
    with pytest.raises(TransportClosed):
        await sender.send({}, timeout=1)


async def test_receiver_stops_reading_when_inbox_is_full(tcp):
    receiver, other = await tcp(max_buffered_bytes=1 << 20), await tcp()
    sender = await other.connect(receiver.descriptor)
    with pytest.raises(TransportTimeout):
        for sent in range(64):  # 64 MiB, far more than 1 MiB plus the kernel's buffers
            await sender.send({"seq": sent}, {"x": torch.zeros(1 << 20, dtype=torch.uint8)}, timeout=1)
    seqs = []
    # The timed-out send was cut off, mid-message (PeerGone) or before its first byte.
    with pytest.raises((PeerGone, TransportTimeout)):
        while True:
            with await receiver.recv(timeout=2) as msg:
                seqs.append(msg.header["seq"])
    assert seqs == list(range(sent))


async def test_message_too_large(tcp):
    small, big = await tcp(max_message_bytes=1 << 20), await tcp()
    too_big = {"x": torch.zeros((1 << 20) + 1, dtype=torch.uint8)}
    # The sender's own limit, and the limit the receiver publishes.
    for src, dst in ((small, big), (big, small)):
        async with await src.connect(dst.descriptor) as sender:
            with pytest.raises(MessageTooLarge):
                await sender.send({}, too_big)
            await sender.send({"after": True}, {"x": torch.zeros(1 << 20, dtype=torch.uint8)})
        with await dst.recv(timeout=10) as msg:
            assert msg.header == {"after": True}


async def test_operations_after_close(tcp):
    a, b = await tcp(), await tcp()
    to_b = await a.connect(b.descriptor)
    to_a = await b.connect(a.descriptor)
    waiting = asyncio.create_task(a.recv())
    await asyncio.sleep(0)
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(TransportClosed):
        await waiting
    with pytest.raises(TransportClosed):
        await a.recv(timeout=1)
    with pytest.raises(TransportClosed):
        await a.connect(b.descriptor)
    with pytest.raises(TransportClosed):
        await to_b.send({})
    with pytest.raises(PeerGone):  # a's port is closed now
        await b.connect(a.descriptor, timeout=10)
    with pytest.raises(PeerGone):
        for _ in range(100):  # the reset reaches b after a round trip or two
            await to_a.send({}, timeout=10)
            await asyncio.sleep(0.01)
    await to_a.aclose()
    with pytest.raises(TransportClosed):
        await to_a.send({})


async def test_stats(tcp):
    a, b = await tcp(), await tcp()
    async with await a.connect(b.descriptor) as sender:
        await sender.send({"n": 1}, {"x": torch.zeros(100, dtype=torch.uint8)})
    (await b.recv(timeout=10)).release()
    assert a.stats()["messages_sent"] == 1 and b.stats()["messages_received"] == 1
    assert a.stats()["bytes_sent"] >= 100 and b.stats()["bytes_received"] >= a.stats()["bytes_sent"]
