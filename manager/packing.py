"""Packing stage workers onto GPUs by memory: small stages share a GPU, big ones get their own.

Pure: no I/O, no clock, no asyncio. The Node Manager's memory-accounted GPU
pool (``manager.service``) places every GPU worker with :class:`GpuPool`;
policies and benchmarks ask :func:`plan` and :func:`capacity` what-if
questions with the same rule, so what they predict is what the pool does.

A worker declares the memory its loaded model holds (``memory_gb``), its
peak while it runs a task (``peak_gb``, at least ``memory_gb``) and,
optionally, the share of a GPU's compute it is expected to use (``load``,
e.g. 0.05 for a stage busy 5 % of the time).

Invariants (tests/manager/test_packing.py checks each after every step):

1. On every GPU the summed ``peak_gb`` of its workers is at most the GPU's
   memory. Peaks, not resident sizes, because any of the workers may be
   running a task at the same moment: the pool never over-commits.
2. When a ``max_load`` is given, every GPU's summed ``load`` is at most it.
3. A placed worker is on exactly one GPU; a refused one is on none.
4. ``held()`` is the number of GPUs with at least one worker (a shared GPU
   counts once).
5. ``remove(worker)`` frees exactly that worker's peak, memory and load on
   its GPU and touches no other GPU.

Placement rule (``place``): among the GPUs where the worker fits, the one
left with the least free memory (peak-wise) after it, ties to the lowest
index. Best fit puts a small worker beside other small ones on a GPU that is
already in use rather than on an empty GPU, so empty GPUs stay whole for the
big workers; with ``max_load`` a busy worker's GPU (a denoiser at load 1.0)
also takes no neighbours that would slow it down.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["GpuPool", "Plan", "StageNeed", "Worker", "capacity", "declared_need", "plan"]

_EPS = 1e-9  # sums of floats: 0.1 + 0.2 must fit in 0.3


@dataclass(frozen=True)
class StageNeed:
    """What one worker of a stage holds on a GPU: resident ``memory_gb``, ``peak_gb`` while it
    runs a task, and its expected share of the GPU's compute (``load``)."""

    memory_gb: float
    peak_gb: float
    load: float = 0.0

    def __post_init__(self) -> None:
        for name in ("memory_gb", "load"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {v!r}")
        if not math.isfinite(self.peak_gb) or self.peak_gb <= 0:
            raise ValueError(f"peak_gb must be a finite number > 0 (a GPU worker holds some memory), "
                             f"not {self.peak_gb!r}")
        if self.peak_gb < self.memory_gb:
            raise ValueError(f"peak_gb {self.peak_gb} is below memory_gb {self.memory_gb}: "
                             "the peak includes the resident weights")


@dataclass(frozen=True, eq=False)
class Worker:
    """One worker to place; compared by identity, so two workers of a stage are two workers."""

    stage: str
    need: StageNeed


class GpuPool:
    """GPUs of given memory sizes and the workers placed on them (see the module docstring)."""

    def __init__(self, sizes_gb: Sequence[float], *, max_load: float | None = None):
        if any(not math.isfinite(s) or s <= 0 for s in sizes_gb):
            raise ValueError(f"GPU memory sizes must be finite numbers > 0, not {list(sizes_gb)}")
        if max_load is not None and not max_load > 0:
            raise ValueError(f"max_load must be > 0 (or None for no limit), not {max_load!r}")
        self.sizes_gb = tuple(float(s) for s in sizes_gb)
        self.max_load = max_load
        self._on: list[list[Worker]] = [[] for _ in self.sizes_gb]
        self._where: dict[Worker, int] = {}

    # -- questions ----------------------------------------------------------------
    def peak_gb(self, gpu: int) -> float:
        """Summed peaks of the workers on ``gpu``: the memory reserved there."""
        return sum(w.need.peak_gb for w in self._on[gpu])

    def memory_gb(self, gpu: int) -> float:
        """Summed resident memory of the workers on ``gpu`` (what it holds between tasks)."""
        return sum(w.need.memory_gb for w in self._on[gpu])

    def load(self, gpu: int) -> float:
        return sum(w.need.load for w in self._on[gpu])

    def workers(self, gpu: int) -> list[Worker]:
        """The workers on ``gpu``, in the order they were placed."""
        return list(self._on[gpu])

    def gpu_of(self, worker: Worker) -> int | None:
        return self._where.get(worker)

    def held(self) -> int:
        """GPUs with at least one worker; a shared GPU counts once."""
        return sum(1 for ws in self._on if ws)

    def frees(self, workers: Iterable[Worker]) -> bool:
        """Whether removing ``workers`` (placed ones) would leave every GPU they are on empty:
        none of them shares a GPU with a worker outside the group."""
        group = set(workers)
        return bool(group) and all(set(self._on[self._where[w]]) <= group for w in group)

    def fits(self, gpu: int, need: StageNeed) -> bool:
        if self.peak_gb(gpu) + need.peak_gb > self.sizes_gb[gpu] + _EPS:
            return False
        return self.max_load is None or self.load(gpu) + need.load <= self.max_load + _EPS

    def choose(self, need: StageNeed) -> int | None:
        """The GPU ``place`` would put a worker with ``need`` on, or None when none has room."""
        room = [(self.sizes_gb[g] - self.peak_gb(g) - need.peak_gb, g)
                for g in range(len(self.sizes_gb)) if self.fits(g, need)]
        return min(room)[1] if room else None

    # -- changes ------------------------------------------------------------------
    def place(self, worker: Worker) -> int | None:
        """Put ``worker`` on the best-fitting GPU and return its index; None (and no change)
        when no GPU has room for its peak (and load)."""
        if worker in self._where:
            raise ValueError(f"worker of {worker.stage!r} is already on GPU {self._where[worker]}")
        gpu = self.choose(worker.need)
        if gpu is not None:
            self._on[gpu].append(worker)
            self._where[worker] = gpu
        return gpu

    def remove(self, worker: Worker) -> int:
        """Take ``worker`` off its GPU, freeing exactly what it held; returns the GPU's index."""
        gpu = self._where.pop(worker, None)
        if gpu is None:
            raise KeyError(f"worker of {worker.stage!r} is on no GPU of this pool")
        self._on[gpu].remove(worker)
        return gpu


def declared_need(stage: str, options: Mapping) -> StageNeed:
    """A GPU stage's need as its workflow declares it: options ``memory_gb``, ``peak_gb``
    (default: memory_gb) and ``gpu_load`` (its expected share of a GPU's compute, default 0)."""
    try:
        memory = float(options["memory_gb"])
        return StageNeed(memory, float(options.get("peak_gb", memory)), float(options.get("gpu_load", 0.0)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"stage {stage!r}: bad memory declaration ({exc})") from None


@dataclass(frozen=True)
class Plan:
    """Where :func:`plan` put each demand (``gpus[i]`` for ``demands[i]``; None: did not fit)."""

    gpus: tuple[int | None, ...]
    held: int

    @property
    def fits(self) -> bool:
        return all(g is not None for g in self.gpus)


def plan(demands: Sequence[tuple[str, StageNeed]], sizes_gb: Sequence[float], *,
         max_load: float | None = None) -> Plan:
    """Pack a whole allocation: the demands in decreasing order of peak (ties in the given
    order), each placed by :meth:`GpuPool.place`'s rule. Big workers go first, so they take
    whole GPUs before small ones fill the gaps."""
    pool = GpuPool(sizes_gb, max_load=max_load)
    workers = [Worker(stage, need) for stage, need in demands]
    gpus: list[int | None] = [None] * len(workers)
    for i in sorted(range(len(workers)), key=lambda i: -workers[i].need.peak_gb):
        gpus[i] = pool.place(workers[i])
    return Plan(tuple(gpus), pool.held())


def capacity(needs: Iterable[tuple[str, StageNeed]], sizes_gb: Sequence[float], *,
             max_load: float | None = None) -> int:
    """How many workers the GPUs hold when every stage gets workers in turn: rounds of one
    worker per stage (biggest peak first within a round), each placed by the live rule,
    until the first worker that finds no room. A count for a policy that thinks in slots;
    the live pool remains the judge of what fits."""
    order = sorted(needs, key=lambda sn: -sn[1].peak_gb)
    pool = GpuPool(sizes_gb, max_load=max_load)
    if not order:
        return 0
    placed = 0  # ends: every worker takes some memory (peak_gb > 0) and the GPUs have a finite amount
    while True:
        for stage, need in order:
            if pool.place(Worker(stage, need)) is None:
                return placed
            placed += 1
