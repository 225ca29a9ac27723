"""Latency objectives as capacity: the workers, and the sequence-parallel width, a stage needs
to meet its share of a workflow's p95. Pure: numbers in, numbers out, no clock, no I/O.

A workflow declares ``[slo] p95_s``: 95 % of its jobs end within that many seconds of their
submission. The Node Manager turns it into a *budget* per stage (:func:`stage_budgets`: the
objective split over the stages of the longest path in proportion to their mean times, so a
stage that is 97 % of the work gets 97 % of the time) and sizes each stage so that its own p95
response time (queueing + service) fits the budget (:func:`workers_for`). With an
``sp_efficiency`` table a stage may run as workers of width k (k GPU slots each, service time
``S / (k x efficiency(k))``): :func:`choose_width` picks the width that meets the budget with
the fewest slots, and the wider one when two hold the same number of slots (one queue served
twice as fast has a shorter tail than two queues, at the same cost).

Queueing model (why these formulas): arrivals are Poisson (the traces replayed and the
production traces cited in bench/elastic.py are bursty on minutes, Poisson within); a stage of
n workers is an M/G/n queue. Its waiting-time tail is the Erlang-C probability of waiting times
an exponential tail, with the Allen-Cunneen correction ``(1 + cv^2) / 2`` for service times
that are not exponential (a DiT step count is fixed: cv 0.03, so waits are about half of
M/M/n's). The p95 response is taken as the service time's p95 plus the wait's p95: adding
quantiles over-estimates the quantile of the sum, so the sizing errs on the safe side.

Invariants (tests/manager/test_slo.py):

1. ``erlang_c(n, a)`` is in [0, 1], is 1 when ``a >= n`` (no steady state) and falls with n.
2. ``wait_quantile`` is ``inf`` for an unstable stage and 0 when waiting is rarer than 1 - q.
3. ``workers_for`` never returns fewer workers than the load needs (``rate * S / max_util``),
   is monotone: more rate never needs fewer workers, more budget never needs more.
4. ``choose_width`` only returns widths of the table; if no width meets the budget within
   ``max_slots`` it returns the one with the most capacity per slot (k = 1 unless the table
   says a wider one loses nothing), so an impossible objective never widens the stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import NormalDist

__all__ = ["Objective", "Sizing", "choose_width", "erlang_c", "objective_budgets", "response_quantile", "sizing",
           "stage_budgets", "wait_quantile", "workers_for"]

MAX_WORKERS = 4096


def _service_quantile(service_s: float, cv: float, q: float) -> float:
    """A task's q-quantile time: mean x (1 + z_q x cv), z_q the standard normal quantile."""
    return service_s * (1 + NormalDist().inv_cdf(q) * cv)


def erlang_c(n: int, a: float) -> float:
    """Probability that an arrival waits in an M/M/n queue with offered load ``a`` (Erlangs)."""
    if n <= 0:
        return 1.0
    if a <= 0:
        return 0.0
    if a >= n:
        return 1.0
    # Erlang B by its stable recurrence, then C from B
    b = 1.0
    for i in range(1, n + 1):
        b = a * b / (i + a * b)
    rho = a / n
    return b / (1 - rho + rho * b)


def wait_quantile(n: int, rate: float, service_s: float, cv: float = 1.0, q: float = 0.95) -> float:
    """The q-quantile of the waiting time (seconds) at ``n`` workers, M/G/n approximation."""
    if rate <= 0 or service_s <= 0:
        return 0.0
    a = rate * service_s
    if a >= n:
        return math.inf
    c = erlang_c(n, a)
    if c <= 1 - q:
        return 0.0
    decay = (n / service_s - rate) * 2.0 / (1.0 + cv * cv)  # 1/s
    return math.log(c / (1 - q)) / decay


def response_quantile(n: int, rate: float, service_s: float, cv: float = 1.0, q: float = 0.95) -> float:
    """The q-quantile of one task's time at the stage: its service p-q plus the wait's."""
    return _service_quantile(service_s, cv, q) + wait_quantile(n, rate, service_s, cv, q)


def workers_for(rate: float, service_s: float, budget_s: float, *, cv: float = 1.0, q: float = 0.95,
                max_util: float = 0.95, limit: int = MAX_WORKERS) -> int | None:
    """The fewest workers with which the stage's q-response fits ``budget_s`` and no worker is busier
    than ``max_util``; None if the service time alone overruns the budget or ``limit`` does not
    suffice. At zero rate: 0 workers (a floor is the policy's business)."""
    if rate <= 0 or service_s <= 0:
        return 0
    if _service_quantile(service_s, cv, q) > budget_s:
        return None
    n = max(1, math.ceil(rate * service_s / max_util - 1e-9))
    while n <= limit:
        if response_quantile(n, rate, service_s, cv, q) <= budget_s:
            return n
        n += 1
    return None


@dataclass(frozen=True)
class Sizing:
    """What :func:`choose_width` chose: ``workers`` of ``width`` GPU slots each, ``meets`` the budget."""

    width: int
    workers: int
    meets: bool
    service_s: float  # one task's mean time at this width

    @property
    def slots(self) -> int:
        return self.width * self.workers


def sizing(rate: float, service_s1: float, budget_s: float, width: int, efficiency: float = 1.0, *,
           cv: float = 1.0, q: float = 0.95, max_util: float = 0.95, max_workers: int = MAX_WORKERS,
           floor: int = 1) -> Sizing | None:
    """Workers of ``width`` slots (at that ``efficiency``) meeting ``budget_s``, at least ``floor``;
    None where :func:`workers_for` finds no count within ``max_workers``."""
    s = service_s1 / (width * efficiency)
    n = workers_for(rate, s, budget_s, cv=cv, q=q, max_util=max_util, limit=max_workers)
    return None if n is None else Sizing(width, max(n, floor), True, s)


def choose_width(rate: float, service_s1: float, budget_s: float, efficiency: Mapping[int, float] | None = None,
                 *, cv: float = 1.0, q: float = 0.95, max_util: float = 0.95, max_slots: int = MAX_WORKERS,
                 floor: int = 1) -> Sizing:
    """The width (from ``efficiency``, k -> parallel efficiency; {1: 1.0} if None) and worker count
    that meet ``budget_s`` at ``rate`` with the fewest slots, at least ``floor`` workers; the wider
    width on a tie. ``service_s1`` is one task's mean time on one slot."""
    eff = dict(efficiency or {1: 1.0})
    eff.setdefault(1, 1.0)
    best: Sizing | None = None
    for k in sorted(eff):
        e = eff[k]
        if k < 1 or not 0 < e <= 1.0 + 1e-9 or k > max_slots:
            continue
        cand = sizing(rate, service_s1, budget_s, k, e, cv=cv, q=q, max_util=max_util,
                      max_workers=max(1, max_slots // k), floor=floor)
        if cand is None or cand.slots > max_slots:
            continue
        if best is None or cand.slots < best.slots or (cand.slots == best.slots and k > best.width):
            best = cand
    if best is not None:
        return best
    # nothing meets the budget: the most capacity per slot (the narrowest among the most efficient)
    k = min(sorted(eff), key=lambda k: (-eff[k], k))
    s = service_s1 / (k * eff[k])
    n = max(floor, math.ceil(rate * s / max_util - 1e-9)) if rate > 0 else floor
    return Sizing(k, n, False, s)


def stage_budgets(slo_s: float, means: Mapping[str, float], after: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """Split a workflow's p95 objective over its stages: each gets ``slo_s x mean / L``, ``L`` the
    mean time of the longest path (stages in parallel branches get the same proportion of their
    own, shorter path, which leaves them slack). ``after`` maps a stage to its upstream stages."""
    if slo_s <= 0:
        raise ValueError(f"slo_s must be > 0, not {slo_s!r}")
    longest: dict[str, float] = {}

    def reach(s: str, seen: tuple[str, ...] = ()) -> float:
        if s in seen:
            raise ValueError(f"stage {s!r} is on a cycle")
        if s not in longest:
            longest[s] = means[s] + max((reach(u, seen + (s,)) for u in after.get(s, ())), default=0.0)
        return longest[s]

    total = max((reach(s) for s in means), default=0.0)
    if total <= 0:
        return {s: slo_s for s in means}
    return {s: slo_s * means[s] / total for s in means}


@dataclass(frozen=True)
class Objective:
    """A workflow's ``[slo]`` as the policy sees it: the p95 in seconds and its stage graph
    (stage -> the stages it runs after), plain data so the policy need not load workflows."""

    p95_s: float
    after: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        if not (isinstance(self.p95_s, (int, float)) and math.isfinite(self.p95_s) and self.p95_s > 0):
            raise ValueError(f"p95_s must be seconds > 0, not {self.p95_s!r}")
        stray = {u for ups in self.after.values() for u in ups} - set(self.after)
        if stray:
            raise ValueError(f"stages run after unknown stage(s) {sorted(stray)}")


def objective_budgets(objectives: Mapping[str, Objective], means: Mapping[str, float]) -> dict[str, float]:
    """Each stage's budget from the objectives of the workflows it serves (the tightest of them),
    split by :func:`stage_budgets` over the measured ``means``. A workflow with a stage whose
    time is not known yet (no task finished) gives no budgets until it is: its split would be a
    guess."""
    out: dict[str, float] = {}
    for obj in objectives.values():
        if not all(means.get(s, 0.0) > 0 for s in obj.after):
            continue
        for s, b in stage_budgets(obj.p95_s, {s: means[s] for s in obj.after}, obj.after).items():
            out[s] = min(b, out.get(s, math.inf))
    return out

