"""The data plane: one Transport interface, the double-ring protocol, and its media."""

from .base import TRANSPORTS, Message, Sender, Transport, open_transport, transport_class
from .errors import (
    CodecError,
    MessageTooLarge,
    PeerGone,
    ProtocolError,
    Refused,
    TransportClosed,
    TransportError,
    TransportTimeout,
    TransportUnavailable,
)

__all__ = [
    "TRANSPORTS", "Message", "Sender", "Transport", "open_transport", "transport_class",
    "CodecError", "MessageTooLarge", "PeerGone", "ProtocolError", "Refused", "TransportClosed",
    "TransportError", "TransportTimeout", "TransportUnavailable",
]
