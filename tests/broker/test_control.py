"""The control socket and its wire format: batching, edge-safe receives, bad input.

Real ZeroMQ ROUTER and DEALER sockets over loopback TCP, on the test's event loop.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq

from broker import protocol
from broker.control import ControlSocket


def test_frames_keep_order_and_split_at_the_limit():
    bodies = [protocol.pack("PROGRESS", job=f"j{i}", stage="s", step=i, total=1000) for i in range(1000)]
    frames = protocol.frames(bodies, limit=4096)
    assert 1 < len(frames) < len(bodies)
    assert all(len(f) <= 4096 for f in frames)
    got = []
    for f in frames:
        good, bad = protocol.unpack_frame(f)
        assert bad == []
        got += good
    assert [m["step"] for m in got] == list(range(1000))


def test_a_lone_message_is_a_plain_map_and_a_big_one_travels_alone():
    one = protocol.pack("HEARTBEAT")
    assert protocol.frames([one]) == [one]
    big = protocol.pack("ERROR", reason="x" * 10_000)
    small = protocol.pack("HEARTBEAT")
    frames = protocol.frames([small, big, small], limit=1000)
    assert frames == [small, big, small]


@pytest.mark.parametrize("n", [2, 15, 16, 65_535, 65_536])
def test_array_headers_of_every_size(n):
    body = protocol.pack("DRAIN")
    (frame,) = protocol.frames([body] * n, limit=1 << 30)
    assert msgpack.unpackb(frame) == [{"v": protocol.VERSION, "k": "DRAIN"}] * n
    assert protocol.packed_array([body] * n) == frame


@pytest.mark.parametrize("n", [0, 1])
def test_packed_array_is_an_array_even_of_one(n):
    assert msgpack.unpackb(protocol.packed_array([msgpack.packb([1, "x"])] * n)) == [[1, "x"]] * n


def test_a_bad_message_in_a_batch_costs_only_itself():
    ok = {"v": protocol.VERSION, "k": "STARTED", "job": "j", "stage": "a"}
    frame = msgpack.packb([ok, {"v": protocol.VERSION, "k": "STARTED", "job": 5, "stage": "a"}, "x",
                           {"v": 1, "k": "STARTED", "job": "j", "stage": "a"}, ok])
    good, bad = protocol.unpack_frame(frame)
    assert good == [ok, ok]
    assert bad == ["STARTED: field 'job' missing or not str", "body is not a map",
                   "unsupported protocol version 1"]
    assert protocol.unpack_frame(b"\xc1garbage")[0] == []
    assert "not msgpack" in protocol.unpack_frame(b"\xc1garbage")[1][0]


class Peer:
    """One side of a ROUTER/DEALER pair, recording what it got."""

    def __init__(self, ctx, kind: int, routed: bool, batch: int = 256):
        self.messages: list[tuple[bytes | None, dict]] = []
        self.bad: list[str] = []
        self.batches: list[int] = []
        self.got = asyncio.Event()
        self.want = 0
        self.on_message = None  # extra behaviour, set by a test
        self._in_batch = 0
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self.sock = sock
        self.routed, self.batch = routed, batch
        self.ctl: ControlSocket | None = None

    def start(self) -> None:
        self.ctl = ControlSocket(self.sock, routed=self.routed, on_message=self._message, on_bad=self._bad,
                                 on_batch=self._batch, batch=self.batch)

    def _message(self, peer, m) -> None:
        self.messages.append((peer, m))
        self._in_batch += 1
        if self.on_message is not None:
            self.on_message(peer, m)
        if len(self.messages) >= self.want:
            self.got.set()

    def _bad(self, peer, reason) -> None:
        self.bad.append(reason)

    def _batch(self) -> None:
        self.batches.append(self._in_batch)
        self._in_batch = 0

    async def wait(self, n: int, timeout: float = 10.0) -> None:
        self.want = n
        if len(self.messages) < n:
            self.got.clear()
            await asyncio.wait_for(self.got.wait(), timeout)


@pytest.fixture
async def pair():
    ctx = zmq.Context()
    router = Peer(ctx, zmq.ROUTER, routed=True, batch=64)
    router.sock.bind("tcp://127.0.0.1:*")
    dealer = Peer(ctx, zmq.DEALER, routed=False)
    dealer.sock.setsockopt(zmq.ROUTING_ID, b"w1")
    dealer.sock.connect(router.sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    router.start()
    dealer.start()
    yield router, dealer
    router.ctl.close()
    dealer.ctl.close()
    ctx.term()


async def test_requests_and_replies_are_batched_per_loop_turn(pair):
    router, dealer = pair
    router.on_message = lambda peer, m: router.ctl.send(protocol.pack("RELEASE", job=m["job"], stage="a"), peer)
    n = 1000
    for i in range(n):  # all queued in one turn: they leave as a handful of frames
        dealer.ctl.send(protocol.pack("STARTED", job=str(i), stage="a"))
    await router.wait(n)
    await dealer.wait(n)
    assert [m["job"] for _, m in router.messages] == [str(i) for i in range(n)]
    assert {peer for peer, _ in router.messages} == {b"w1"}
    assert [m["job"] for _, m in dealer.messages] == [str(i) for i in range(n)]
    assert max(router.batches) <= 64  # the batch limit holds even with frames of many messages
    assert len(router.batches) < n / 10  # many messages per batch, not one each
    assert router.bad == dealer.bad == []


async def test_ping_pong_with_sends_from_outside_a_batch_never_goes_deaf(pair):
    """Sends from timers (outside a receive batch) share ZMQ_FD with receives: the edge they
    consume must not leave messages unread."""
    router, dealer = pair
    loop = asyncio.get_running_loop()
    rounds = 2000

    def pong(peer, m):  # answer from a later loop turn, as the REST API or a timer would
        loop.call_soon(router.ctl.send, protocol.pack("RELEASE", job=m["job"], stage="a"), peer)
        loop.call_soon(router.ctl.send, protocol.pack("HEARTBEAT"), peer)

    def ping(_peer, m):
        if m["k"] == "RELEASE" and int(m["job"]) + 1 < rounds:
            dealer.ctl.send(protocol.pack("STARTED", job=str(int(m["job"]) + 1), stage="a"))

    router.on_message = pong
    dealer.on_message = ping
    dealer.ctl.send(protocol.pack("STARTED", job="0", stage="a"))
    await router.wait(rounds, timeout=30)
    await dealer.wait(2 * rounds, timeout=30)
    assert [m["job"] for _, m in router.messages] == [str(i) for i in range(rounds)]


async def test_garbage_is_reported_and_what_follows_is_delivered(pair):
    router, dealer = pair
    dealer.sock.send(b"\xc1 not msgpack")
    dealer.sock.send_multipart([protocol.pack("HEARTBEAT"), msgpack.packb({"v": protocol.VERSION, "k": "NOPE"})])
    dealer.sock.send(protocol.pack("DRAIN"))
    await router.wait(2)
    assert [m["k"] for _, m in router.messages] == ["HEARTBEAT", "DRAIN"]
    assert len(router.bad) == 2 and "not msgpack" in router.bad[0] and "NOPE" in router.bad[1]


async def test_a_handler_that_closes_the_socket_stops_delivery(pair):
    router, dealer = pair

    def close_on_drain(_peer, m):
        if m["k"] == "DRAIN":
            dealer.ctl.close()

    dealer.on_message = close_on_drain
    peer = b"w1"
    await asyncio.sleep(0.1)  # the DEALER has connected
    for kind in ("HEARTBEAT", "DRAIN", "HEARTBEAT", "HEARTBEAT"):
        router.ctl.send(protocol.pack(kind), peer)
    await dealer.wait(2)
    await asyncio.sleep(0.1)
    assert [m["k"] for _, m in dealer.messages] == ["HEARTBEAT", "DRAIN"]
    assert dealer.ctl.closed
    dealer.ctl.send(protocol.pack("HEARTBEAT"))  # a send after close is dropped, not an error
