"""Overload as clear answers: per-key rates, bounds on unfinished jobs and on event streams.
Pure: counts and clocks in, a verdict out; ``broker/api.py`` turns a verdict into 429 or 503.

Invariants (tests/broker/test_limits.py):

1. A key's submissions are a token bucket of ``rate`` per second and ``burst`` deep: a refused
   submission takes no token, and its ``retry_after_s`` is when the next token arrives (> 0).
2. Unfinished jobs (accepted, not ended) are bounded per key and in total: a submission that
   would pass either bound is refused with 503 and a Retry-After; nothing already accepted is
   ever dropped to make room (every accepted job still ends).
3. A key's open event streams are bounded; a stream counts from its opening to its closing,
   and ``leave`` after ``enter`` leaves the count as it was (no leak on any exit path).
4. Without keys (loopback, or --insecure) the per-key rules do not apply; the totals do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Limits", "Refusal"]

# Limits field -> the setting that sets it (onepiece.config.Settings)
SETTINGS = {"rate": "submit_rate", "burst": "submit_burst", "max_active_per_key": "max_active_per_key",
            "max_active": "max_active_jobs", "max_streams_per_key": "max_streams_per_key"}


@dataclass(frozen=True)
class Refusal:
    status: int  # 429 (this key is too fast, or has too many streams) or 503 (too much unfinished work)
    retry_after_s: int
    message: str


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class Limits:
    rate: float = 20.0  # submissions per second per key
    burst: int = 100
    max_active_per_key: int = 1000
    max_active: int = 10000
    max_streams_per_key: int = 32
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _streams: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("rate", "burst", "max_active_per_key", "max_active", "max_streams_per_key"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")

    @classmethod
    def from_settings(cls, settings) -> Limits:
        """The limits ``settings`` name; one it does not have keeps the default here."""
        return cls(**{f: getattr(settings, s) for f, s in SETTINGS.items() if hasattr(settings, s)})

    def submit(self, key: str | None, now: float, active_of_key: int, active: int) -> Refusal | None:
        """Whether a submission of ``key`` (None: no keys) may go in now; takes a token if so."""
        if active >= self.max_active:
            return Refusal(503, 5, f"the service holds {active} unfinished jobs, its limit: try again later")
        if key is None:
            return None
        if active_of_key >= self.max_active_per_key:
            return Refusal(503, 5, f"key {key} has {active_of_key} unfinished jobs, its limit: wait for some to end")
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + max(0.0, now - b.at) * self.rate)
        b.at = now
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) / self.rate
            return Refusal(429, max(1, math.ceil(wait)),
                           f"key {key} submits faster than {self.rate:g} jobs/s (bursts of {self.burst})")
        b.tokens -= 1.0
        if len(self._buckets) > 100_000:  # keys come from a file, but never let this grow unbounded
            full = [k for k, v in self._buckets.items() if v.tokens >= self.burst]
            for k in full:
                del self._buckets[k]
        return None

    def enter_stream(self, key: str | None) -> Refusal | None:
        """A key opens an event stream (counted until :meth:`leave_stream`)."""
        if key is None:
            return None
        n = self._streams.get(key, 0)
        if n >= self.max_streams_per_key:
            return Refusal(429, 5, f"key {key} has {n} event streams open, its limit: close one")
        self._streams[key] = n + 1
        return None

    def leave_stream(self, key: str | None) -> None:
        if key is None:
            return
        n = self._streams.get(key, 0) - 1
        if n > 0:
            self._streams[key] = n
        else:
            self._streams.pop(key, None)

    def streams(self, key: str) -> int:
        return self._streams.get(key, 0)
