"""Rendezvous grants: a consumer's bounded pool of destination regions (no I/O).

A message too large for the ring's zero-copy records (``RingConfig.grant_min``
and up) travels by rendezvous instead of streaming: the producer writes a
REQ record naming its size, the consumer *grants* a region of its own memory
(a slot write into the producer's credit region, see ``ring.py``), the
producer copies the payload once, straight from its tensors into that region,
and writes a PUT record with the message's meta. The consumer's tensors view
the region; releasing the message gives the region back to the pool. This
module decides which region answers which request; ``ringtransport.py``
makes, maps and writes them.

Invariants (they extend the ring's I1-I8)
-----------------------------------------
G1  A region belongs to one connection for its whole life: it is granted
    only to that connection's producer, so a producer can never write into
    memory that backs another producer's message.
G2  The bytes of all regions that exist are at most ``limit`` (the pool's
    bound, per endpoint). A region that would break it is not made: the
    request waits, or is denied if it could never fit.
G3  A region is FREE (the connection may get it again), GRANTED (its
    producer may write it), or HELD (a PUT arrived: a received message views
    it). FREE -> GRANTED on a request, GRANTED -> HELD on the PUT, GRANTED ->
    FREE on a DROP, HELD -> FREE on release; a region whose connection is
    gone is destroyed instead of freed, at once unless HELD (a message still
    views it: then on its release).
G4  Grants are consumer-initiated and answer requests one to one, in order:
    the producer writes REQ k+1 only after it has read grant k, so the
    consumer never overwrites a grant its producer has not read (one grant
    slot per connection suffices).
G5  Nothing waits in a cycle. The producer waits for a grant (P -> C, as for
    credit, I6); the consumer never waits for the producer to get memory
    back. GRANTED regions come back without the consumer doing anything (the
    producer PUTs or DROPs, or its connection ends). HELD regions come back
    when the application releases them; so before the consumer sleeps while a
    request is blocked only by HELD regions, it copies those messages out,
    oldest first (:meth:`GrantPool.evictable`), as I7 does for the ring.
G6  A request that could never fit (its rounded size exceeds ``limit``) is
    denied at once with a zero-length grant, and the producer streams that
    message through the ring instead, so a large message never waits for
    memory that cannot exist.
G7  Requests are served first come, first served; a region is only destroyed
    (least recently used first) when that makes a waiting request fit, so
    pooled regions are reused, pre-faulted, whenever sizes repeat.
"""

from __future__ import annotations

import collections
import enum
import itertools
from dataclasses import dataclass

from .errors import ProtocolError

#: Regions are made in multiples of this (a huge page), so nearby sizes share a region.
REGION_GRANULE = 2 << 20
#: Requests one connection may have open (waiting or granted, not yet PUT or DROPped): a
#: producer sends one at a time, plus the output tensors it has allocated; more is a liar
#: trying to hold the pool, and ends its connection.
MAX_OPEN = 64


class State(enum.Enum):
    FREE = "free"
    GRANTED = "granted"
    HELD = "held"


@dataclass
class Region:
    id: int
    conn: object
    size: int
    state: State = State.FREE
    used: int = 0  # tick of the last grant (least recently used first)
    req: int | None = None  # the request it answers while GRANTED or HELD
    orphan: bool = False  # its connection is gone: destroy on release


@dataclass(frozen=True)
class Grant:
    """Answer request ``req`` of ``conn`` with region ``region`` (``size`` bytes); ``new``: make it first."""

    conn: object
    req: int
    region: int
    size: int
    new: bool


@dataclass(frozen=True)
class Deny:
    """Answer request ``req`` of ``conn`` with a zero-length grant: stream the message instead (G6)."""

    conn: object
    req: int


@dataclass(frozen=True)
class Destroy:
    """Unmap / deregister region ``region`` of ``conn`` (its producer is told at its next grant)."""

    conn: object
    region: int


Action = Grant | Deny | Destroy


def rounded(nbytes: int, granule: int = REGION_GRANULE) -> int:
    return max(granule, -(-nbytes // granule) * granule)


class GrantPool:
    """The consumer's regions for rendezvous, at most ``limit`` bytes (G2), in multiples of ``granule``."""

    def __init__(self, limit: int, granule: int = REGION_GRANULE):
        if limit < 0 or granule <= 0:
            raise ValueError("grant pool limit must be >= 0 and its granule > 0")
        self.limit, self.granule = limit, granule
        self.regions: dict[int, Region] = {}
        self.pending: collections.deque[tuple[object, int, int]] = collections.deque()  # (conn, req, nbytes)
        self._ids = itertools.count(1)
        self._tick = itertools.count(1)
        self._answering: dict[tuple[object, int], int] = {}  # (conn, req) -> region, GRANTED or HELD

    # -- figures ---------------------------------------------------------------
    @property
    def total(self) -> int:
        """Bytes of the regions that exist."""
        return sum(r.size for r in self.regions.values())

    def open(self, conn) -> int:
        """Requests of ``conn`` waiting or granted (not yet PUT or DROPped)."""
        return sum(1 for c, _, _ in self.pending if c is conn) + sum(
            1 for r in self.regions.values() if r.conn is conn and r.state is State.GRANTED)

    def bytes_in(self, state: State) -> int:
        return sum(r.size for r in self.regions.values() if r.state is state)

    # -- events ----------------------------------------------------------------
    def request(self, conn, req: int, nbytes: int) -> list[Action]:
        """A REQ arrived: queue it and serve what can be served now."""
        if nbytes <= 0:
            raise ProtocolError(f"request {req} for {nbytes} bytes")
        if (conn, req) in self._answering or any(c is conn and r == req for c, r, _ in self.pending):
            raise ProtocolError(f"request {req} repeats")
        if self.open(conn) >= MAX_OPEN:
            raise ProtocolError(f"more than {MAX_OPEN} requests open on one connection")
        self.pending.append((conn, req, nbytes))
        return self._serve()

    def put(self, conn, req: int) -> Region:
        """The PUT of request ``req`` arrived: its region becomes HELD."""
        region = self._granted(conn, req)
        region.state = State.HELD
        return region

    def drop(self, conn, req: int) -> list[Action]:
        """The producer gave grant ``req`` back unused."""
        region = self._granted(conn, req)
        del self._answering[(conn, req)]
        region.state, region.req = State.FREE, None
        return self._serve()

    def release(self, region_id: int) -> list[Action]:
        """The message viewing a HELD region was released (or copied out)."""
        region = self.regions.get(region_id)
        if region is None or region.state is not State.HELD:
            return []
        self._answering.pop((region.conn, region.req), None)
        if region.orphan:
            del self.regions[region_id]
            return [Destroy(region.conn, region_id), *self._serve()]
        region.state, region.req = State.FREE, None
        return self._serve()

    def close(self, conn) -> list[Action]:
        """``conn`` is gone: its requests are forgotten, its regions destroyed (HELD ones on release)."""
        self.pending = collections.deque(p for p in self.pending if p[0] is not conn)
        actions: list[Action] = []
        for region in [r for r in self.regions.values() if r.conn is conn]:
            if region.state is State.HELD:
                region.orphan = True
                continue
            self._answering.pop((conn, region.req), None)
            del self.regions[region.id]
            actions.append(Destroy(conn, region.id))
        return actions + self._serve()

    def forget(self, region_id: int) -> list[Action]:
        """A region could not be made (the medium failed): it never existed; its request is denied."""
        region = self.regions.pop(region_id, None)
        if region is None:
            return []
        self._answering.pop((region.conn, region.req), None)
        return [Deny(region.conn, region.req), *self._serve()]

    def evictable(self) -> int:
        """Bytes of HELD regions that must be copied out before the first waiting request fits
        (0: nothing blocks it, or only GRANTED regions do, which come back by themselves: G5)."""
        if not self.pending:
            return 0
        need = rounded(self.pending[0][2], self.granule)
        reachable = self.limit - self.total + self.bytes_in(State.FREE)
        if reachable >= need:
            return 0
        return min(need - reachable, self.bytes_in(State.HELD))

    # -- the one decision --------------------------------------------------------
    def _granted(self, conn, req: int) -> Region:
        region_id = self._answering.get((conn, req))
        region = self.regions.get(region_id) if region_id is not None else None
        if region is None or region.state is not State.GRANTED:
            raise ProtocolError(f"no open grant for request {req}")
        return region

    def _serve(self) -> list[Action]:
        actions: list[Action] = []
        while self.pending:
            conn, req, nbytes = self.pending[0]
            size = rounded(nbytes, self.granule)
            if size > self.limit:
                self.pending.popleft()
                actions.append(Deny(conn, req))
                continue
            reuse = min((r for r in self.regions.values()
                         if r.conn is conn and r.state is State.FREE and nbytes <= r.size <= 2 * size),
                        key=lambda r: r.size, default=None)
            if reuse is None:
                if self.limit - self.total + self.bytes_in(State.FREE) < size:
                    break  # waits for a release, a PUT's release or a DROP (G5, G7)
                for victim in sorted((r for r in self.regions.values() if r.state is State.FREE),
                                     key=lambda r: r.used):
                    if self.limit - self.total >= size:
                        break
                    del self.regions[victim.id]
                    actions.append(Destroy(victim.conn, victim.id))
                reuse = Region(next(self._ids), conn, size)
                self.regions[reuse.id] = reuse
                new = True
            else:
                new = False
            self.pending.popleft()
            reuse.state, reuse.req, reuse.used = State.GRANTED, req, next(self._tick)
            self._answering[(conn, req)] = reuse.id
            actions.append(Grant(conn, req, reuse.id, reuse.size, new))
        return actions
