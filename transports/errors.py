"""Exceptions of the data plane.

Everything a transport raises is one of these; errors from the OS, pyverbs or
the event loop are wrapped at the boundary with ``raise ... from exc``::

    TransportError
    ├── TransportUnavailable   the medium cannot be used here (no pyverbs, no
    │                          RDMA device, no /dev/shm); raised at start-up
    ├── TransportClosed        this endpoint or sender was closed locally
    ├── PeerGone               the peer closed, died, or its connection broke
    ├── Refused                the peer refused the connection: no valid credential
    ├── TransportTimeout       a wait (room at the peer, a handshake) timed out
    ├── ProtocolError          bytes from the peer do not follow the protocol
    │   └── CodecError         a message header or tensor table is malformed
    └── MessageTooLarge        a message exceeds the configured limit
"""

from __future__ import annotations


class TransportError(Exception):
    """Base class of all data-plane errors."""


class TransportUnavailable(TransportError):
    """The chosen medium cannot be used on this machine; the message says how to fix it."""


class TransportClosed(TransportError):
    """The local endpoint or sender has been closed."""


class PeerGone(TransportError):
    """The peer closed or died; whatever was in flight on that connection is lost."""


class Refused(TransportError):
    """The peer refused this connection at its handshake: the credential shown (or its
    absence) is not one the broker gave for that peer (onepiece.credentials)."""


class TransportTimeout(TransportError, TimeoutError):
    """A wait exceeded its timeout (the peer had no room, or did not answer)."""


class ProtocolError(TransportError):
    """The peer sent bytes that do not follow the protocol."""


class CodecError(ProtocolError):
    """A message's header or tensor table cannot be encoded or decoded."""


class MessageTooLarge(TransportError):
    """A message is larger than the configured maximum."""
