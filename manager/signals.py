"""Per-period load signals from the broker's cumulative counters. No I/O.

``broker.core.Core.stage_signals(now)`` gives, per stage, counters that only
grow (arrivals, completed, service_time_sum) and gauges of the present
(queue length, oldest wait, busy, workers, draining). :class:`SignalReader`
differences successive readings into rates and a smoothed service time;
what only the manager knows (workers launched but not registered yet,
workers still exiting, how long a worker takes to start) is passed in.
:class:`LoadTimes` keeps that last number: measured launch-to-registered
times first, the worker's own reported model-load time (``info["load_s"]``)
until there is a measurement, and a guess until there is either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .policy import StageSignals

__all__ = ["DEFAULT_LOAD_TIME_S", "LoadTimes", "SignalReader"]

DEFAULT_LOAD_TIME_S = 10.0  # a guess until measured: a small model from a warm page cache


@dataclass
class _Last:
    arrivals: int
    completed: int
    service_time_sum: float


class SignalReader:
    """Turns cumulative per-stage readings into :class:`StageSignals`.

    ``gpu`` maps every stage to whether it draws from the GPU pool.
    ``service_alpha`` is the EWMA weight of one reading's mean service time.
    """

    def __init__(self, gpu: Mapping[str, bool], *, service_alpha: float = 0.3):
        if not 0 < service_alpha <= 1:
            raise ValueError(f"service_alpha must be in (0, 1], not {service_alpha}")
        self.gpu = dict(gpu)
        self.service_alpha = service_alpha
        self._last: dict[str, _Last] = {}
        self._last_now: float | None = None
        self.service_time: dict[str, float] = {}

    def read(
        self,
        now: float,
        raw: Mapping[str, Mapping],
        *,
        starting: Mapping[str, int] | None = None,
        draining: Mapping[str, int] | None = None,
        load_time: Mapping[str, float] | None = None,
        width: Mapping[str, int] | None = None,
        replacing: Mapping[str, int] | None = None,
        held_slots: Mapping[str, int] | None = None,
    ) -> dict[str, StageSignals]:
        """Signals since the previous reading. ``now`` is monotonic seconds; ``raw`` is
        ``stage_signals()``; ``draining`` counts workers still exiting that the broker
        may no longer list. While a stage is re-formed to another ``width``, ``replacing``
        counts its live workers of the old width: they hold their slots like draining ones
        and are not the stage's workers any more; ``held_slots`` is every slot the stage
        holds. The first reading has no rate (there is nothing to difference)."""
        starting, draining, load_time = starting or {}, draining or {}, load_time or {}
        width, replacing, held_slots = width or {}, replacing or {}, held_slots or {}
        dt = None if self._last_now is None else now - self._last_now
        self._last_now = now
        out: dict[str, StageSignals] = {}
        for stage in self.gpu:
            r = raw.get(stage)
            if r is None:
                continue
            now_counts = _Last(int(r["arrivals"]), int(r["completed"]), float(r["service_time_sum"]))
            last = self._last.get(stage)
            self._last[stage] = now_counts
            if last is None or now_counts.arrivals < last.arrivals or now_counts.completed < last.completed:
                # first reading, or the counters restarted (a new broker): this reading is the baseline
                rate = 0.0
                if now_counts.completed and stage not in self.service_time:
                    self.service_time[stage] = now_counts.service_time_sum / now_counts.completed
            else:
                rate = (now_counts.arrivals - last.arrivals) / dt if dt and dt > 0 else 0.0
                done = now_counts.completed - last.completed
                if done > 0:
                    mean = max(0.0, now_counts.service_time_sum - last.service_time_sum) / done
                    old = self.service_time.get(stage)
                    self.service_time[stage] = mean if old is None else old + self.service_alpha * (mean - old)
            stale = int(replacing.get(stage, 0))
            workers = max(0, int(r["workers"]) - int(r["draining"]) - stale)
            out[stage] = StageSignals(
                stage=stage,
                gpu=self.gpu[stage],
                arrival_rate=rate,
                service_time=self.service_time.get(stage, 0.0),
                queue_len=int(r["queue_len"]),
                queue_wait=float(r["oldest_wait_s"]),
                busy=min(int(r["busy"]), workers),
                workers=workers,
                starting=int(starting.get(stage, 0)),
                draining=max(int(r["draining"]), int(draining.get(stage, 0))) + stale,
                load_time=float(load_time.get(stage, DEFAULT_LOAD_TIME_S)),
                width=int(width.get(stage, 1)),
                held_slots=int(held_slots.get(stage, -1)),
            )
        return out

    def forget_service_time(self, stage: str) -> None:
        """The stage's workers change width: a task's time there is unknown until one finishes."""
        self.service_time.pop(stage, None)


class LoadTimes:
    """How long a worker of each stage takes from launch to registered (EWMA)."""

    def __init__(self, *, alpha: float = 0.5, default: float = DEFAULT_LOAD_TIME_S):
        self.alpha = alpha
        self.default = default
        self.measured: dict[str, float] = {}
        self.reported: dict[str, float] = {}

    def record(self, stage: str, seconds: float) -> None:
        """A worker we launched registered ``seconds`` after its launch."""
        seconds = max(0.0, float(seconds))
        old = self.measured.get(stage)
        self.measured[stage] = seconds if old is None else old + self.alpha * (seconds - old)

    def report(self, stage: str, load_s: float) -> None:
        """A worker says its model took ``load_s`` to load (a lower bound of the start time)."""
        if isinstance(load_s, (int, float)) and not isinstance(load_s, bool) and load_s >= 0:
            self.reported[stage] = max(self.reported.get(stage, 0.0), float(load_s))

    def get(self, stage: str) -> float:
        if stage in self.measured:
            return self.measured[stage]
        return self.reported.get(stage, self.default)

    def as_dict(self, stages) -> dict[str, float]:
        return {s: self.get(s) for s in stages}
