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
import dataclasses
import logging
import math
import os
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy
import torch

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
from .grants import Deny, Destroy, Grant, GrantPool
from .host import host_id
from .ring import (
    CHUNK, KINDS, MAX_DROPS, MSG, PAD, START, Assembler, Dropped, GrantSlot, Record, Requested, RingConfig, RingConsumer,
    RingProducer,
)

log = logging.getLogger(__name__)

PROTOCOL = 3  # 2: the consumer challenges, the hello proves a credential; 3: rendezvous grants
FRAME = struct.Struct("<I")
MAX_FRAME = 64 << 10
BELL = b"!"
BACKSTOP_MIN, BACKSTOP_MAX = 0.001, 0.2
GRANT_BYTES = 512 << 20  # default bound of an endpoint's pool of granted regions
GRANT_MIN_BYTES = 8 << 20  # default: payloads this large and up go by rendezvous
REPLY_SPIN_S = 500e-6  # recv spins after a send while replies come back within this
_NOT_MSG = frozenset(KINDS) - {MSG, PAD}  # a spin's look takes MSG records (and skips PADs), nothing else
SPIN_LOOK_S = 20e-6  # each turn of a spin looks at the rings this long before yielding the CPU and the loop


class Region(abc.ABC):
    """Memory of this process that the peer writes one-sidedly."""

    view: memoryview

    @abc.abstractmethod
    def close(self) -> None: ...


class Writer(abc.ABC):
    """One-sided writes into the peer's region."""

    #: A granted region's writer: a local view of it when the medium maps it (shm), so a tensor
    #: can be made in it (zero-copy production); None when writes go through a NIC (rdma).
    view: memoryview | None = None

    @abc.abstractmethod
    def write(self, offset: int, parts) -> None: ...

    async def flush(self, timeout: float) -> None:
        """Wait until every write so far has landed (media that post writes asynchronously)."""

    def reach(self, handle: bytes, size: int) -> Writer:
        """Producer: a writer into the consumer's granted region named by ``handle``."""
        raise TransportError(f"{type(self).__name__} cannot reach granted regions")

    @abc.abstractmethod
    def close(self) -> None: ...


class GrantRegion(Region):
    """Consumer: a region of ours granted for rendezvous; ``handle`` tells the producer how to reach it."""

    handle: bytes


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
    return dataclasses.asdict(c)


def _address(buffer) -> int:
    """The address of a buffer's first byte (to see whether a payload part already sits in a region)."""
    return numpy.frombuffer(buffer, dtype=numpy.uint8).ctypes.data


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
        self._req = 0
        self._targets: dict[int, Writer] = {}  # region id -> our way into the consumer's granted region
        self._allocated: dict[int, tuple[GrantSlot, torch.Tensor]] = {}  # data_ptr -> grant, tensor
        # region id -> tensors of ours still viewing it after their PUT or DROP: copied out
        # before we write that region again (the consumer may grant it to us once more)
        self._lent: dict[int, list[weakref.ref]] = {}
        self._pinned: dict[int, int] = {}  # region id -> address registered with CUDA as pinned

    def _check(self) -> None:
        if self._closed:
            raise TransportClosed(f"sender to {self.peer} is closed")
        if self._broken is not None:
            raise self._broken
        if not self._channel.alive:
            self._broken = PeerGone(f"{self._endpoint.name} peer {self.peer} at {self._channel.address} is gone")
            raise self._broken

    def _encode(self, header, tensors) -> codec.Encoded:
        # Device tensors stay on their device while a granted region may take them straight (_put).
        message = codec.encode(header, tensors, keep_device=self._endpoint.maps_regions)
        if message.nbytes > self._endpoint.max_message_bytes:
            raise MessageTooLarge(f"message of {message.nbytes} bytes > {self._endpoint.max_message_bytes}")
        return message

    async def send(self, header, tensors=None, *, timeout=None) -> None:
        self._check()
        message = self._encode(header, tensors)
        if not self._lock.locked() and self._allocated_key(tensors) is None and self._try_ring(message):
            return
        timeout = self._endpoint.send_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        async with self._lock:
            self._check()
            start = self._producer.seq
            allocated = self._allocated_in(tensors)
            try:
                if allocated is not None:
                    await self._put(message, allocated, deadline)
                elif self._producer.by_rendezvous(message.nbytes):
                    slot = await self._request(message.nbytes, deadline)
                    await (self._put(message, slot, deadline) if slot.length else self._stream(message, deadline))
                else:
                    await self._stream(message, deadline)
            except BaseException as exc:
                await self._interrupted(exc, start, "send")
                raise
        self._endpoint._count_sent(message.nbytes + len(message.meta))

    async def _interrupted(self, exc: BaseException, start: int, what: str) -> None:
        """A send or an allocation failed or was cancelled: if it had written a record (half a
        message is in the ring, or a request is open), the connection cannot be reused."""
        if self._producer.seq != start:
            self._broken = exc if isinstance(exc, TransportError) else PeerGone(
                f"{what} to {self.peer} was interrupted mid-message")
            await self._shutdown()

    def zero_copy(self, nbytes: int) -> bool:
        return self._endpoint.maps_regions and self._producer.by_rendezvous(nbytes)

    async def allocate(self, shape, dtype, *, timeout=None) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        self._check()
        if not self.zero_copy(nbytes):
            return await super().allocate(shape, dtype)
        deadline = time.monotonic() + (self._endpoint.send_timeout if timeout is None else timeout)
        async with self._lock:
            self._check()
            start = self._producer.seq
            try:
                slot = await self._request(nbytes, deadline)
            except BaseException as exc:
                await self._interrupted(exc, start, "allocation")
                raise
        if not slot.length:  # denied: the message will stream
            return await super().allocate(shape, dtype)
        target = self._target(slot)
        self._pin(slot.region, target)
        tensor = codec.view_bytes(target.view, 0, nbytes).view(dtype).view(shape)
        self._allocated[tensor.data_ptr()] = (slot, tensor)
        return tensor

    async def discard(self, tensor: torch.Tensor) -> None:
        entry = self._allocated.pop(tensor.data_ptr(), None)
        if entry is None:
            return
        self._lend(entry[0], entry[1])
        async with self._lock:
            if self._broken is None and not self._closed and self._channel.alive:
                await self._write_records([self._producer.drop(entry[0].req)],
                                          time.monotonic() + self._endpoint.send_timeout)

    def _allocated_in(self, tensors) -> GrantSlot | None:
        """The grant of the first of ``tensors`` that :meth:`allocate` made, now lent to the
        consumer (the message goes as its PUT); None if there is none."""
        key = self._allocated_key(tensors)
        if key is None:
            return None
        slot, tensor = self._allocated.pop(key)
        self._lend(slot, tensor)
        return slot

    def _allocated_key(self, tensors) -> int | None:
        if self._allocated:
            for t in (tensors or {}).values():
                if isinstance(t, torch.Tensor) and t.data_ptr() in self._allocated:
                    return t.data_ptr()
        return None

    def _lend(self, slot: GrantSlot, tensor: torch.Tensor) -> None:
        """The region is the consumer's from now on; ``tensor`` stays readable (a worker holds its
        outputs until RELEASE) until the region is granted to us again (:meth:`_reclaim`)."""
        self._lent.setdefault(slot.region, []).append(weakref.ref(tensor))

    def _reclaim(self, region: int) -> None:
        """Before we write ``region`` again: our tensors that still view it get copies of their own."""
        for ref in self._lent.pop(region, ()):
            tensor = ref()
            if tensor is not None and tensor.numel():
                tensor.set_(tensor.clone())

    def _pin(self, region: int, target: Writer) -> None:
        """On a CUDA machine, register a mapped region as pinned memory once, so a device-to-host
        copy lands in it by DMA (no staging host tensor). Untested here: no GPU in CI."""
        if region in self._pinned or target.view is None or not torch.cuda.is_available():
            return
        address = _address(target.view)
        err = torch.cuda.cudart().cudaHostRegister(address, target.view.nbytes, 0)
        if int(err) == 0:
            self._pinned[region] = address
        else:
            log.debug("cudaHostRegister of a %d-byte region failed (%s): copies stage through pageable memory",
                      target.view.nbytes, err)
            self._pinned[region] = 0

    def _unpin(self, region: int) -> None:
        address = self._pinned.pop(region, 0)
        if address:
            torch.cuda.cudart().cudaHostUnregister(address)

    def _drop_target(self, region: int) -> None:
        self._unpin(region)
        target = self._targets.pop(region, None)
        if target is not None:
            target.close()  # a tensor still viewing it keeps the mapping until it goes

    async def _stream(self, message: codec.Encoded, deadline: float) -> None:
        await self._write_records(self._producer.records(message.on_host()), deadline)

    async def _write_records(self, records, deadline: float) -> None:
        producer = self._producer
        for kind, parts, length, aux in records:
            while not producer.try_write(kind, parts, length, aux):
                if producer.consumer_sleeping():
                    self._channel.ring()  # it may have written a PAD to consume
                await self._wait(lambda: producer.space_needed(length) <= producer.free(), deadline,
                                 f"had no room for {length} bytes")
            if producer.consumer_sleeping():
                self._channel.ring()

    async def _request(self, nbytes: int, deadline: float) -> GrantSlot:
        """Ask the consumer for a region of ``nbytes`` and wait for its grant (G4)."""
        self._req += 1
        req, producer = self._req, self._producer
        await self._write_records([producer.request(req, nbytes)], deadline)
        if not producer.consumer_sleeping():
            self._channel.ring()  # a consumer outside recv answers from its doorbell (_read_ahead)
        found: list[GrantSlot] = []

        def granted() -> bool:
            slot = producer.grant(req)
            if slot is not None:
                found.append(slot)
            return slot is not None

        await self._wait(granted, deadline, f"granted no region for {nbytes} bytes", nudge=True)
        slot = found[0]
        for region in slot.drops:
            self._lent.pop(region, None)  # our mapping stays while those tensors live; nobody writes it
            self._drop_target(region)
        if slot.length and slot.length < nbytes:
            raise ProtocolError(f"{self._endpoint.name} peer {self.peer} granted {slot.length} bytes "
                                f"for a request of {nbytes}")
        if slot.length:
            self._reclaim(slot.region)
        return slot

    def _target(self, slot: GrantSlot) -> Writer:
        target = self._targets.get(slot.region)
        if target is None:
            target = self._targets[slot.region] = self._data.reach(slot.handle, slot.length)
        return target

    async def _put(self, message: codec.Encoded, slot: GrantSlot, deadline: float) -> None:
        """Copy the payload into the granted region (once; parts already there stay), then PUT it."""
        if message.nbytes > slot.length:
            await self._write_records([self._producer.drop(slot.req)], deadline)
            await self._stream(message, deadline)
            return
        target = self._target(slot)
        if target.view is None:
            message = message.on_host()
        base = _address(target.view) if target.view is not None else None
        offset = 0
        for part in message.parts:
            if isinstance(part, torch.Tensor):  # on a device: copied straight into the region
                self._pin(slot.region, target)
                codec.view_bytes(target.view, offset, part.numel()).copy_(part)
                offset += part.numel()
                continue
            n = part.nbytes
            if n and (base is None or _address(part) != base + offset):
                target.write(offset, (part,))
            offset += n
        await self._write_records([self._producer.put(slot.req, message)], deadline)

    async def _wait(self, ready, deadline: float, what: str, nudge: bool = False) -> None:
        """Wait until ``ready()``: a short spin, then the "waiting" flag and the doorbell (I6, I8).
        ``nudge``: ring the consumer again at every backstop (a request it may not have seen)."""
        producer, channel = self._producer, self._channel
        spin_until = min(time.monotonic() + self._endpoint.spin_s, deadline)
        while time.monotonic() < spin_until:
            _yield_cpu()
            await asyncio.sleep(0)
            self._check()
            producer.refresh_credit()
            if ready():
                return
        producer.set_waiting(True)
        backstop = BACKSTOP_MIN
        try:
            while True:
                channel.bell.clear()
                self._check()
                producer.refresh_credit()
                if ready():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout(f"{self._endpoint.name} peer {self.peer} {what} within the send timeout")
                if not await _wait(channel.bell, min(backstop, left)):
                    backstop = min(backstop * 2, BACKSTOP_MAX)
                    if nudge:
                        channel.ring()
        finally:
            if channel.alive:
                producer.set_waiting(False)

    def try_send(self, header, tensors=None) -> bool:
        if self._lock.locked() or self._allocated_key(tensors) is not None:  # keep the order; a PUT needs it
            return False
        self._check()
        return self._try_ring(self._encode(header, tensors))

    def _try_ring(self, message: codec.Encoded) -> bool:
        """Write ``message`` as one MSG record now, if it takes no rendezvous and the ring has room:
        the path with no task, no lock and no await (most of a small message's latency)."""
        producer = self._producer
        if producer.by_rendezvous(message.nbytes):
            return False
        kind, parts, length, aux = next(producer.records(message.on_host()))
        if kind != MSG or not producer.try_write(kind, parts, length, aux):
            return False  # streamed in chunks, or no room now (a PAD it wrote is harmless)
        if producer.consumer_sleeping():
            self._channel.ring()
        self._endpoint._count_sent(message.nbytes + len(message.meta))
        return True

    async def _shutdown(self) -> None:
        await self._channel.close()
        for region in list(self._targets):
            self._drop_target(region)
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

    def __init__(self, endpoint: RingTransport, channel: _Channel, consumer: RingConsumer, data: Region,
                 credit: Writer, peer: str):
        self.endpoint = endpoint
        self.channel, self.consumer = channel, consumer
        self.assembler = Assembler(consumer)
        self.data, self.credit = data, credit
        self.peer = peer
        self.held: collections.OrderedDict[int, Message] = collections.OrderedDict()
        self.drops: list[int] = []  # regions destroyed since its last grant: the producer unmaps them
        self.ready: collections.deque[Message] = collections.deque()  # read ahead outside recv
        self.failure: ProtocolError | None = None  # what reading ahead found, for the next recv
        self.closed = False

    def evict_over_high_water(self) -> None:
        """Copy held messages out, oldest first, until at most ``hwm`` bytes are held (I7)."""
        while self.held and self.consumer.over_high_water():
            _evict(next(iter(self.held.values())))

    def close(self) -> None:
        for msg in list(self.held.values()):
            _evict(msg)
        self.closed = True
        self.credit.close()
        self.data.close()


def _evict(msg: Message) -> None:
    """Re-point the caller's tensor objects at copies, so they stay valid, and release the memory."""
    for t in msg.tensors.values():
        t.set_(t.clone())
    msg.release()


class RingTransport(Transport):
    """A Transport whose connections are double rings over a medium's memory.

    Subclasses provide the memory through four hooks (see ``shm.py``), and a
    fifth for rendezvous (``_make_region``) when they can grant regions.
    """

    #: Whether the medium can make regions to grant (``_make_region``) and reach them (``Writer.reach``).
    grants = False
    #: Whether a producer maps a granted region (so ``Sender.allocate`` can hand out a tensor in it).
    maps_regions = False

    def __init__(self, *, host: str, advertise_host: str | None, config: RingConfig,
                 send_timeout: float, handshake_timeout: float, spin_s: float,
                 max_message_bytes: int, spin: str = "auto", grant_bytes: int = GRANT_BYTES,
                 grant_min_bytes: int = GRANT_MIN_BYTES, grant_pool: GrantPool | None = None):
        """``spin``: "auto" (recv spins up to ``spin_s`` while messages come back to back, one is
        streaming in, or a reply to what this endpoint just sent is likely) or "always" (before
        every sleep). ``grant_bytes``: the bound of the pool of regions granted for rendezvous
        (0: every large message streams through the ring); messages of ``grant_min_bytes`` and
        more go by rendezvous. ``grant_pool``: a pool shared with other media of one worker."""
        self.spin = check_spin(spin)
        if grant_bytes < 0 or grant_min_bytes <= 0:
            raise ValueError("grant_bytes must be >= 0 and grant_min_bytes > 0")
        self._pool = grant_pool if grant_pool is not None else GrantPool(grant_bytes)
        if self.grants and self._pool.limit:
            config = dataclasses.replace(config, grant_min=grant_min_bytes, grant_max=self._pool.limit)
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
        # How soon after this endpoint sends something a message arrives (EWMA): a request/reply
        # pattern makes it short, and then recv spins after a send instead of sleeping.
        self._reply = REPLY_SPIN_S
        self._last_send = 0.0
        self._regions: dict[int, GrantRegion] = {}  # ours, made for the pool's grants
        self._receiving = 0  # recv calls under way
        self._held_grants: collections.OrderedDict[int, Message] = collections.OrderedDict()
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

    def _make_region(self, size: int) -> GrantRegion:
        """Consumer: a pre-faulted region of ``size`` bytes of ours that one producer may write."""
        raise TransportError(f"{self.name} cannot make regions to grant")

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
        return {**self._stats, "connections_refused": self._doorkeeper.refused,
                "grant_pool_bytes": sum(r.view.nbytes for r in self._regions.values()),
                "grant_pool_limit": self._pool.limit if self.config.grant_max else 0}

    def _count_sent(self, n: int) -> None:
        self._stats["bytes_sent"] += n
        self._stats["messages_sent"] += 1
        self._last_send = time.monotonic()

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
        for region in self._regions.values():
            region.close()  # a region a received message still views stays mapped until that goes
        self._regions.clear()
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
        conn = _Inbound(self, channel, consumer, data, credit, peer)

        def on_bell() -> None:
            self._bell.set()
            self._read_ahead(conn)

        channel.on_bell = on_bell
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
        self._act(self._pool.close(conn))
        await conn.channel.close()

    # -- rendezvous (grants.py decides, this carries it out) -----------------
    def _act(self, actions) -> None:
        """Carry out the pool's actions; a pool shared by several media (auto) reaches each
        connection through its own endpoint."""
        work = collections.deque(actions)
        while work:
            action = work.popleft()
            work.extend(action.conn.endpoint._carry_out(action))

    def _carry_out(self, action) -> list:
        conn = action.conn
        if isinstance(action, Destroy):
            region = self._regions.pop(action.region, None)
            if region is not None:
                region.close()
            if not conn.closed:
                conn.drops.append(action.region)
            return []
        if isinstance(action, Deny):
            if not conn.closed:
                self._answer(conn, GrantSlot(action.req, 0, 0, b""))
            return []
        assert isinstance(action, Grant)
        if action.new:
            try:
                self._regions[action.region] = self._make_region(action.size)
            except (TransportError, OSError) as exc:
                log.warning("%s: cannot make a %d MiB region to grant (%s); the message streams instead",
                            self.name, action.size >> 20, exc)
                return self._pool.forget(action.region)
        region = self._regions[action.region]
        conn.assembler.granted[action.req] = region.view[: action.size]
        self._answer(conn, GrantSlot(action.req, action.region, action.size, region.handle))
        return []

    @staticmethod
    def _answer(conn: _Inbound, slot: GrantSlot) -> None:
        drops, conn.drops = conn.drops[:MAX_DROPS], conn.drops[MAX_DROPS:]
        conn.consumer.grant(dataclasses.replace(slot, drops=tuple(drops)))

    def _on_loop(self, fn):
        """``fn`` as a message's release callback: it runs on this endpoint's loop thread, whichever
        thread releases the message (a stage's executor thread may)."""
        def release() -> None:
            if threading.get_ident() != self._loop_thread:
                self._loop.call_soon_threadsafe(fn)
            else:
                fn()
        return release

    def _grant_release_cb(self, region_id: int):
        def release() -> None:
            self._held_grants.pop(region_id, None)
            self._act(self._pool.release(region_id))
        return self._on_loop(release)

    def _evict_grants(self) -> None:
        """Copy out held messages, oldest first, while they keep a waiting request from fitting (G5)."""
        while self._held_grants and self._pool.evictable():
            _evict(next(iter(self._held_grants.values())))

    def _release_cb(self, conn: _Inbound, start: int, end: int):
        def release() -> None:
            conn.held.pop(start, None)
            if not conn.closed:
                conn.consumer.release(start, end)
        return self._on_loop(release)

    def _pump(self, conn: _Inbound) -> Message | None:
        """Consume the connection's records up to the next complete message."""
        if conn.failure is not None:
            raise conn.failure
        if conn.ready:
            return conn.ready.popleft()
        while (rec := conn.consumer.poll()) is not None:
            if (msg := self._deliver(conn, rec)) is not None:
                return msg
        return None

    def _read_ahead(self, conn: _Inbound) -> None:
        """A doorbell while nobody is in recv: answer rendezvous requests now, so a producer
        is not kept waiting for a grant until the application next receives. Messages met on
        the way are kept (ring views, or granted regions: both bounded); a streamed message
        stops it, since copying one out would buffer without bound."""
        if self._receiving or conn.closed or conn.failure is not None or conn.assembler.partial is not None:
            return
        try:
            while (rec := conn.consumer.poll(until=(START, CHUNK))) is not None:
                if (msg := self._deliver(conn, rec)) is not None:
                    conn.ready.append(msg)
        except ProtocolError as exc:
            conn.failure = exc
            self._bell.set()

    def _deliver(self, conn: _Inbound, rec: Record) -> Message | None:
        """One record's share of the work: a message when it completes one."""
        done = conn.assembler.feed(rec)
        if done is None:
            return None
        if isinstance(done, Requested):
            self._act(self._pool.request(conn, done.req, done.nbytes))
            return None
        if isinstance(done, Dropped):
            self._act(self._pool.drop(conn, done.req))
            return None
        self._stats["bytes_received"] += rec.payload.nbytes if done.record else done.meta["n"]
        self._stats["messages_received"] += 1
        header = done.meta["h"]
        if done.grant is not None:
            region = self._pool.put(conn, done.grant)
            msg = Message(header, done.tensors, conn.peer, self._grant_release_cb(region.id))
            self._held_grants[region.id] = msg
            return msg
        if done.record is None:
            return Message(header, done.tensors, conn.peer)
        msg = Message(header, done.tensors, conn.peer, self._release_cb(conn, rec.start, rec.end))
        conn.held[rec.start] = msg
        return msg

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
                requested = sum(conn.assembler.requested.values())
                await self._remove(conn)
                if partial is not None:
                    raise PeerGone(f"{self.name} peer {conn.peer} at {conn.channel.address} died "
                                   f"mid-message after {partial[0]} of {partial[1]} bytes")
                if requested:
                    raise PeerGone(f"{self.name} peer {conn.peer} at {conn.channel.address} died "
                                   f"mid-message: {requested} bytes asked for by rendezvous were never put")
                log.debug("%s peer %s closed", self.name, conn.peer[:8])
                return await self._poll_all()
        return None

    def _peek_all(self) -> Message | None:
        """A message from a ring whose next record is a complete MSG, without waiting or raising:
        the spin's cheap look (anything else waits for :meth:`_poll_all`, which also raises what
        a look found wrong)."""
        for conn in self._inbound:
            if (conn.ready or conn.failure is not None or not conn.channel.alive
                    or conn.assembler.partial is not None):
                return None  # _poll_all handles these
            try:
                if (rec := conn.consumer.poll(until=_NOT_MSG)) is not None:
                    return self._deliver(conn, rec)
            except ProtocolError as exc:
                conn.failure = exc
                return None
        return None

    async def _remove(self, conn: _Inbound) -> None:
        self._inbound.remove(conn)
        await self._drop(conn)

    def _arrived(self, msg: Message) -> Message:
        now = time.monotonic()
        if self._last_send > self._last_arrival:  # the first message since we sent one: a reply?
            self._reply = 0.75 * self._reply + 0.25 * min(now - self._last_send, 4 * REPLY_SPIN_S)
        gap = min(now - self._last_arrival, 1e-3)  # past a millisecond it is sparse, however long
        self._last_arrival = now
        self._gap = 0.75 * self._gap + 0.25 * gap
        return msg

    async def recv(self, *, timeout: float | None = None) -> Message:
        self._receiving += 1
        try:
            return await self._recv(timeout)
        finally:
            self._receiving -= 1

    async def _recv(self, timeout: float | None) -> Message:
        if self._closed:
            raise TransportClosed(f"{self.name} endpoint is closed")
        if (msg := await self._poll_all()) is not None:
            return self._arrived(msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        for conn in self._inbound:
            conn.evict_over_high_water()
        self._evict_grants()
        # Spin when the next record is likely within it: messages came back to back lately, one
        # is half way (the rest of its chunks follow as fast as the producer gets credit), or we
        # just sent something and replies have been coming back within REPLY_SPIN_S (a request/
        # reply exchange: a doorbell and a wake-up on each side would cost more than the spin).
        now = time.monotonic()
        spin_until = 0.0
        if (self.spin == "always" or self._gap < self.spin_s
                or any(c.assembler.partial is not None for c in self._inbound)):
            spin_until = now + self.spin_s
        if self._reply < REPLY_SPIN_S and self._last_send > self._last_arrival:
            spin_until = max(spin_until, self._last_send + min(2 * self._reply + self.spin_s, REPLY_SPIN_S))
        if spin_until > now:
            while (now := time.monotonic()) < spin_until:
                look_until = min(now + SPIN_LOOK_S, spin_until)
                while True:  # cheap looks at the rings for a moment before the CPU and the loop are yielded
                    if (msg := self._peek_all()) is not None:
                        return self._arrived(msg)
                    if time.monotonic() >= look_until:
                        break
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
                self._evict_grants()
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

