"""``auto``: one endpoint over every medium this host has, the best one picked per peer.

:meth:`AutoTransport.open` opens each medium that is available here (``rdma``
only if it opens without TransportUnavailable, ``shm``, and ``tcp`` always)
and publishes them all::

    {"transport": "auto", "id", "host_id", "shm_ns", "media": {"shm": {...}, "tcp": {...}, "rdma": {...}}}

:meth:`connect` ranks the media the two ends have in common (see
:func:`choose`) and tries them best first:

1. ``shm`` when both ends are on one host and share /dev/shm: a memcpy is
   the physical limit there, and an RDMA loopback would cross PCIe twice
   and take NIC bandwidth from the other hosts' traffic;
2. ``rdma`` when both ends have an active RDMA port on a shared fabric
   (same link layer, same InfiniBand subnet, same ``fabric`` label if both
   set one; RoCE reachability cannot be seen in a descriptor, so the rdma
   medium proves the path with one RDMA WRITE before it returns a sender);
3. ``tcp`` otherwise.

A peer that publishes a plain single-medium descriptor is accepted too. The
choice is logged once per peer at INFO with its reason and counted in
``stats()["auto_choices"]``; a preferred medium that fails at connect is
logged at WARNING, counted in ``stats()["auto_fallbacks"]``, and the next
one is tried: nothing falls back silently. :meth:`recv` waits on every
medium at once and serves them in turn.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from onepiece.credentials import Credential

from .base import Message, Sender, Transport, transport_class
from .errors import ProtocolError, Refused, TransportClosed, TransportError, TransportTimeout, TransportUnavailable
from .grants import GrantPool
from .host import host_id, shm_namespace
from .rdma import PortInfo, fabric_mismatch  # plain data: importing it does not import pyverbs
from .ringtransport import GRANT_BYTES

log = logging.getLogger(__name__)

MEDIA = ("shm", "rdma", "tcp")  # best first
COUNTERS = ("bytes_sent", "bytes_received", "messages_sent", "messages_received", "connections_refused")


def _split(descriptor: Mapping) -> tuple[Any, Any, dict]:
    """(host_id, shm_ns, {medium: descriptor}) of an auto or a single-medium descriptor."""
    if descriptor.get("transport") == "auto":
        media = dict(descriptor.get("media") or {})
    else:
        media = {descriptor.get("transport"): descriptor}
    shm = media.get("shm") or {}
    return descriptor.get("host_id"), descriptor.get("shm_ns", shm.get("shm_ns")), media


def _rdma_reach(mine: Mapping, theirs: Mapping) -> str | None:
    """Why two rdma descriptors are on different fabrics, or None when they look shared."""
    a, b = mine.get("rdma") or {}, theirs.get("rdma") or {}
    if a.get("fabric") and b.get("fabric") and a["fabric"] != b["fabric"]:
        return f"RDMA fabrics differ ({a['fabric']} vs {b['fabric']})"
    try:
        return fabric_mismatch(PortInfo.from_dict(a), PortInfo.from_dict(b))
    except TransportError as exc:
        return f"unreadable RDMA port description ({exc})"


def choose(local: Mapping, peer: Mapping) -> tuple[list[tuple[str, str]], list[str]]:
    """The media to try for ``peer``, best first, each with why; and why the others are out."""
    here, ns, mine = _split(local)
    there, their_ns, theirs = _split(peer)
    picks, notes = [], []
    same_host = here is not None and here == there
    if "shm" not in mine:
        notes.append("no shared memory here")
    elif "shm" not in theirs:
        notes.append("peer offers no shm")
    elif not same_host:
        notes.append("different host")
    elif ns != their_ns:
        notes.append("same host but a different /dev/shm")
    else:
        picks.append(("shm", "same host, shared /dev/shm"))
    if "rdma" not in mine:
        notes.append("no RDMA port here")
    elif "rdma" not in theirs:
        notes.append("peer has no RDMA port")
    elif why := _rdma_reach(mine["rdma"], theirs["rdma"]):
        notes.append(why)
    else:
        port = mine["rdma"].get("rdma", {})
        picks.append(("rdma", f"both ends have an active RDMA port ({port.get('link_layer', '?')})"))
    if "tcp" in mine and "tcp" in theirs:
        picks.append(("tcp", "no faster medium in common" if not picks else "fallback"))
    elif "tcp" not in theirs:
        notes.append("peer offers no tcp")
    return picks, notes


class AutoTransport(Transport):
    """Every available medium behind one endpoint; the best one per peer."""

    name = "auto"

    def __init__(self, media: dict[str, Transport]):
        self.id = uuid.uuid4().hex
        self._media = media
        self._receiving: dict[str, asyncio.Task] = {}
        self._rr = 0
        self._closed = False
        self._choices: collections.Counter[str] = collections.Counter()
        self._fallbacks: collections.Counter[str] = collections.Counter()
        self._logged: dict[str, str] = {}

    @classmethod
    async def open(cls, *, host: str = "127.0.0.1", advertise_host: str | None = None,
                   ring_bytes: int | None = None, grant_bytes: int = GRANT_BYTES,
                   send_timeout: float = 30.0, max_message_bytes: int = 2 << 30,
                   media: tuple[str, ...] = MEDIA, shm: dict | None = None, rdma: dict | None = None,
                   tcp: dict | None = None) -> AutoTransport:
        """Open every medium in ``media`` that is available here (``tcp`` must open).

        Common options go to each medium; ``shm``, ``rdma`` and ``tcp`` are
        per-medium options on top (for rdma: device, port, gid_index, ...).
        shm and rdma draw their granted regions from one pool of ``grant_bytes``.
        """
        common = {"host": host, "advertise_host": advertise_host, "send_timeout": send_timeout,
                  "max_message_bytes": max_message_bytes}
        ring = {"ring_bytes": ring_bytes} if ring_bytes is not None else {}
        ring["grant_pool"] = GrantPool(grant_bytes)
        options = {"shm": {**common, **ring, **(shm or {})}, "rdma": {**common, **ring, **(rdma or {})},
                   "tcp": {**common, **(tcp or {})}}
        opened: dict[str, Transport] = {}
        unavailable: dict[str, str] = {}
        try:
            for name in MEDIA:
                if name not in media:
                    continue
                try:
                    opened[name] = await transport_class(name).open(**options[name])
                except Exception as exc:
                    if name == "tcp":
                        raise
                    if not isinstance(exc, TransportUnavailable):
                        log.warning("auto: %s failed to open (%r); going on without it", name, exc)
                    unavailable[name] = str(exc)
        except BaseException:
            for transport in opened.values():
                await transport.aclose()
            raise
        if not opened:
            raise TransportUnavailable(f"auto: no medium opened (media={media!r})")
        self = cls(opened)
        log.info("auto endpoint %s: media %s%s", self.id[:8], ", ".join(opened),
                 "".join(f"; {name} unavailable: {why}" for name, why in unavailable.items()))
        return self

    @property
    def descriptor(self) -> dict:
        return {"transport": "auto", "id": self.id, "host_id": host_id(),
                "shm_ns": shm_namespace() if "shm" in self._media else "",
                "media": {name: medium.descriptor for name, medium in self._media.items()}}

    def stats(self) -> dict:
        out = dict.fromkeys(COUNTERS, 0)
        for medium in self._media.values():
            for key, value in medium.stats().items():
                if key in out:
                    out[key] += value
        out["auto_choices"] = dict(self._choices)
        out["auto_fallbacks"] = dict(self._fallbacks)
        return out

    def guard(self, key: bytes | None) -> None:
        super().guard(key)
        for medium in self._media.values():
            medium.guard(key)

    async def connect(self, descriptor: Mapping[str, Any], *, timeout: float | None = None,
                      credential: Credential | None = None) -> Sender:
        if self._closed:
            raise TransportClosed("auto endpoint is closed")
        peer = str(descriptor.get("id", "?"))
        picks, notes = choose(self.descriptor, descriptor)
        if not picks:
            raise TransportError(f"auto: no medium in common with peer {peer}: {'; '.join(notes)}")
        theirs = _split(descriptor)[2]
        failed: list[str] = []
        last: TransportError | None = None
        for i, (name, why) in enumerate(picks):
            try:
                sender = await self._media[name].connect(theirs[name], timeout=timeout, credential=credential)
            except (TransportClosed, Refused):  # another medium would be refused the same way
                raise
            except (TransportError, LookupError, TypeError, ValueError) as exc:
                if not isinstance(exc, TransportError):
                    exc = ProtocolError(f"bad {name} descriptor from peer {peer}: {exc!r}")
                after = f"; trying {picks[i + 1][0]}" if i + 1 < len(picks) else ""
                log.warning("auto: peer %s: %s failed at connect (%s)%s", peer[:8], name, exc, after)
                self._fallbacks[name] += 1
                failed.append(f"{name} failed: {exc}")
                last = exc
                continue
            self._choices[name] += 1
            if self._logged.get(peer) != name:
                self._logged[peer] = name
                log.info("auto: peer %s -> %s (%s)", peer[:8], name, "; ".join([why, *failed, *notes]))
            return sender
        raise type(last)(f"auto: no medium reached peer {peer}: {'; '.join(failed)}") from last

    async def recv(self, *, timeout: float | None = None) -> Message:
        if self._closed:
            raise TransportClosed("auto endpoint is closed")
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                while True:
                    if self._closed:
                        raise TransportClosed("auto endpoint is closed")
                    if (task := self._next_done()) is not None:
                        break
                    for name, medium in self._media.items():
                        if name not in self._receiving:
                            self._receiving[name] = asyncio.create_task(medium.recv(), name=f"auto-recv-{name}")
                    # Not wait_for: the per-medium receives outlive a cancelled or timed-out
                    # call, so a message that arrives meanwhile is kept for the next one.
                    await asyncio.wait(self._receiving.values(), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError as exc:
            if deadline.expired():
                raise TransportTimeout(f"no message within {timeout} s") from exc
            raise
        return task.result()

    def _next_done(self) -> asyncio.Task | None:
        """A finished per-medium receive, taking the media in turn (fairness)."""
        names = list(self._media)
        for i in range(len(names)):
            name = names[(self._rr + i) % len(names)]
            task = self._receiving.get(name)
            if task is not None and task.done():
                del self._receiving[name]
                self._rr = (self._rr + i + 1) % len(names)
                return task
        return None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = list(self._receiving.values())
        self._receiving.clear()
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Message):
                result.release()
        for medium in self._media.values():
            await medium.aclose()

