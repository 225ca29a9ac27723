"""The double-ring protocol: one directed connection, producer P to consumer C.

No I/O lives here. Both ends run over a minimal memory-access interface
(:class:`Remote`: write bytes at an offset of the *peer's* region, ring the
peer's doorbell) plus a plain ``memoryview`` of their *own* region, so the
shared-memory backend and the RDMA backend run exactly this code; the asyncio
layer around it (``transports/ringtransport.py``) does all the waiting.

Regions
-------
data region, in C's memory, written only by P::

    [0, 64)            control: P's "waiting for credit" flag (u64)
    [64, 64 + size)    the data ring: records, back to back

credit region, in P's memory, written only by C::

    [0, 16)            released position (u64) and released ^ CREDIT_KEY (u64)
    [64, 72)           C's "sleeping, ring my doorbell" flag (u64)
    [128, 248)         the grant slot: request u64, region u64, length u64,
                       handle length u32, drops u32, handle 48 B, drops 5 x u64
    [248, 256)         request ^ GRANT_KEY: the slot's last word (written last)

Records
-------
Every record starts and ends on a 64-byte boundary::

    header  32 B   magic u32, kind u16, flags u16, seq u64, length u64, aux u64
    payload        ``length`` bytes (then zero or more unused bytes)
    trailer 32 B   16 unused bytes, length u64, seq ^ TRAILER_KEY u64 (the record's
                   last 8 bytes: once they show up, everything before them has)

Kinds: PAD fills the tail of the ring when the next record does not fit
before its end; MSG is a whole message (``u32 meta length, meta, padding to
64, tensor payload``); START begins a streamed message (meta only; ``aux`` is
the payload size) and CHUNK records carry consecutive slices of its payload.
A message of ``RingConfig.grant_min`` bytes or more travels by rendezvous
(``transports/grants.py``): REQ (payload: the request number; ``aux``: the
payload size) asks C for a region; C answers in the grant slot with a region
of its own (``length`` 0: stream it instead) and the ids of regions it has
destroyed (P unmaps them); P copies the payload into the region and writes
PUT (meta only, as START; ``aux``: the request), or DROP (``aux``: the
request) to give an unused grant back.

Invariants, and why nothing can deadlock
----------------------------------------
I1  Each region has exactly one writer: the data region P, the credit
    region C. No location is ever written by both sides.
I2  Positions are free-running byte counters that never wrap in practice
    (2**64), masked by ``% size`` on access, so full (write - released ==
    size) and empty (write == read) are never confused.
I3  Records never wrap around the end of the ring: a PAD record fills the
    tail instead. Since sizes and offsets are multiples of 64 and a PAD needs
    only 64 bytes, a PAD always fits.
I4  C consumes a record only when its header matches (magic, the expected
    sequence number) and its trailer, located from the header's length,
    matches too (the length, and ``seq ^ TRAILER_KEY`` as the record's last
    word). P writes a record front to back in one gather write and the
    medium places bytes in order, so the last word lands last; a torn record
    (header visible, payload landing) is never consumed. Stale bytes from an
    earlier lap cannot pass: sequence numbers are never reused.
I5  Credit is cumulative: C overwrites one position in place, so the credit
    ring can never fill and returning credit never waits on anything. The
    position only advances over a contiguous released prefix (out-of-order
    releases are coalesced), and it is written with a check word so a torn
    write is ignored rather than believed.
I6  P waits only for credit; C never waits for P in order to return it. So
    the only wait-for edge is P -> C, and there is no cycle. Traffic in the
    other direction uses a second, independent connection.
I7  ``max_record <= size - hwm``. C never goes to sleep waiting for data
    while it holds more than ``hwm`` bytes: it first copies held messages
    out and releases them (:meth:`RingConsumer.over_high_water`). So whenever
    C waits, P has room for at least one maximal record: a consumer that
    holds zero-copy views cannot stall its producer forever.
I8  Every wait in the I/O layer has a timeout, and a dead peer is noticed
    through its side channel, so nothing blocks forever.
I9  The grant slot has one writer (C, I1) and is read like the credit: P
    believes it only when its last word is ``request ^ GRANT_KEY`` for the
    request it waits on, and C writes that word last, so a torn or stale
    grant is never used. G1-G7 in ``grants.py`` keep the rendezvous
    deadlock-free: P's wait for a grant is one more P -> C edge (I6).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .codec import Encoded, align, decode_meta, decode_tensors, payload_buffer
from .errors import ProtocolError

MAGIC = 0x3152504F  # b"OPR1" little-endian
TRAILER_KEY = 0x9E3779B97F4A7C15
CREDIT_KEY = 0xC2B2AE3D27D4EB4F
GRANT_KEY = 0x165667B19E3779F9
MASK64 = (1 << 64) - 1

HEADER = struct.Struct("<IHHQQQ")
TRAILER = struct.Struct("<16xQQ")  # unused, length, seq ^ TRAILER_KEY
U64 = struct.Struct("<Q")
CREDIT = struct.Struct("<QQ")
META_LEN = struct.Struct("<I")
HANDLE_BYTES, MAX_DROPS = 48, 5
GRANT = struct.Struct(f"<QQQII{HANDLE_BYTES}s{MAX_DROPS}Q")

HEADER_BYTES = 32
TRAILER_BYTES = 32
OVERHEAD = HEADER_BYTES + TRAILER_BYTES
GRANULE = 64

CONTROL_BYTES = 64  # data region prefix (P's flags)
CREDIT_BYTES = 256  # the whole credit region
WAITING_OFFSET = 0  # in the data region: P is waiting for credit or a grant
SLEEPING_OFFSET = 64  # in the credit region: C is asleep
GRANT_OFFSET = 128  # in the credit region: the grant slot
GRANT_CHECK_OFFSET = GRANT_OFFSET + GRANT.size

PAD, MSG, START, CHUNK, REQ, PUT, DROP = 1, 2, 3, 4, 5, 6, 7
KINDS = {PAD: "PAD", MSG: "MSG", START: "START", CHUNK: "CHUNK", REQ: "REQ", PUT: "PUT", DROP: "DROP"}

_ZEROS = bytes(GRANULE + TRAILER_BYTES)
_ONE, _ZERO = U64.pack(1), U64.pack(0)


class Remote(Protocol):
    """One-sided access to the peer's region (the only way to touch it)."""

    def write(self, offset: int, parts: Sequence) -> None:
        """Write ``parts`` back to back at ``offset`` of the peer's region, in order."""

    def notify(self) -> None:
        """Ring the peer's doorbell."""


def record_bytes(length: int) -> int:
    """Bytes a record with a ``length``-byte payload occupies in the ring."""
    return align(length + OVERHEAD, GRANULE)


@dataclass(frozen=True)
class RingConfig:
    """Sizes of one connection's data ring.

    ``hwm``: bytes of held (unreleased) records above which the consumer
    copies held messages out before it waits. ``max_record``: the largest
    record, so the largest zero-copy message; ``chunk``: the payload of one
    CHUNK record when a larger message is streamed (smaller chunks let the
    producer fill one while the consumer copies another).
    """

    size: int = 32 << 20
    hwm: int = 8 << 20
    chunk: int = 4 << 20
    grant_min: int = 0  # messages of at least this many payload bytes go by rendezvous (0: never)
    grant_max: int = 0  # ... and at most this many (C's pool bound: larger ones stream)

    def __post_init__(self) -> None:
        if self.grant_min < 0 or self.grant_max < 0:
            raise ValueError("grant_min and grant_max must be >= 0")
        if self.size % GRANULE or self.size < 4 * GRANULE:
            raise ValueError(f"ring size must be a multiple of {GRANULE} and at least {4 * GRANULE}")
        if not 0 <= self.hwm < self.size:
            raise ValueError("hwm must be below the ring size")
        if not GRANULE <= self.chunk <= self.max_record - OVERHEAD:
            raise ValueError(f"chunk must be between {GRANULE} and max_record - {OVERHEAD}")

    @classmethod
    def for_size(cls, size: int) -> RingConfig:
        """The default proportions for a ring of ``size`` bytes."""
        size = size // GRANULE * GRANULE
        return cls(size=size, hwm=size // 4, chunk=max(GRANULE, size // 8 // GRANULE * GRANULE))

    @property
    def max_record(self) -> int:
        return (self.size - self.hwm) // GRANULE * GRANULE

    @property
    def data_region_bytes(self) -> int:
        return CONTROL_BYTES + self.size


class RingProducer:
    """P's half: writes records into C's data ring when the credit allows."""

    def __init__(self, config: RingConfig, remote: Remote, credit: memoryview):
        self.config = config
        self.remote = remote
        self.credit = credit
        self.write_pos = 0
        self.released = 0
        self.seq = 0
        self.waiting = False

    def refresh_credit(self) -> int:
        """Re-read the released position C last wrote; ignore a torn write."""
        pos, check = CREDIT.unpack_from(self.credit, 0)
        if check == pos ^ CREDIT_KEY and self.released < pos <= self.write_pos:
            self.released = pos
        return self.released

    def free(self) -> int:
        return self.config.size - (self.write_pos - self.released)

    def space_needed(self, length: int) -> int:
        """Free bytes the next step of writing a ``length``-byte record needs: its PAD or itself."""
        total = record_bytes(length)
        tail = self.config.size - self.write_pos % self.config.size
        return tail if tail < total else total

    def try_write(self, kind: int, parts: Sequence, length: int, aux: int = 0) -> bool:
        """Write one record if there is room now; False means wait for credit."""
        total = record_bytes(length)
        if total > self.config.max_record:
            raise ValueError(f"record of {total} bytes exceeds max_record {self.config.max_record}")
        tail = self.config.size - self.write_pos % self.config.size
        if tail < total:
            # Pad to the end as soon as the pad fits; the record itself may
            # then have to wait until C has consumed the pad (I3, I7).
            if not self._room(tail):
                return False
            self._put(PAD, (), tail - OVERHEAD, 0, tail)
        if not self._room(total):
            return False
        self._put(kind, parts, length, aux, total)
        return True

    def _room(self, n: int) -> bool:
        if n > self.free():
            self.refresh_credit()
        return n <= self.free()

    def _put(self, kind: int, parts: Sequence, length: int, aux: int, total: int) -> None:
        off = CONTROL_BYTES + self.write_pos % self.config.size
        header = HEADER.pack(MAGIC, kind, 0, self.seq, length, aux)
        trailer = TRAILER.pack(length, self.seq ^ TRAILER_KEY)
        gap = total - OVERHEAD - length
        if kind == PAD:
            # The payload of a PAD is never read: write its header, then its trailer.
            self.remote.write(off, (header,))
            self.remote.write(off + total - TRAILER_BYTES, (trailer,))
        else:
            # One gather write, front to back: the trailer is the last thing to land (I4).
            self.remote.write(off, (header, *parts, memoryview(_ZEROS)[: gap], trailer))
        self.write_pos += total
        self.seq += 1

    def consumer_sleeping(self) -> bool:
        return self.credit[SLEEPING_OFFSET : SLEEPING_OFFSET + 8] != _ZERO

    def set_waiting(self, waiting: bool) -> None:
        """Tell C (in its memory) whether P waits for credit, so C rings P's doorbell."""
        if waiting != self.waiting:
            self.waiting = waiting
            self.remote.write(WAITING_OFFSET, (_ONE if waiting else _ZERO,))

    def by_rendezvous(self, nbytes: int) -> bool:
        """Whether a payload of ``nbytes`` asks C for a region instead of entering the ring."""
        return 0 < self.config.grant_min <= nbytes <= self.config.grant_max

    @staticmethod
    def request(req: int, nbytes: int) -> tuple[int, tuple, int, int]:
        """The REQ record asking for a region of ``nbytes``."""
        return REQ, (U64.pack(req),), U64.size, nbytes

    @staticmethod
    def put(req: int, message: Encoded) -> tuple[int, tuple, int, int]:
        """The PUT record: ``message``'s payload is in the region of grant ``req``."""
        head = _head(message)
        return PUT, (head,), len(head), req

    @staticmethod
    def drop(req: int) -> tuple[int, tuple, int, int]:
        """The DROP record: grant ``req`` goes back unused."""
        return DROP, (), 0, req

    def grant(self, req: int) -> GrantSlot | None:
        """C's answer to request ``req``, once its slot holds it whole (I9); None before."""
        (check,) = U64.unpack_from(self.credit, GRANT_CHECK_OFFSET)
        if check != req ^ GRANT_KEY:
            return None
        got, region, length, hlen, ndrops, handle, *drops = GRANT.unpack_from(self.credit, GRANT_OFFSET)
        if got != req or hlen > HANDLE_BYTES or ndrops > MAX_DROPS:
            return None
        return GrantSlot(req, region, length, handle[:hlen], tuple(drops[:ndrops]))

    def records(self, message: Encoded) -> Iterator[tuple[int, tuple, int, int]]:
        """The records of one message: a MSG, or START then CHUNKs when it is too big."""
        head = _head(message)
        length = len(head) + message.nbytes
        if record_bytes(length) <= self.config.max_record:
            yield MSG, (head, *message.parts), length, 0
            return
        yield START, (head,), len(head), message.nbytes
        step = self.config.chunk
        for start in range(0, message.nbytes, step):
            end = min(start + step, message.nbytes)
            yield CHUNK, tuple(slice_parts(message.parts, start, end)), end - start, 0


def _head(message: Encoded) -> bytes:
    head = META_LEN.pack(len(message.meta)) + message.meta
    return head + bytes(align(len(head)) - len(head))


@dataclass(frozen=True)
class GrantSlot:
    """C's answer to one request: a region (``length`` 0: denied, stream it) and regions gone."""

    req: int
    region: int
    length: int
    handle: bytes  # how P reaches the region (the medium's business)
    drops: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.handle) > HANDLE_BYTES or len(self.drops) > MAX_DROPS:
            raise ValueError("grant handle or drop list too long")


def slice_parts(parts: Sequence[memoryview], start: int, end: int) -> Iterator[memoryview]:
    """The bytes [start, end) of ``parts`` laid end to end, as views."""
    pos = 0
    for p in parts:
        n = p.nbytes
        if pos + n > start and pos < end:
            yield p[max(start - pos, 0) : min(end - pos, n)]
        pos += n
        if pos >= end:
            return


@dataclass
class Record:
    kind: int
    seq: int
    start: int
    end: int
    payload: memoryview
    aux: int


class RingConsumer:
    """C's half: finds complete records in its own ring and returns credit."""

    def __init__(self, config: RingConfig, ring: memoryview, remote: Remote):
        self.config = config
        self.ring = ring  # the whole data region, control words included
        self.remote = remote
        self.read_pos = 0
        self.released = 0
        self.seq = 0
        self.sleeping = False
        self._pending: dict[int, int] = {}  # released out of order: start -> end

    def poll(self, until: Collection[int] = ()) -> Record | None:
        """The next complete record, or None if the producer has not finished one, or if
        its kind is in ``until`` (then it stays for a later poll).

        PAD records are consumed and released here, never returned.
        """
        size = self.config.size
        while True:
            off = self.read_pos % size
            base = CONTROL_BYTES + off
            magic, kind, _flags, seq, length, aux = HEADER.unpack_from(self.ring, base)
            if magic != MAGIC or seq != self.seq:
                return None
            total = record_bytes(length)
            if off + total > size:
                return None  # a header still landing can show a stale length (I4)
            tlen, tseq = TRAILER.unpack_from(self.ring, base + total - TRAILER_BYTES)
            if tseq != seq ^ TRAILER_KEY or tlen != length:
                return None
            if kind not in KINDS:
                raise ProtocolError(f"record {seq} has unknown kind {kind}")
            if kind in until:
                return None
            start = self.read_pos
            self.read_pos += total
            self.seq += 1
            if kind == PAD:
                self.release(start, self.read_pos)
                continue
            payload = self.ring[base + HEADER_BYTES : base + HEADER_BYTES + length]
            return Record(kind, seq, start, self.read_pos, payload, aux)

    def release(self, start: int, end: int) -> bool:
        """Mark [start, end) free; advance the credit over the contiguous prefix.

        Returns True when the credit moved (and was written to P).
        """
        if start != self.released:
            self._pending[start] = end
            return False
        self.released = end
        while self.released in self._pending:
            self.released = self._pending.pop(self.released)
        self.remote.write(0, (CREDIT.pack(self.released, self.released ^ CREDIT_KEY),))
        if self.ring[WAITING_OFFSET : WAITING_OFFSET + 8] != _ZERO:
            self.remote.notify()
        return True

    @property
    def held(self) -> int:
        """Bytes read but not yet given back."""
        return self.read_pos - self.released

    def over_high_water(self) -> bool:
        """True when C must copy held messages out before it may wait (I7)."""
        return self.held > self.config.hwm

    def grant(self, slot: GrantSlot) -> None:
        """Answer a request in P's grant slot: the body, then its check word (I9); ring P if it waits."""
        body = GRANT.pack(slot.req, slot.region, slot.length, len(slot.handle), len(slot.drops), slot.handle,
                          *slot.drops, *(0,) * (MAX_DROPS - len(slot.drops)))
        self.remote.write(GRANT_OFFSET, (body,))
        self.remote.write(GRANT_CHECK_OFFSET, (U64.pack(slot.req ^ GRANT_KEY),))
        if self.ring[WAITING_OFFSET : WAITING_OFFSET + 8] != _ZERO:
            self.remote.notify()

    def set_sleeping(self, sleeping: bool) -> None:
        """Tell P (in its memory) whether to ring C's doorbell after writing."""
        if sleeping != self.sleeping:
            self.sleeping = sleeping
            self.remote.write(SLEEPING_OFFSET, (_ONE if sleeping else _ZERO,))


@dataclass
class Assembled:
    """A complete message: header, tensors, and the records that back them."""

    meta: dict
    tensors: dict[str, torch.Tensor]
    record: Record | None  # the MSG record the tensors view; None when they own their memory
    grant: int | None = None  # the request whose granted region the tensors view (a PUT)


@dataclass(frozen=True)
class Requested:
    """P asks for a region of ``nbytes`` (a REQ); C answers with :meth:`RingConsumer.grant`."""

    req: int
    nbytes: int


@dataclass(frozen=True)
class Dropped:
    """P gave grant ``req`` back unused (a DROP)."""

    req: int


@dataclass
class Assembler:
    """Turns a connection's records back into messages (C's side, no I/O).

    A MSG record becomes a message whose tensors view the ring. A streamed
    message is copied chunk by chunk into memory of its own, and each chunk
    is released as soon as it is copied, so a message larger than the ring
    passes through it. REQ and DROP come out as :class:`Requested` and
    :class:`Dropped` for the grant pool; a PUT becomes a message whose
    tensors view the region granted to it (``granted``: request -> region,
    filled by whoever answers the requests).
    """

    consumer: RingConsumer
    granted: dict[int, memoryview] = field(default_factory=dict)
    requested: dict[int, int] = field(default_factory=dict)  # request -> bytes, until its PUT or DROP
    _meta: dict | None = None
    _buffer: bytearray | mmap.mmap | None = None
    _filled: int = 0
    _expected: int = 0
    received: int = field(default=0)

    @property
    def partial(self) -> tuple[int, int] | None:
        """(bytes received, bytes expected) of a streamed message under way."""
        return (self._filled, self._expected) if self._meta is not None else None

    def feed(self, rec: Record) -> Assembled | Requested | Dropped | None:
        if rec.kind in (REQ, PUT, DROP):
            if self._meta is not None:
                raise ProtocolError(f"record {rec.seq}: {KINDS[rec.kind]} inside a streamed message")
            return self._rendezvous(rec)
        if rec.kind == MSG:
            if self._meta is not None:
                raise ProtocolError(f"record {rec.seq}: MSG inside a streamed message")
            meta, data = _split_head(rec.payload)
            tensors = decode_tensors(meta, data)
            self.received += rec.payload.nbytes
            return Assembled(meta, tensors, rec)
        if rec.kind == START:
            if self._meta is not None:
                raise ProtocolError(f"record {rec.seq}: START inside a streamed message")
            meta, _ = _split_head(rec.payload, expect_payload=False)
            if meta["n"] != rec.aux:
                raise ProtocolError(f"record {rec.seq}: START announces {rec.aux} bytes, meta {meta['n']}")
            self.consumer.release(rec.start, rec.end)
            self._meta, self._expected, self._filled = meta, rec.aux, 0
            self._buffer = payload_buffer(rec.aux)
            return self._finish_if_complete()
        if rec.kind == CHUNK:
            if self._meta is None:
                raise ProtocolError(f"record {rec.seq}: CHUNK outside a streamed message")
            n = rec.payload.nbytes
            if self._filled + n > self._expected:
                raise ProtocolError(f"record {rec.seq}: CHUNK overruns the message")
            memoryview(self._buffer)[self._filled : self._filled + n] = rec.payload
            self.consumer.release(rec.start, rec.end)
            self._filled += n
            self.received += n
            return self._finish_if_complete()
        raise ProtocolError(f"record {rec.seq}: unexpected kind {rec.kind}")

    def _rendezvous(self, rec: Record) -> Assembled | Requested | Dropped:
        if rec.kind == REQ:
            if rec.payload.nbytes != U64.size:
                raise ProtocolError(f"record {rec.seq}: REQ of {rec.payload.nbytes} bytes")
            (req,) = U64.unpack_from(rec.payload, 0)
            self.consumer.release(rec.start, rec.end)
            self.requested[req] = rec.aux
            return Requested(req, rec.aux)
        if rec.kind == DROP:
            self.consumer.release(rec.start, rec.end)
            self.granted.pop(rec.aux, None)
            self.requested.pop(rec.aux, None)
            return Dropped(rec.aux)
        region = self.granted.get(rec.aux)
        if region is None:
            raise ProtocolError(f"record {rec.seq}: PUT for request {rec.aux}, which holds no grant")
        meta, _ = _split_head(rec.payload, expect_payload=False)
        if meta["n"] > region.nbytes:
            raise ProtocolError(f"record {rec.seq}: PUT of {meta['n']} bytes into a grant of {region.nbytes}")
        self.consumer.release(rec.start, rec.end)
        del self.granted[rec.aux]
        self.requested.pop(rec.aux, None)
        self.received += meta["n"]
        return Assembled(meta, decode_tensors(meta, region), None, grant=rec.aux)

    def _finish_if_complete(self) -> Assembled | None:
        if self._filled < self._expected:
            return None
        meta, buf = self._meta, self._buffer
        self._meta, self._buffer = None, None
        return Assembled(meta, decode_tensors(meta, buf), None)


def _split_head(payload: memoryview, expect_payload: bool = True) -> tuple[dict, memoryview]:
    if payload.nbytes < META_LEN.size:
        raise ProtocolError("record too short for a meta block")
    (n,) = META_LEN.unpack_from(payload, 0)
    if META_LEN.size + n > payload.nbytes:
        raise ProtocolError(f"meta length {n} overruns the record")
    meta = decode_meta(payload[META_LEN.size : META_LEN.size + n])
    data = payload[align(META_LEN.size + n) :]
    if expect_payload and data.nbytes < meta["n"]:
        raise ProtocolError(f"record holds {data.nbytes} payload bytes, meta says {meta['n']}")
    return meta, data
