"""The asyncio side of the double ring, shared by the ``shm`` and ``rdma`` media.

:mod:`transports.ring` decides; this module waits. A medium supplies only
its memory: a local region it owns and a one-sided writer into the peer's
region (POSIX shared memory mapped by both processes, or RDMA-registered
memory reached with RDMA WRITE). Everything else is here, once:

* a TCP *side channel* per directed connection carries the handshake
  (msgpack frames: the consumer's challenge, the producer's hello with its
  proof (onepiece.credentials) and offer, the consumer's answer naming the
  regions or its refusal, the producer's ready), then single-byte doorbells,
  and tells each side at once when its peer dies (the kernel closes the
  socket of a killed process). A consumer with a key (``guard``) allocates
  no region for a producer that cannot prove the broker's link;
* :class:`RingSender` writes records and waits for credit: a short spin,
  then it raises its "waiting" flag in the consumer's memory and sleeps on
  the doorbell;
* :class:`RingTransport.recv` polls every inbound ring, spins briefly when
  messages have been coming back to back, then raises its "sleeping" flags
  in the producers' memory and sleeps on the doorbell, so an idle worker
  burns no CPU. Before it waits it copies out held messages above the
  high-water mark (ring.py, invariant I7).

The flag/doorbell pair is a Dekker-style handshake (store flag, load ring).
x86 may reorder that store after the load, so every sleep also has a short
backstop timeout (growing to 200 ms): a lost wake-up costs latency, never a
hang.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import msgpack

from onepiece import credentials
from onepiece.credentials import Credential

from . import codec
from .base import Doorkeeper, Message, Sender, Transport
from .errors import (
    MessageTooLarge,
    PeerGone,
    ProtocolError,
    Refused,
    TransportClosed,
    TransportError,
    TransportTimeout,
)
from .host import host_id
from .ring import MSG, Assembler, RingConfig, RingConsumer, RingProducer

log = logging.getLogger(__name__)

PROTOCOL = 2  # 2: the consumer challenges, the hello proves a credential
FRAME = struct.Struct("<I")
MAX_FRAME = 64 << 10
BELL = b"!"
BACKSTOP_MIN, BACKSTOP_MAX = 0.001, 0.2


class Region(abc.ABC):
    """Memory of this process that the peer writes one-sidedly."""

    view: memoryview

    @abc.abstractmethod
    def close(self) -> None: ...


class Writer(abc.ABC):
    """One-sided writes into the peer's region."""

    @abc.abstractmethod
    def write(self, offset: int, parts) -> None: ...

    async def flush(self, timeout: float) -> None:
        """Wait until every write so far has landed (media that post writes asynchronously)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class _Remote:
    """ring.Remote: the medium's writer plus this connection's doorbell."""

    __slots__ = ("write", "notify")

    def __init__(self, writer: Writer, channel: _Channel):
        self.write = writer.write
        self.notify = channel.ring


class _Channel:
    """The TCP side channel: handshake frames, then doorbell bytes and liveness."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.bell = asyncio.Event()
        self.alive = True
        self.on_bell = self.bell.set
        self._transport: asyncio.Transport | None = None
        peer = writer.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if peer else "?"

    async def send_frame(self, obj: dict) -> None:
        data = msgpack.packb(obj)
        self.writer.write(FRAME.pack(len(data)) + data)
        await self.writer.drain()

    async def recv_frame(self) -> dict:
        (n,) = FRAME.unpack(await self.reader.readexactly(FRAME.size))
        if n > MAX_FRAME:
            raise ProtocolError(f"handshake frame of {n} bytes from {self.address}")
        try:
            obj = msgpack.unpackb(await self.reader.readexactly(n))
        except ValueError as exc:
            raise ProtocolError(f"handshake frame from {self.address} is not msgpack") from exc
        if not isinstance(obj, dict):
            raise ProtocolError(f"handshake frame from {self.address} is not a map")
        if obj.get("error"):
            error = Refused if obj.get("refused") else TransportError  # refused: no valid credential
            raise error(f"peer {self.address} refused the connection: {str(obj['error'])[:300]}")
        return obj

    def start_watching(self) -> None:
        """After the handshake: every byte that arrives rings the bell, EOF marks the peer gone.

        The stream's protocol is swapped for :class:`_BellProtocol`, so a
        doorbell wakes the waiter straight from the event loop's read
        callback instead of through a reader task (one task hop less on
        every wake-up, which is most of a small message's latency).
        """
        self._transport = self.writer.transport
        self._transport.set_protocol(_BellProtocol(self))
        self.on_bell()  # a bell that came in with the last handshake frame

    def ring(self) -> None:
        if self.alive and not self._transport.is_closing():
            self._transport.write(BELL)

    def lost(self) -> None:
        self.alive = False
        self.on_bell()

    async def close(self) -> None:
        self.alive = False
        transport = self._transport or self.writer.transport
        transport.close()
        if self._transport is None:  # still a stream (the handshake failed): let it finish closing
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass


class _BellProtocol(asyncio.Protocol):
    def __init__(self, channel: _Channel):
        self.channel = channel

    def data_received(self, data: bytes) -> None:
        self.channel.on_bell()

    def eof_received(self) -> bool:
        self.channel.lost()
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel.lost()


SPINS = ("auto", "always")


def check_spin(spin: str) -> str:
    """``spin`` if it is a receive-spin policy; ValueError naming the choices if not."""
    if spin not in SPINS:
        raise ValueError(f"spin must be one of {', '.join(SPINS)}, not {spin!r}")
    return spin


def _yield_cpu() -> None:
    """Let another runnable process have this core while we spin.

    ``await asyncio.sleep(0)`` yields only to this loop's tasks: when the
    scheduler puts both ends of a connection on one core, the peer that
    should produce the data cannot run until the spin ends.
    """
    os.sched_yield()


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` up to ``seconds``; False on timeout.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that
    races with the event firing, and a cancelled receiver would then wait on.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
        return True
    except TimeoutError:
        return False


def _config_dict(c: RingConfig) -> dict:
    return {"size": c.size, "hwm": c.hwm, "chunk": c.chunk}


class RingSender(Sender):
    """A producer's end of one connection."""

    def __init__(self, endpoint: RingTransport, channel: _Channel, producer: RingProducer,
                 credit: Region, data: Writer, peer: str):
        self._endpoint, self._channel, self._producer = endpoint, channel, producer
        self._credit, self._data = credit, data
        self.peer = peer
        self._lock = asyncio.Lock()
        self._closed = False
        self._broken: TransportError | None = None

    def _check(self) -> None:
        if self._closed:
            raise TransportClosed(f"sender to {self.peer} is closed")
        if self._broken is not None:
            raise self._broken
        if not self._channel.alive:
            self._broken = PeerGone(f"{self._endpoint.name} peer {self.peer} at {self._channel.address} is gone")
            raise self._broken

    def _encode(self, header, tensors) -> codec.Encoded:
        message = codec.encode(header, tensors)
        if message.nbytes > self._endpoint.max_message_bytes:
            raise MessageTooLarge(f"message of {message.nbytes} bytes > {self._endpoint.max_message_bytes}")
        return message

    async def send(self, header, tensors=None, *, timeout=None) -> None:
        self._check()
        message = self._encode(header, tensors)
        timeout = self._endpoint.send_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        async with self._lock:
            self._check()
            producer, written = self._producer, 0
            try:
                for kind, parts, length, aux in producer.records(message):
                    while not producer.try_write(kind, parts, length, aux):
                        if producer.consumer_sleeping():
                            self._channel.ring()  # it may have written a PAD to consume
                        await self._wait_credit(length, deadline)
                    written += 1
                    if producer.consumer_sleeping():
                        self._channel.ring()
            except BaseException as exc:
                if written:
                    # Half a message is in the ring: the connection cannot be reused.
                    self._broken = exc if isinstance(exc, TransportError) else PeerGone(
                        f"send to {self.peer} was interrupted mid-message")
                    await self._shutdown()
                raise
        self._endpoint._count_sent(message.nbytes + len(message.meta))

    def try_send(self, header, tensors=None) -> bool:
        if self._lock.locked():  # a send is waiting for credit: keep the order
            return False
        self._check()
        message = self._encode(header, tensors)
        producer = self._producer
        records = producer.records(message)
        kind, parts, length, aux = next(records)
        if kind != MSG or not producer.try_write(kind, parts, length, aux):
            return False  # streamed in chunks, or no room now (a PAD it wrote is harmless)
        if producer.consumer_sleeping():
            self._channel.ring()
        self._endpoint._count_sent(message.nbytes + len(message.meta))
        return True

    async def _wait_credit(self, length: int, deadline: float) -> None:
        producer, channel = self._producer, self._channel
        spin_until = min(time.monotonic() + self._endpoint.spin_s, deadline)
        while time.monotonic() < spin_until:
            _yield_cpu()
            await asyncio.sleep(0)
            self._check()
            producer.refresh_credit()
            if producer.space_needed(length) <= producer.free():
                return
        producer.set_waiting(True)
        backstop = BACKSTOP_MIN
        try:
            while True:
                channel.bell.clear()
                self._check()
                producer.refresh_credit()
                if producer.space_needed(length) <= producer.free():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout(
                        f"{self._endpoint.name} peer {self.peer} had no room for "
                        f"{length} bytes within the send timeout")
                if not await _wait(channel.bell, min(backstop, left)):
                    backstop = min(backstop * 2, BACKSTOP_MAX)
        finally:
            if channel.alive:
                producer.set_waiting(False)

    async def _shutdown(self) -> None:
        await self._channel.close()
        self._data.close()
        self._credit.close()
        self._endpoint._senders.discard(self)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            if self._broken is None and self._channel.alive:
                try:
                    # The peer must not see the side channel end before the data has landed.
                    await self._data.flush(self._endpoint.send_timeout)
                except (TransportError, TimeoutError) as exc:
                    log.debug("%s: closing sender to %s without a flush: %s", self._endpoint.name, self.peer, exc)
            await self._shutdown()


class _Inbound:
    """A consumer's end of one connection."""

    def __init__(self, channel: _Channel, consumer: RingConsumer, data: Region, credit: Writer, peer: str):
        self.channel, self.consumer = channel, consumer
        self.assembler = Assembler(consumer)
        self.data, self.credit = data, credit
        self.peer = peer
        self.held: collections.OrderedDict[int, Message] = collections.OrderedDict()
        self.closed = False

    def evict_over_high_water(self) -> None:
        """Copy held messages out, oldest first, until at most ``hwm`` bytes are held (I7)."""
        while self.held and self.consumer.over_high_water():
            self.evict(next(iter(self.held.values())))

    def evict(self, msg: Message) -> None:
        # Re-point the caller's tensor objects at copies, so they stay valid.
        for t in msg.tensors.values():
            t.set_(t.clone())
        msg.release()

    def close(self) -> None:
        for msg in list(self.held.values()):
            self.evict(msg)
        self.closed = True
        self.credit.close()
        self.data.close()


class RingTransport(Transport):
    """A Transport whose connections are double rings over a medium's memory.

    Subclasses provide the memory through four hooks (see ``shm.py``).
    """

    def __init__(self, *, host: str, advertise_host: str | None, config: RingConfig,
                 send_timeout: float, handshake_timeout: float, spin_s: float,
                 max_message_bytes: int, spin: str = "auto"):
        """``spin``: "auto" (recv spins up to ``spin_s`` only while messages come back to back
        or one is streaming in) or "always" (before every sleep)."""
        self.spin = check_spin(spin)
        self.config = config
        self.send_timeout = send_timeout
        self.handshake_timeout = handshake_timeout
        self.spin_s = spin_s
        self.max_message_bytes = max_message_bytes
        self.id = uuid.uuid4().hex
        self._host, self._advertise = host, advertise_host or host
        self._server: asyncio.base_events.Server | None = None
        self._port = 0
        self._inbound: list[_Inbound] = []
        self._senders: set[RingSender] = set()
        self._handshakes: set[asyncio.Task] = set()
        self._bell = asyncio.Event()
        self._rr = 0
        # Mean gap between received messages (EWMA). recv spins only while it is under spin_s:
        # for a stream of chunks a spin saves a sleep and a wake-up per message, but for
        # messages that come every half millisecond (control-plane pace) it only burns a
        # core that, on a small machine, the very process that should send is waiting for.
        self._gap = 1e-3
        self._last_arrival = 0.0
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stats = dict.fromkeys(("bytes_sent", "bytes_received", "messages_sent", "messages_received"), 0)
        self._doorkeeper = Doorkeeper(self.name)

    # -- medium hooks -------------------------------------------------------
    @abc.abstractmethod
    def _offer(self) -> tuple[Region, dict]:
        """Producer: make the credit region; what the consumer needs to reach it."""

    @abc.abstractmethod
    def _accept(self, offer: dict, config: RingConfig) -> tuple[Region, Writer, dict]:
        """Consumer: reach the producer's credit region, make the data region."""

    @abc.abstractmethod
    def _complete(self, answer: dict, config: RingConfig) -> Writer:
        """Producer: reach the consumer's data region (``config`` is the consumer's ring)."""

    def _descriptor_extra(self) -> dict:
        return {}

    def _medium_failed(self, memory: Region | Writer, exc: TransportError) -> None:
        """A medium reports that a connection's memory failed (say, a verbs error): end that connection."""
        for sender in list(self._senders):
            if memory in (sender._data, sender._credit) and sender._broken is None:
                sender._broken = exc
                sender._channel.bell.set()
        for conn in self._inbound:
            if memory in (conn.data, conn.credit) and conn.channel.alive:
                conn.channel.alive = False
                conn.channel.writer.transport.close()
                self._bell.set()

    # -- lifecycle ----------------------------------------------------------
    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self._host, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("%s endpoint %s listening on %s:%d (ring %d MiB)", self.name, self.id[:8],
                 self._host, self._port, self.config.size >> 20)

    @property
    def descriptor(self) -> dict:
        return {"transport": self.name, "id": self.id, "host": self._advertise, "port": self._port,
                "host_id": host_id(), **self._descriptor_extra()}

    def stats(self) -> dict[str, int]:
        return {**self._stats, "connections_refused": self._doorkeeper.refused}

    def _count_sent(self, n: int) -> None:
        self._stats["bytes_sent"] += n
        self._stats["messages_sent"] += 1

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._handshakes):
            task.cancel()
        for sender in list(self._senders):
            await sender.aclose()
        for conn in self._inbound:
            await self._drop(conn)
        self._inbound.clear()
        self._bell.set()
        if self._server is not None:
            await self._server.wait_closed()

    # -- producer side ------------------------------------------------------
    async def connect(self, descriptor: Mapping[str, Any], *, timeout: float | None = None,
                      credential: Credential | None = None) -> Sender:
        if self._closed:
            raise TransportClosed(f"{self.name} endpoint is closed")
        if descriptor.get("transport") != self.name:
            raise ValueError(f"descriptor is for {descriptor.get('transport')!r}, not {self.name!r}")
        peer = str(descriptor.get("id", "?"))
        timeout = self.handshake_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(descriptor["host"], descriptor["port"])
        except TimeoutError as exc:
            raise TransportTimeout(f"connecting to {self.name} peer {peer} timed out") from exc
        except OSError as exc:
            raise PeerGone(f"cannot reach {self.name} peer {peer} at "
                           f"{descriptor.get('host')}:{descriptor.get('port')}: {exc}") from exc
        channel = _Channel(reader, writer)
        credit = data = None
        try:
            async with asyncio.timeout(timeout):
                challenge = await channel.recv_frame()
                if challenge.get("v") != PROTOCOL:
                    raise ProtocolError(f"{self.name} peer {peer} speaks handshake version {challenge.get('v')!r}, "
                                        f"not {PROTOCOL}")
                credit, offer = self._offer()
                await channel.send_frame({"v": PROTOCOL, "hello": self.id, "offer": offer,
                                          **credentials.answer(credential, challenge.get("challenge"))})
                answer = await channel.recv_frame()
                config = RingConfig(**answer["config"])
                data = self._complete(answer["answer"], config)
                await channel.send_frame({"ready": True})
        except BaseException as exc:
            for r in (data, credit):
                if r is not None:
                    r.close()
            await channel.close()
            if isinstance(exc, TimeoutError):
                raise TransportTimeout(f"handshake with {self.name} peer {peer} timed out") from exc
            if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)):
                raise PeerGone(f"{self.name} peer {peer} closed during the handshake") from exc
            if isinstance(exc, (KeyError, TypeError, ValueError)):
                raise ProtocolError(f"bad handshake answer from {self.name} peer {peer}: {exc!r}") from exc
            raise
        producer = RingProducer(config, None, credit.view)
        producer.remote = _Remote(data, channel)
        channel.start_watching()
        sender = RingSender(self, channel, producer, credit, data, peer)
        self._senders.add(sender)
        log.debug("%s connected to %s (%s)", self.name, peer[:8], channel.address)
        return sender

    # -- consumer side ------------------------------------------------------
    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(reader, writer))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, reader, writer) -> None:
        channel = _Channel(reader, writer)
        data = credit = None
        nonce = credentials.challenge()
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await channel.send_frame({"v": PROTOCOL, "challenge": nonce})
                hello = await channel.recv_frame()
                if hello.get("v") != PROTOCOL or not isinstance(hello.get("offer"), dict):
                    raise ProtocolError(f"unsupported handshake {hello!r:.80}")
                why = self._doorkeeper.refusal(self.gate_key, nonce, hello, channel.address)
                if why is not None:  # before any region is made for it
                    await channel.send_frame({"error": why, "refused": True})
                    await channel.close()
                    return
                data, credit, answer = self._accept(hello["offer"], self.config)
                await channel.send_frame({"config": _config_dict(self.config), "answer": answer})
                if not (await channel.recv_frame()).get("ready"):
                    raise ProtocolError("peer did not confirm the handshake")
        except asyncio.CancelledError:
            await self._abandon(channel, data, credit)
            raise
        except Exception as exc:
            log.warning("%s: dropped connection from %s during handshake: %s", self.name, channel.address, exc)
            if isinstance(exc, TransportError) and not isinstance(exc, ProtocolError):
                try:
                    await channel.send_frame({"error": str(exc)})
                except (ConnectionError, OSError):
                    pass
            await self._abandon(channel, data, credit)
            return
        peer = str(hello.get("hello", "?"))
        consumer = RingConsumer(self.config, data.view, None)
        consumer.remote = _Remote(credit, channel)
        conn = _Inbound(channel, consumer, data, credit, peer)
        channel.on_bell = self._bell.set
        channel.start_watching()
        self._inbound.append(conn)
        self._bell.set()
        log.debug("%s accepted %s (%s)", self.name, peer[:8], channel.address)

    async def _abandon(self, channel: _Channel, *regions) -> None:
        for r in regions:
            if r is not None:
                r.close()
        await channel.close()

    async def _drop(self, conn: _Inbound) -> None:
        conn.close()
        await conn.channel.close()

    def _release_cb(self, conn: _Inbound, start: int, end: int):
        def release() -> None:
            if threading.get_ident() != self._loop_thread:
                self._loop.call_soon_threadsafe(release)
                return
            conn.held.pop(start, None)
            if not conn.closed:
                conn.consumer.release(start, end)
        return release

    def _pump(self, conn: _Inbound) -> Message | None:
        """Consume the connection's records up to the next complete message."""
        while (rec := conn.consumer.poll()) is not None:
            done = conn.assembler.feed(rec)
            if done is None:
                continue
            self._stats["bytes_received"] += rec.payload.nbytes if done.record else done.meta["n"]
            self._stats["messages_received"] += 1
            header = done.meta["h"]
            if done.record is None:
                return Message(header, done.tensors, conn.peer)
            msg = Message(header, done.tensors, conn.peer, self._release_cb(conn, rec.start, rec.end))
            conn.held[rec.start] = msg
            return msg
        return None

    async def _poll_all(self) -> Message | None:
        n = len(self._inbound)
        for i in range(n):
            conn = self._inbound[(self._rr + i) % n]
            try:
                msg = self._pump(conn)
            except ProtocolError as exc:
                await self._remove(conn)
                raise ProtocolError(f"{self.name} peer {conn.peer} broke the ring protocol: {exc}") from exc
            if msg is not None:
                self._rr = (self._rr + i + 1) % n
                return msg
            if not conn.channel.alive:
                # The peer is gone and everything it finished has been read.
                partial = conn.assembler.partial
                await self._remove(conn)
                if partial is not None:
                    raise PeerGone(f"{self.name} peer {conn.peer} at {conn.channel.address} died "
                                   f"mid-message after {partial[0]} of {partial[1]} bytes")
                log.debug("%s peer %s closed", self.name, conn.peer[:8])
                return await self._poll_all()
        return None

    async def _remove(self, conn: _Inbound) -> None:
        self._inbound.remove(conn)
        await self._drop(conn)

    def _arrived(self, msg: Message) -> Message:
        now = time.monotonic()
        gap = min(now - self._last_arrival, 1e-3)  # past a millisecond it is sparse, however long
        self._last_arrival = now
        self._gap = 0.75 * self._gap + 0.25 * gap
        return msg

    async def recv(self, *, timeout: float | None = None) -> Message:
        if self._closed:
            raise TransportClosed(f"{self.name} endpoint is closed")
        if (msg := await self._poll_all()) is not None:
            return self._arrived(msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        for conn in self._inbound:
            conn.evict_over_high_water()
        # Spin when the next record is likely within it: messages came back to back lately, or
        # one is half way (the rest of its chunks follow as fast as the producer gets credit).
        if (self.spin == "always" or self._gap < self.spin_s
                or any(c.assembler.partial is not None for c in self._inbound)):
            spin_until = time.monotonic() + self.spin_s
            while time.monotonic() < spin_until:
                _yield_cpu()
                await asyncio.sleep(0)
                if (msg := await self._poll_all()) is not None:
                    return self._arrived(msg)
        backstop = BACKSTOP_MIN
        try:
            while True:
                if self._closed:
                    raise TransportClosed(f"{self.name} endpoint is closed")
                self._bell.clear()
                for conn in self._inbound:
                    conn.evict_over_high_water()
                    conn.consumer.set_sleeping(True)
                if (msg := await self._poll_all()) is not None:
                    return self._arrived(msg)
                wait = BACKSTOP_MAX if not self._inbound else backstop
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransportTimeout(f"no message within {timeout} s")
                    wait = min(wait, left)
                if await _wait(self._bell, wait):
                    backstop = BACKSTOP_MIN
                else:
                    backstop = min(backstop * 2, BACKSTOP_MAX)
        finally:
            for conn in self._inbound:
                if conn.channel.alive:
                    conn.consumer.set_sleeping(False)


def ring_config(ring_bytes: int | None, hwm: int | None = None, chunk: int | None = None) -> RingConfig:
    """The ring geometry from options (defaults: 32 MiB, hwm 1/4, chunk 1/8)."""
    base = RingConfig.for_size(ring_bytes or RingConfig.size)
    return RingConfig(size=base.size, hwm=base.hwm if hwm is None else hwm,
                      chunk=base.chunk if chunk is None else chunk)

