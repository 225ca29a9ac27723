"""Data-plane credentials at the handshake (onepiece.credentials): an endpoint guarded with a
worker's data key accepts a connection only from a producer that proves the link the broker
made for it, refuses the rest before it reads a byte of data or makes a region for them, and
counts them; an unguarded endpoint (no broker key, C3) accepts anyone as before.

Runs per transport (shm, tcp, auto; rdma through the fake NIC, a test double: there is no RDMA
hardware here), plus raw-socket attackers on tcp and the ring side channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

import msgpack
import pytest
import torch

from onepiece import credentials
from onepiece.credentials import Credential
from transports import Refused, TransportTimeout, open_transport
from transports.tcp import FRAME, MAGIC
from transports.ringtransport import PROTOCOL

from .conftest import OPTIONS, shm_entries

pytestmark = pytest.mark.timeout(60)

KEY = bytes(range(32))  # the consumer's data key, as the broker gives it
GOOD = Credential("producer-1", credentials.link_key(KEY, "producer-1"))
LIARS = {
    "no credential": None,
    "a link made with another key": Credential("producer-1", credentials.link_key(bytes(32), "producer-1")),
    "another producer's link": Credential("producer-2", credentials.link_key(KEY, "producer-1")),
    "a made-up link": Credential("producer-1", "0" * 32),
}


async def round_trip(a, b, credential: Credential | None, seq: int) -> None:
    async with await a.connect(b.descriptor, timeout=10, credential=credential) as sender:
        await sender.send({"seq": seq}, {"x": torch.arange(1000)}, timeout=10)
    with await b.recv(timeout=10) as msg:
        assert msg.header == {"seq": seq} and torch.equal(msg.tensors["x"], torch.arange(1000))


# -- the contract ------------------------------------------------------------------------------


def test_a_proof_answers_one_nonce_of_one_key_for_one_principal():
    nonce, other = credentials.challenge(), credentials.challenge()
    assert nonce != other and len(nonce) == credentials.NONCE_BYTES
    hello = GOOD.answer(nonce)
    assert credentials.refusal(KEY, nonce, hello) is None
    assert "not one the broker gave" in credentials.refusal(KEY, other, hello)  # a replay, another nonce
    assert "not one the broker gave" in credentials.refusal(bytes(32), nonce, hello)  # another consumer
    assert "not one the broker gave" in credentials.refusal(KEY, nonce, {**hello, "principal": "producer-2"})
    for bad in ({}, {"principal": "p"}, {"principal": 1, "proof": hello["proof"]}, {"principal": "p", "proof": b"x"}):
        assert "no data-plane credential" in credentials.refusal(KEY, nonce, bad)
    assert credentials.refusal(None, nonce, {}) is None  # no key: no check (C3)
    assert credentials.answer(None, nonce) == {} and credentials.answer(GOOD, "not bytes") == {}
    assert credentials.authentic(credentials.data_auth(KEY, "j", "a", "b", 1),
                                 credentials.data_auth(KEY, "j", "a", "b", 1))
    assert not credentials.authentic(credentials.data_auth(KEY, "j", "a", "b", 2),
                                     credentials.data_auth(KEY, "j", "a", "b", 1))
    assert not credentials.authentic(None, "x") and not credentials.authentic("\u00e9", "x")


# -- every transport ---------------------------------------------------------------------------


async def test_a_guarded_endpoint_refuses_every_connection_without_the_brokers_link(endpoints, transport_name):
    a, b = await endpoints(), await endpoints()
    b.guard(KEY)
    segments = shm_entries()
    for name, credential in LIARS.items():
        with pytest.raises(Refused, match="refused the connection"):
            await a.connect(b.descriptor, timeout=10, credential=credential)
    assert b.stats()["connections_refused"] == len(LIARS)
    assert shm_entries() <= segments  # nothing was made for them (shm: no segments left behind)
    with pytest.raises(TransportTimeout):  # and nothing of theirs arrives
        await b.recv(timeout=0.2)
    await round_trip(a, b, GOOD, 1)  # the broker's link gets in
    assert b.stats()["connections_refused"] == len(LIARS)


async def test_an_unguarded_endpoint_accepts_anyone_and_guard_none_opens_it_again(endpoints):
    a, b = await endpoints(), await endpoints()
    await round_trip(a, b, None, 1)  # no key given: as before keys (C3)
    await round_trip(a, b, GOOD, 2)  # a credential where none is asked is fine
    b.guard(KEY)
    with pytest.raises(Refused):
        await a.connect(b.descriptor, timeout=10)
    b.guard(None)
    await round_trip(a, b, None, 3)


async def test_a_connection_made_under_a_key_stays_when_the_key_changes(endpoints):
    """The worker's key changes when it registers again (a new broker): connections it accepted
    stay (their messages still need the new key's MACs, checked by the worker); new ones need
    a link made with the new key."""
    a, b = await endpoints(), await endpoints()
    b.guard(KEY)
    async with await a.connect(b.descriptor, timeout=10, credential=GOOD) as sender:
        new_key = bytes(range(1, 33))
        b.guard(new_key)
        await sender.send({"seq": 1}, {"x": torch.ones(3)}, timeout=10)
        with await b.recv(timeout=10) as msg:
            assert msg.header == {"seq": 1}
    with pytest.raises(Refused):
        await a.connect(b.descriptor, timeout=10, credential=GOOD)
    await round_trip(a, b, Credential("producer-1", credentials.link_key(new_key, "producer-1")), 2)


# -- attackers on raw sockets ------------------------------------------------------------------


def tcp_frame(obj: dict, payload: bytes = b"") -> bytes:
    meta = msgpack.packb(obj)
    return FRAME.pack(MAGIC, len(meta), len(payload)) + meta + payload


async def read_tcp_frame(reader) -> dict:
    _, n, _ = FRAME.unpack(await reader.readexactly(FRAME.size))
    return msgpack.unpackb(await reader.readexactly(n))


async def closed(reader) -> bool:
    """Whether the endpoint ended the connection (a FIN, or a reset: it closed with our unread
    data in its buffer, which it never read)."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


@contextlib.asynccontextmanager
async def raw(host: str, port: int):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.fixture
async def opened():
    """Factory: ``await opened(name)`` opens an endpoint of that transport, closed at teardown."""
    ends = []

    async def open_(name: str):
        ends.append(await open_transport(name, **OPTIONS[name]))
        return ends[-1]

    yield open_
    for end in ends:
        await end.aclose()


async def test_tcp_reads_no_data_from_a_stranger_and_a_recorded_handshake_does_not_replay(opened):
    b = await opened("tcp")
    b.guard(KEY)
    host, port = b.descriptor["host"], b.descriptor["port"]
    data = tcp_frame({"v": 1, "h": {"job": "x"}, "n": 4, "t": [["x", "float32", [1], 0, 4]]}, b"\0" * 4)
    # a stranger that does not wait for the challenge: hello and data at once
    async with raw(host, port) as (reader, writer):
        writer.write(tcp_frame({"hello": "stranger"}) + data)
        assert "challenge" in await read_tcp_frame(reader)
        assert "no data-plane credential" in (await read_tcp_frame(reader))["error"]
        assert await closed(reader)
    # a legitimate handshake, recorded ...
    async with raw(host, port) as (reader, writer):
        nonce = (await read_tcp_frame(reader))["challenge"]
        hello = {"hello": "p", **GOOD.answer(nonce)}
        writer.write(tcp_frame(hello))
        assert await read_tcp_frame(reader) == {"ok": True}
    # ... and replayed on a new connection: that one was asked another nonce
    async with raw(host, port) as (reader, writer):
        await read_tcp_frame(reader)
        writer.write(tcp_frame(hello) + data)
        assert "not one the broker gave" in (await read_tcp_frame(reader))["error"]
    with pytest.raises(TransportTimeout):
        await b.recv(timeout=0.2)
    assert b.stats()["connections_refused"] == 2


async def test_the_ring_side_channel_refuses_a_stranger_before_its_offer_is_used(opened):
    b = await opened("shm")
    b.guard(KEY)
    segments = shm_entries()
    side = struct.Struct("<I")
    async with raw(b.descriptor["host"], b.descriptor["port"]) as (reader, writer):
        (n,) = side.unpack(await reader.readexactly(side.size))
        challenge = msgpack.unpackb(await reader.readexactly(n))
        assert challenge["v"] == PROTOCOL and len(challenge["challenge"]) == credentials.NONCE_BYTES
        hello = msgpack.packb({"v": PROTOCOL, "hello": "stranger", "offer": {"segment": "/nothing-here"}})
        writer.write(side.pack(len(hello)) + hello)
        (n,) = side.unpack(await reader.readexactly(side.size))
        answer = msgpack.unpackb(await reader.readexactly(n))
        assert answer["refused"] is True and "no data-plane credential" in answer["error"]
        assert await closed(reader)
    assert shm_entries() <= segments and b.stats()["connections_refused"] == 1
