"""A ZeroMQ control socket on the asyncio loop: batched sends, edge-safe receives.

The broker's ROUTER and every worker's DEALER run on this. It exists for
the cost of a message, which on a 2-core machine is the control plane's
capacity:

* Sends are queued and leave once per event-loop turn, everything for one
  peer joined in one frame (``protocol.frames``): a broker that handles 200
  messages in a turn sends a handful of frames, not 200, and each worker
  wakes once for the lot instead of once per message.
* A message nobody waits on (``urgent=False``: RELEASE, PROGRESS,
  HEARTBEAT) does not cause a send of its own: it leaves with the next
  urgent message to the same peer, or ``LAZY_S`` later. Order per peer is
  kept either way. At moderate load this saves a wake-up of both ends.
* Receives run from ``loop.add_reader`` on the socket's ZMQ_FD with plain
  non-blocking ``recv`` calls, in batches of at most ``batch`` messages (a
  frame's messages past that wait for the next batch); after each
  batch ``on_batch`` runs (the broker commits its store there) and then the
  queued sends leave. So nothing a batch caused is sent before ``on_batch``
  returns: a client hears its job id only once the job is durable.

ZMQ_FD is edge-triggered and shared by sends and receives: a send (or any
call that makes libzmq process its command mailbox) can consume the edge
that announced waiting messages, which then sit unread until an unrelated
edge comes: a deaf peer. So after every flush, and after a batch that
stopped at its limit, the socket's EVENTS are read and another read is
scheduled if messages wait.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

import zmq

from . import protocol

log = logging.getLogger("onepiece.control")

_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
LAZY_S = 0.02  # the longest a non-urgent message waits for company


class ControlSocket:
    """A ROUTER (``routed=True``: every message has a peer id) or DEALER socket driven by the loop.

    ``on_message(peer, message)`` gets each valid message (``peer`` is None on a DEALER);
    ``on_bad(peer, reason)`` each refused frame or message; ``on_batch()`` runs after each
    batch of received frames, before the sends that batch queued.
    """

    def __init__(self, sock: zmq.Socket, *, routed: bool,
                 on_message: Callable[[bytes | None, dict], None],
                 on_bad: Callable[[bytes | None, str], None],
                 on_batch: Callable[[], None] | None = None, batch: int = 256):
        self.sock = sock
        self.routed = routed
        self._on_message, self._on_bad, self._on_batch = on_message, on_bad, on_batch
        self.batch = batch
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._out: dict[bytes | None, list[bytes]] = {}
        self._urgent: set[bytes | None] = set()  # peers with a message that must leave this turn
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._pending: collections.deque[tuple[bytes | None, dict]] = collections.deque()  # received, unhandled
        self._flush_due = False
        self._read_due = False
        self._reading = False
        self.closed = False
        self._loop.add_reader(self._fd, self._readable)
        self._schedule_read()  # messages may have come before the reader was there

    # -- sending -----------------------------------------------------------------
    def send(self, body: bytes, peer: bytes | None = None, *, urgent: bool = True) -> None:
        """Queue one packed message (``protocol.pack``). It leaves at the end of this loop turn,
        or, if not ``urgent``, with the peer's next urgent message or ``LAZY_S`` from now."""
        if self.closed:
            return
        self._out.setdefault(peer, []).append(body)
        if urgent:
            self._urgent.add(peer)
            if not self._flush_due and not self._reading:
                self._flush_due = True
                self._loop.call_soon(self.flush)
        elif self._lazy_timer is None:
            self._lazy_timer = self._loop.call_later(LAZY_S, self.flush, True)

    def flush(self, everything: bool = False) -> None:
        """Send what is queued for peers with an urgent message (``everything``: for all peers),
        one frame per peer (or a few for large batches)."""
        self._flush_due = False
        if everything:
            self._lazy_timer = None
        if self.closed or not (self._urgent or everything and self._out):
            return
        sock, out = self.sock, self._out
        for peer in list(out) if everything else self._urgent:
            for frame in protocol.frames(out.pop(peer, ())):
                try:
                    if peer is not None:
                        sock.send(peer, _SNDMORE | _NOBLOCK)
                    sock.send(frame, _NOBLOCK)
                except zmq.ZMQError as exc:
                    log.warning("control message to %r not sent: %s", peer, exc)
        self._urgent.clear()
        if not out and self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self.waiting()  # the fd may show nothing while messages wait (the edge was consumed)

    # -- receiving ---------------------------------------------------------------
    def _schedule_read(self) -> None:
        if not self._read_due:
            self._read_due = True
            self._loop.call_soon(self._readable)

    def waiting(self) -> bool:
        """Whether messages wait unread; if so a read is scheduled (the check may consume the edge)."""
        if not self.closed and self.sock.getsockopt(_EVENTS) & _POLLIN:
            self._schedule_read()
            return True
        return False

    def _readable(self) -> None:
        self._read_due = False
        if self.closed:
            return
        sock, pending = self.sock, self._pending
        self._reading = True
        try:
            budget = self.batch  # messages, not frames: one frame may hold thousands
            while budget:
                if pending:
                    peer, m = pending.popleft()
                    budget -= 1
                    try:
                        self._on_message(peer, m)
                    except Exception:  # noqa: BLE001 - one bad handling must not stop the socket
                        log.exception("handling %s from %r failed", m.get("k"), peer)
                    if self.closed:  # a handler closed us (a worker reconnecting)
                        return
                    continue
                try:
                    frames = sock.recv_multipart(_NOBLOCK)
                except zmq.Again:
                    break
                self._decode(frames)
            else:
                self._schedule_read()  # more may wait: come back after the loop's other work
            if self._on_batch is not None:
                self._on_batch()
        finally:
            self._reading = False
        self.flush()
        self.waiting()  # the fd may show nothing while messages wait (the edge was consumed)

    def _decode(self, frames: list[bytes]) -> None:
        """Queue the messages of one ZeroMQ message (after a ROUTER's peer id, one or more frames)."""
        peer = None
        if self.routed:
            peer, frames = frames[0], frames[1:]
            if not frames:
                self._on_bad(peer, "a message with no body")
                return
        for frame in frames:
            messages, refused = protocol.unpack_frame(frame)
            for reason in refused:
                self._on_bad(peer, reason)
            self._pending.extend((peer, m) for m in messages)

    def close(self) -> None:
        """Stop reading and close the socket; what is still queued is dropped."""
        if self.closed:
            return
        self.closed = True
        self._out.clear()
        self._urgent.clear()
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self._pending.clear()
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)
