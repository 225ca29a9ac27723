"""Ports on this host, for servers that must know theirs before they bind."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago. Another process may take it before the
    caller binds it: the caller's bind then fails, and must say so."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
