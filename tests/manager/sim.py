"""A tiny discrete-time world for replaying a policy back to back (no processes, no sleeps).

Each step is one control period: started workers register after
``load_periods``, drained ones leave after one period, arrivals are Poisson
(seeded), and each stage serves like a fluid queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from manager.policy import Change, StageSignals


@dataclass
class StageState:
    rate: float  # arrivals/s
    service: float  # s/task
    gpu: bool = True
    load_time: float = 5.0
    workers: int = 0
    starting: list[int] = field(default_factory=list)  # periods left before registered
    draining: int = 0
    queue: float = 0.0
    wait: float = 0.0


class World:
    def __init__(self, stages: dict[str, StageState], *, gpu_slots: int, cpu_slots: int = 0, period: float = 5.0,
                 load_periods: int = 1, seed: int = 0, noise: bool = True):
        self.stages = stages
        self.gpu_slots, self.cpu_slots = gpu_slots, cpu_slots
        self.period = period
        self.load_periods = load_periods
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.t = 0.0
        self.log: list[list[Change]] = []

    def signals(self) -> dict[str, StageSignals]:
        out = {}
        p = self.period
        for name, s in self.stages.items():
            # the previous period's starts register, its drains leave
            s.starting = [n - 1 for n in s.starting]
            s.workers += sum(1 for n in s.starting if n <= 0)
            s.starting = [n for n in s.starting if n > 0]
            s.draining = 0
            mean = s.rate * p
            arrivals = int(self.rng.poisson(mean)) if self.noise else mean
            capacity = s.workers * p / s.service if s.service else 0.0
            served = min(s.queue + arrivals, capacity)
            s.queue = max(0.0, s.queue + arrivals - served)
            busy = min(s.workers, math.ceil(served * s.service / p - 1e-9)) if s.service else 0
            s.wait = s.wait + p if s.queue >= 1 and not capacity else (s.queue * s.service / max(1, s.workers))
            out[name] = StageSignals(name, s.gpu, arrivals / p, s.service, int(s.queue), s.wait if s.queue >= 1
                                     else 0.0, busy, s.workers, len(s.starting), s.draining, s.load_time)
        return out

    def apply(self, changes: list[Change]) -> None:
        for c in changes:
            s = self.stages[c.stage]
            if c.delta > 0:
                s.starting += [self.load_periods] * c.delta
            else:
                for _ in range(-c.delta):
                    assert s.workers > 0, f"drained a worker {c.stage} does not have: {c}"
                    s.workers -= 1
                    s.draining += 1

    def step(self, policy) -> tuple[dict[str, StageSignals], list[Change]]:
        sig = self.signals()
        changes = policy.decide(self.t, sig, self.gpu_slots, self.cpu_slots)
        self.apply(changes)
        self.log.append(changes)
        self.t += self.period
        return sig, changes

    def run(self, policy, periods: int) -> list[list[Change]]:
        return [self.step(policy)[1] for _ in range(periods)]

    def counts(self) -> dict[str, int]:
        return {n: s.workers + len(s.starting) for n, s in self.stages.items()}
