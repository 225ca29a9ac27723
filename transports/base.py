"""The data-plane interface every transport implements.

A worker opens one :class:`Transport` endpoint and publishes its
``descriptor`` (a msgpack-able dict) through the control plane. A producer
turns a peer's descriptor into a :class:`Sender` with :meth:`Transport.connect`
and awaits :meth:`Sender.send`, which waits while the peer has no room and
raises :class:`~transports.errors.PeerGone` or
:class:`~transports.errors.TransportTimeout` instead of buffering without
bound. The consumer awaits :meth:`Transport.recv`, which yields messages in
order per sender; their tensors may view the transport's memory until the
message is released.

Implementations are chosen by name and imported lazily, so ``pyverbs`` is
only imported when ``rdma`` is chosen.
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from onepiece import credentials
from onepiece.credentials import Credential
from onepiece.loglimit import LogLimiter

log = logging.getLogger(__name__)

#: name -> "module:Class", resolved on first use.
TRANSPORTS: dict[str, str] = {
    "shm": "transports.shm:ShmTransport",
    "tcp": "transports.tcp:TcpTransport",
    "rdma": "transports.rdma:RdmaTransport",
    "auto": "transports.auto:AutoTransport",
}


class Message:
    """A received message: its header, its named tensors and who sent it.

    Tensors may be views into transport memory (a ring): call
    :meth:`release` (or use ``with``) when done with them. Tensors must not
    be used after release; :meth:`detach` gives copies that outlive it.
    """

    __slots__ = ("header", "tensors", "peer", "_release")

    def __init__(self, header: dict, tensors: dict[str, torch.Tensor], peer: str = "", release=None):
        self.header = header
        self.tensors = tensors
        self.peer = peer
        self._release = release

    @property
    def zero_copy(self) -> bool:
        """True while the tensors view transport memory."""
        return self._release is not None

    def release(self) -> None:
        """Give the message's memory back to the transport (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def detach(self) -> dict[str, torch.Tensor]:
        """Copy the tensors out of transport memory, release it, return the copies."""
        if self._release is not None:
            self.tensors = {k: v.clone() for k, v in self.tensors.items()}
            self.release()
        return self.tensors

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return f"Message(peer={self.peer!r}, header={self.header!r}, tensors={shapes})"


class Sender(abc.ABC):
    """One directed connection to a peer's endpoint."""

    peer: str = ""

    @abc.abstractmethod
    async def send(
        self,
        header: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Send one message; wait (up to ``timeout``) while the peer has no room.

        Messages on one sender arrive in the order they were sent. When it
        returns, the bytes have left the caller's tensors (the caller may
        reuse them). Raises PeerGone when the peer is gone,
        TransportTimeout when it had no room in time, TransportClosed after
        :meth:`aclose`. A send interrupted mid-message (timeout,
        cancellation) closes the sender, since the peer holds half a
        message; one interrupted before it wrote anything leaves it usable.
        """

    def try_send(self, header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> bool:
        """Send one message now, without waiting, if the medium has room for all of it at once;
        False if not (nothing was sent: use :meth:`send`). Errors as for :meth:`send`.

        The cheap path for small messages: no task, no lock, no await. A medium
        without such a path keeps this default.
        """
        return False

    def zero_copy(self, nbytes: int) -> bool:
        """Whether :meth:`allocate` of ``nbytes`` gives memory the consumer reads (no send copy)."""
        return False

    async def allocate(self, shape, dtype: torch.dtype, *, timeout: float | None = None) -> torch.Tensor:
        """A tensor to compute into and then send on this sender (zero-copy production).

        Where the medium can (shm, above the rendezvous threshold) it lives in
        memory the consumer has granted, so :meth:`send` moves no bytes: the
        compute wrote them where the consumer reads them. Send it (alone or
        with other tensors) in a later message on this sender, or give it back
        with :meth:`discard`. After that the memory is the consumer's: the
        tensor stays readable (a worker holds its outputs until RELEASE), and
        if the consumer grants that region to this sender again, the tensor
        first gets a copy of its own; do not write it any more, and a consumer
        must not write the inputs it received in place. Elsewhere it is an
        ordinary tensor and send copies it as usual. Waits (up to ``timeout``)
        for the consumer's grant, so the consumer must be receiving.
        """
        return torch.empty(shape, dtype=dtype)

    async def discard(self, tensor: torch.Tensor) -> None:
        """Give back a tensor from :meth:`allocate` that will not be sent."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the connection; the peer sees a clean end."""

    async def __aenter__(self) -> Sender:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class Transport(abc.ABC):
    """A worker's data-plane endpoint: it accepts peers and receives from them."""

    name: ClassVar[str]
    gate_key: bytes | None = None  # whose links a producer must prove (guard)

    @classmethod
    @abc.abstractmethod
    async def open(cls, **options: Any) -> Transport:
        """Start the endpoint; raise TransportUnavailable if the medium is missing."""

    @property
    @abc.abstractmethod
    def descriptor(self) -> dict:
        """What a peer needs to connect; published over the control plane."""

    @abc.abstractmethod
    async def connect(self, descriptor: Mapping[str, Any], *, timeout: float | None = None,
                      credential: Credential | None = None) -> Sender:
        """Open a sender to the endpoint that published ``descriptor``, showing ``credential``
        at the handshake (onepiece.credentials); raises Refused if the peer refuses it."""

    def guard(self, key: bytes | None) -> None:
        """From now on accept only connections whose producer proves a link made with ``key``
        (onepiece.credentials, C1); None accepts anyone (C3). Open connections stay: they
        were accepted under the key of their time. Counted in ``stats()["connections_refused"]``."""
        self.gate_key = key

    @abc.abstractmethod
    async def recv(self, *, timeout: float | None = None) -> Message:
        """The next message from any sender (in order per sender).

        Raises TransportTimeout when ``timeout`` passes with nothing, and
        PeerGone (once) when a sender died in the middle of a message.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection and free every resource (segments, sockets)."""

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: bytes and messages sent and received."""
        return {}

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class Doorkeeper:
    """A consumer's side of the handshake's credential check (onepiece.credentials): it
    decides on a producer's hello, counts refusals and logs them sparsely (a flood of
    strangers writes a line per ``LOG_EVERY_S``, saying how many it held back)."""

    LOG_EVERY_S = 10.0

    def __init__(self, name: str):
        self.name = name
        self.refused = 0
        self._log = LogLimiter(interval_s=self.LOG_EVERY_S, max_keys=1)

    def refusal(self, key: bytes | None, nonce: bytes, hello: dict, where: str) -> str | None:
        """Why the connection from ``where`` is refused (counted and logged), or None."""
        why = credentials.refusal(key, nonce, hello)
        if why is not None:
            self.refused += 1
            note = self._log.admit("refused")
            if note is not None:
                log.warning("%s: refused a connection from %s (peer %.40s): %s%s", self.name, where,
                            str(hello.get("hello", "?")), why, note)
        return why


def transport_class(name: str) -> type[Transport]:
    """Resolve a transport name to its class, importing its module now."""
    try:
        target = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose one of {', '.join(TRANSPORTS)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


async def open_transport(name: str, **options: Any) -> Transport:
    """Open an endpoint of the named transport (``shm``, ``tcp``, ``rdma`` or ``auto``)."""
    return await transport_class(name).open(**options)
