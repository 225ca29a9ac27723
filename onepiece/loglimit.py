"""Rate-limited warnings: a burst of hostile input writes a few log lines, not thousands.
Used by the broker (bad control messages) and the transports (refused handshakes)."""

from __future__ import annotations

import time


class LogLimiter:
    """Which lines of a stream of similar warnings to write, so a burst of hostile input
    (thousands of bad messages a second) writes a few lines, not thousands.

    The first line of each key is written, then at most one per ``interval_s``, saying how
    many were held back in between. Keys past ``max_keys`` share one. No I/O: the caller
    logs (or not) on the answer of :meth:`admit`; counting every event is a metric's job.
    """

    OTHER = "(other)"

    def __init__(self, interval_s: float = 5.0, max_keys: int = 64, clock=time.monotonic):
        self.interval_s, self.max_keys, self.clock = interval_s, max_keys, clock
        self._quiet_until: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str) -> str | None:
        """None: stay quiet (the line is counted as held back). Otherwise write the line now,
        followed by the returned text: "" or a note of the lines held back since the last."""
        if key not in self._quiet_until and len(self._quiet_until) >= self.max_keys:
            key = self.OTHER
        now = self.clock()
        if now < self._quiet_until.get(key, now):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._quiet_until[key] = now + self.interval_s
        held = self._held.pop(key, 0)
        return f" ({held} more like it since the last such line, not logged)" if held else ""
