"""TCP transport: length-prefixed frames, for hosts that share neither memory nor RDMA.

A frame is ``struct "<4sIQ"`` (magic b"OPT1", meta length, payload length),
the codec's meta block, then its payload. The handshake is three frames of
msgpack meta and no payload: the receiver sends ``{"challenge": nonce}`` as
it accepts, the sender answers with its hello ``{"hello": sender id,
"principal": ..., "proof": ...}`` (onepiece.credentials), and the receiver
sends its verdict, ``{"ok": true}`` or ``{"error": why}`` before it closes:
a receiver with a key (``guard``) reads no data from a sender that cannot
prove the broker's link. After the handshake only the sender writes.

A sender writes a message's parts without joining them and waits until the
kernel holds all of them: it buffers one message at most, and
the caller may reuse its tensors once ``send`` returns. A receiver validates
sizes before allocating, reads each payload straight into memory of its own,
and stops reading a connection while its undelivered messages exceed
``max_buffered_bytes``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import mmap
import socket
import struct
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
    TransportTimeout,
    TransportUnavailable,
)
from .host import host_id

log = logging.getLogger(__name__)

MAGIC = b"OPT1"
FRAME = struct.Struct("<4sIQ")
MAX_HANDSHAKE = 4096  # bytes of a handshake frame's meta, either way


def _handshake_frame(obj: dict) -> bytes:
    meta = msgpack.packb(obj)
    return FRAME.pack(MAGIC, len(meta), 0) + meta


class _Connection(asyncio.BufferedProtocol):
    """One accepted connection, parsed as header -> meta -> payload, frame after frame."""

    def __init__(self, endpoint: TcpTransport):
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.addr = "?"
        self.peer: str | None = None  # sender id, known after the hello
        self.nonce = credentials.challenge()  # what the hello must answer
        self.buffered = 0  # payload bytes of this connection waiting in the inbox
        self.paused = False
        self.dropped = False
        self._header = bytearray(FRAME.size)
        self._meta_len = self._payload_len = 0
        self._meta: dict | None = None
        self._payload: bytearray | mmap.mmap | None = None
        self._end_frame()

    def _next(self, buf: memoryview, stage: str) -> None:
        self._buf, self._pos, self._stage = buf, 0, stage

    def connection_made(self, transport) -> None:
        self.transport = transport
        peername = transport.get_extra_info("peername")
        self.addr = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        if self.endpoint.closed:
            transport.abort()
            return
        self.endpoint._connections.add(self)
        transport.write(_handshake_frame({"challenge": self.nonce}))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf[self._pos:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.dropped:
            return
        self.endpoint._stats["bytes_received"] += nbytes
        self._pos += nbytes
        self._frame_got += nbytes
        if self._pos == len(self._buf):
            getattr(self, f"_got_{self._stage}")()

    def _got_header(self) -> None:
        magic, self._meta_len, self._payload_len = FRAME.unpack(self._header)
        if magic != MAGIC:
            return self._drop(f"bad magic {bytes(magic)!r}")
        if not 0 < self._meta_len <= codec.MAX_META_BYTES:
            return self._drop(f"meta length {self._meta_len} out of range")
        if self.peer is None and self._payload_len:
            return self._drop("first frame is not a hello")
        if self._payload_len > self.endpoint.max_message_bytes:
            return self._drop(f"payload of {self._payload_len} bytes exceeds {self.endpoint.max_message_bytes}")
        self._next(memoryview(bytearray(self._meta_len)), "meta")

    def _got_meta(self) -> None:
        if self.peer is None:
            try:
                hello = msgpack.unpackb(self._buf, raw=False)
            except Exception:  # msgpack raises several unrelated types on garbage
                hello = None
            if not (isinstance(hello, dict) and isinstance(hello.get("hello"), str)):
                return self._drop("first frame is not a hello")
            why = self.endpoint._doorkeeper.refusal(self.endpoint.gate_key, self.nonce, hello, self.addr)
            if why is not None:  # the verdict reaches the sender; nothing more is read
                self.dropped = True
                self.transport.write(_handshake_frame({"error": why}))
                self.transport.close()
                return
            self.peer = hello["hello"]
            self.transport.write(_handshake_frame({"ok": True}))
            log.debug("tcp peer %s connected from %s", self.peer, self.addr)
            return self._end_frame()
        try:
            self._meta = codec.decode_meta(self._buf)
        except Exception as exc:  # decode_meta can raise more than CodecError on hostile input
            return self._drop(f"bad meta block: {exc}")
        if self._meta["n"] != self._payload_len:
            return self._drop(f"meta says {self._meta['n']} payload bytes, frame says {self._payload_len}")
        self._payload = codec.payload_buffer(self._payload_len)
        if self._payload_len:
            self._next(memoryview(self._payload), "payload")
        else:
            self._got_payload()

    def _got_payload(self) -> None:
        try:
            tensors = codec.decode_tensors(self._meta, self._payload)
        except Exception as exc:
            return self._drop(f"bad tensor table: {exc}")
        self.endpoint._deliver(self, Message(self._meta["h"], tensors, peer=self.peer), self._payload_len)
        self._meta = self._payload = None
        self._end_frame()

    def _end_frame(self) -> None:
        self._next(memoryview(self._header), "header")
        self._frame_got = 0

    def _drop(self, reason: str) -> None:
        log.warning("tcp: dropping connection from %s (peer %s): %s", self.addr, self.peer or "?", reason)
        self.dropped = True
        self.transport.abort()

    def delivered(self, nbytes: int) -> None:
        self.buffered -= nbytes
        if self.paused and self.buffered <= self.endpoint.max_buffered_bytes and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint._connections.discard(self)
        if self.dropped or self.endpoint.closed:
            return
        if self._frame_got == 0:
            log.debug("tcp peer %s at %s closed (%s)", self.peer, self.addr, exc or "clean end")
            return
        total = FRAME.size if self._stage == "header" else FRAME.size + self._meta_len + self._payload_len
        what = f"after {self._frame_got} of {total} bytes"
        if self.peer is None:
            log.warning("tcp: connection from %s closed mid-frame before its hello, %s", self.addr, what)
            return
        self.endpoint._deliver(self, PeerGone(f"tcp peer {self.peer} at {self.addr} closed mid-message {what}"), 0)


class _SendProtocol(asyncio.Protocol):
    """asyncio flow control for a sender: ``room`` is set while the kernel can take more.
    During the handshake it also reads the receiver's frames (bounded); after it, the
    receiver has nothing to say and what it sends is ignored."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.room = asyncio.Event()
        self.room.set()
        self.handshaken = False
        self._got = bytearray()
        self._arrived = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.handshaken:
            return
        self._got += data
        if len(self._got) > 2 * (FRAME.size + MAX_HANDSHAKE):  # more than a handshake's worth
            self.handshaken = True  # read no more
            self.lost = ProtocolError("the receiver sent more than a handshake")
            self.transport.abort()
        self._arrived.set()

    async def frame(self) -> dict:
        """The receiver's next handshake frame (the caller bounds the wait)."""
        while True:
            if len(self._got) >= FRAME.size:
                magic, n, payload = FRAME.unpack_from(self._got)
                if magic != MAGIC or payload or not 0 < n <= MAX_HANDSHAKE:
                    raise ProtocolError(f"not a handshake frame: magic {bytes(magic)!r}, meta {n}, payload {payload}")
                if len(self._got) >= FRAME.size + n:
                    meta = bytes(self._got[FRAME.size:FRAME.size + n])
                    del self._got[:FRAME.size + n]
                    try:
                        obj = msgpack.unpackb(meta, raw=False)
                    except Exception as exc:  # msgpack raises several unrelated types on garbage
                        raise ProtocolError(f"handshake frame is not msgpack: {exc}") from exc
                    if not isinstance(obj, dict):
                        raise ProtocolError("handshake frame is not a map")
                    return obj
            if self.lost is not None:
                raise PeerGone(f"closed during the handshake: {self.lost}")
            self._arrived.clear()
            await self._arrived.wait()

    def pause_writing(self) -> None:
        self.room.clear()

    def resume_writing(self) -> None:
        self.room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or exc or ConnectionResetError("connection closed by peer")
        self.room.set()
        self._arrived.set()


class TcpSender(Sender):
    """A connection to one peer endpoint; one message at a time, in order."""

    def __init__(self, endpoint: TcpTransport, proto: _SendProtocol, descriptor: Mapping[str, Any]):
        self.peer = str(descriptor.get("id", ""))
        self._endpoint = endpoint
        self._proto = proto
        self._where = f"tcp peer {self.peer} at {descriptor['host']}:{descriptor['port']}"
        self._limit = min(endpoint.max_message_bytes, descriptor.get("max_message_bytes") or endpoint.max_message_bytes)
        self._lock = asyncio.Lock()
        self._closed: str | None = None

    async def _room(self) -> None:
        await self._proto.room.wait()
        if self._closed:
            raise TransportClosed(f"sender to {self._where} {self._closed}")
        if self._proto.lost is not None:
            raise PeerGone(f"{self._where} is gone: {self._proto.lost}") from self._proto.lost

    async def send(self, header, tensors=None, *, timeout=None) -> None:
        if self._closed:
            raise TransportClosed(f"sender to {self._where} {self._closed}")
        enc = codec.encode(header, tensors)
        if enc.nbytes > self._limit:
            raise MessageTooLarge(f"message of {enc.nbytes} bytes exceeds {self._limit} for {self._where}")
        frame = FRAME.pack(MAGIC, len(enc.meta), enc.nbytes)
        written = finished = False
        try:
            async with asyncio.timeout(self._endpoint.send_timeout if timeout is None else timeout):
                async with self._lock:
                    await self._room()
                    self._proto.transport.writelines([frame, enc.meta, *enc.parts])
                    written = True
                    await self._room()
                    finished = True
        except TimeoutError as exc:
            raise TransportTimeout(f"{self._where} had no room for {enc.nbytes} bytes in time") from exc
        finally:
            if written and not finished and self._proto.lost is None:
                # Half a frame is on the wire and the rest still points at the caller's
                # tensors: the stream cannot be resumed, so end it.
                self._abort("was aborted by a send that did not finish")
        stats = self._endpoint._stats
        stats["bytes_sent"] += FRAME.size + len(enc.meta) + enc.nbytes
        stats["messages_sent"] += 1

    def _abort(self, why: str) -> None:
        self._closed = self._closed or why
        self._endpoint._senders.discard(self)
        transport = self._proto.transport
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    async def aclose(self) -> None:
        if not self._closed:
            self._abort("is closed")


class TcpTransport(Transport):
    """A TCP endpoint: a listening socket that receives, and senders it opens to peers."""

    name = "tcp"

    def __init__(self, max_message_bytes: int, max_buffered_bytes: int, send_timeout: float):
        self.max_message_bytes = max_message_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.send_timeout = send_timeout
        self.closed = False
        self.id = uuid.uuid4().hex
        self._descriptor: dict = {}
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._senders: set[TcpSender] = set()
        self._inbox: collections.deque = collections.deque()
        self._nonempty = asyncio.Event()
        self._stats = dict.fromkeys(("bytes_sent", "bytes_received", "messages_sent", "messages_received"), 0)
        self._doorkeeper = Doorkeeper("tcp")

    @classmethod
    async def open(cls, host: str = "127.0.0.1", port: int = 0, max_message_bytes: int = 2 << 30,
                   max_buffered_bytes: int = 64 << 20, send_timeout: float = 30.0,
                   advertise_host: str | None = None) -> TcpTransport:
        self = cls(max_message_bytes, max_buffered_bytes, send_timeout)
        try:
            self._server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), host, port)
        except OSError as exc:
            raise TransportUnavailable(f"tcp cannot listen on {host}:{port}: {exc}") from exc
        bound = self._server.sockets[0].getsockname()[1]
        self._descriptor = {"transport": "tcp", "id": self.id, "host": advertise_host or host, "port": bound,
                            "host_id": host_id(), "max_message_bytes": max_message_bytes}
        return self

    @property
    def descriptor(self) -> dict:
        return dict(self._descriptor)

    def _check_open(self) -> None:
        if self.closed:
            raise TransportClosed(f"tcp endpoint {self.id} is closed")

    def _deliver(self, conn: _Connection, item: Message | PeerGone, nbytes: int) -> None:
        self._inbox.append((conn, item, nbytes))
        conn.buffered += nbytes
        if conn.buffered > self.max_buffered_bytes and not conn.paused:
            conn.paused = True
            conn.transport.pause_reading()
        self._nonempty.set()

    async def connect(self, descriptor: Mapping[str, Any], *, timeout: float | None = None,
                      credential: Credential | None = None) -> TcpSender:
        self._check_open()
        if descriptor.get("transport") != "tcp":
            raise ValueError(f"not a tcp descriptor: {dict(descriptor)!r}")
        host, port = descriptor["host"], descriptor["port"]
        where = f"tcp peer {descriptor.get('id')} at {host}:{port}"
        transport = None
        try:
            async with asyncio.timeout(self.send_timeout if timeout is None else timeout):
                transport, proto = await asyncio.get_running_loop().create_connection(_SendProtocol, host, port)
                if self.closed:
                    transport.abort()
                    self._check_open()
                transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                challenge = await proto.frame()
                hello = {"hello": self.id, **credentials.answer(credential, challenge.get("challenge"))}
                transport.write(_handshake_frame(hello))
                verdict = await proto.frame()
        except TimeoutError as exc:
            if transport is not None:
                transport.abort()
            raise TransportTimeout(f"connecting to {where} timed out") from exc
        except OSError as exc:
            if transport is not None:
                transport.abort()
            raise PeerGone(f"cannot connect to {where}: {exc}") from exc
        except (ProtocolError, PeerGone) as exc:
            transport.abort()
            raise type(exc)(f"{where}: {exc}") from exc
        if "error" in verdict:
            transport.abort()
            raise Refused(f"{where} refused the connection: {str(verdict['error'])[:300]}")
        if verdict.get("ok") is not True:
            transport.abort()
            raise ProtocolError(f"{where} answered the hello with {verdict!r:.100}")
        proto.handshaken = True
        # high=0: pause until the kernel holds every byte, so send() returning means the
        # caller's tensors are no longer referenced.
        transport.set_write_buffer_limits(high=0)
        sender = TcpSender(self, proto, descriptor)
        self._senders.add(sender)
        return sender

    async def recv(self, *, timeout: float | None = None) -> Message:
        try:
            async with asyncio.timeout(timeout):
                while not self._inbox:
                    self._check_open()
                    self._nonempty.clear()
                    await self._nonempty.wait()
        except TimeoutError as exc:
            raise TransportTimeout(f"no message within {timeout} s") from exc
        self._check_open()
        conn, item, nbytes = self._inbox.popleft()
        conn.delivered(nbytes)
        if isinstance(item, PeerGone):
            raise item
        self._stats["messages_received"] += 1
        return item

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._server.close()
        for conn in list(self._connections):
            conn.transport.abort()
        for sender in list(self._senders):
            sender._abort("is closed (its endpoint was closed)")
        self._inbox.clear()
        self._nonempty.set()
        await self._server.wait_closed()

    def stats(self) -> dict[str, int]:
        return {**self._stats, "connections_refused": self._doorkeeper.refused}
