"""Allocation policies of the Node Manager: signals in, changes out, no I/O.

A policy is asked once per control period (and early, when a stage with no
worker gets a queued task) how many workers each stage should gain or
lose. It reads :class:`StageSignals`, returns :class:`Change` objects, and
never sleeps, reads a clock or touches a process: ``now`` is passed in, so
the tests replay recorded signals back to back. The manager around it does
the starting and draining (``manager.service``).

Pools. A *slot* is one GPU (or, on a machine without GPUs, one CPU worker);
stages with ``gpu = false`` draw from a separate pool of CPU slots. A
worker holds its slot from launch until its process has exited, so a
draining worker still counts: ``used = workers + starting + draining``.

What :class:`ProportionalPolicy` does each period, per pool:

1. *Demand* of a stage, in workers: ``max(rho / target_utilization, rho +
   backlog)`` with ``rho = rate * service_time`` the offered load and
   ``backlog = queue_len * service_time / max(backlog_drain_s, load_time)``
   the capacity that drains the present queue within that horizon: the
   headroom under the target absorbs a small queue, a large one adds
   workers. ``rate`` counts arrivals over the shortest recent window that
   holds ``rate_min_arrivals`` (quick to follow a change); the policy scales
   *up* on the lower Poisson bound of the rate and *down* on the upper
   bound, each taken over that window and the whole ``rate_window_s``, so
   a move in either direction needs evidence, and noise alone moves
   nothing. Until a stage has finished a task its service time is unknown;
   then the demand is ``busy + 1`` if it has a queue, ``busy`` otherwise:
   one step at a time.
2. *Fair shares*. If the rounded-up demands fit in the pool, each stage's
   target is its demand. If not, every stage keeps its floor and the rest of
   the pool is split in proportion to demand above the floor (largest
   remainders), so a short pool slows every stage alike instead of starving
   the last one asked.
3. *Floors first*: a stage below its floor (at start-up, or after a worker
   died) gets workers at once, from free slots, else from the stage with
   the most surplus. A stage with floor 0 and a queued task has a floor of
   1 for that decision (scale from zero is a cold start, never a wait for
   a confirmation that would only add to it). Restoring a floor is not
   subject to the delays or the change cap: it restores an invariant, it is
   not a reaction to noisy load.
4. *Up*: a stage below its target that has wanted more for
   ``up_delay_periods`` gets a free slot; with none free, a slot is *moved*
   from a stage above its fair share, if that stage has been above it for
   ``down_delay_periods`` and the move's gain outweighs the model-load cost
   (below).
5. *Down*: one worker at a time, only once the survivors could absorb the
   load at ``scale_down_utilization`` or less, sustained for
   ``down_delay_periods``; to zero (floor 0) only after the stage has been
   idle (no arrivals, nothing queued or running) for that long *and* for
   ``idle_to_zero_load_times`` times its load time.
6. At most ``max_changes_per_period`` workers started or drained per
   decision (a move counts two), ups first.

Latency objectives. A stage with a budget (its share of a workflow's p95
objective, ``manager.slo.stage_budgets``) is sized by ``workers_for``: the
fewest workers whose p95 wait plus service fits the budget, instead of the
utilisation target. Its queue counts only past what that sizing expects:
the demand is at least ``queue_len * S / slack`` workers (``slack = budget -
S``: n workers free one every ``S/n`` seconds, so every queued task starts
within the slack), not a worker per queued task. It scales down only when
the survivors would meet a budget tightened by ``scale_down_utilization /
target_utilization`` at the upper rate. A stage with an ``sp_efficiency``
table also has a width (``manager.slo.choose_width``); it takes another only
if that saves slots at the lower bound, estimate and upper bound of the rate,
by at least one slot *and* by enough to pay for re-loading every new worker
(``move_gain_factor x load_time x new slots / move_horizon_s``, as for a
move), held for ``down_delay_periods``, at most once per ``move_horizon_s``.

Move gain. Moving one slot from stage X to stage Y over a horizon of
``move_horizon_s`` serves ``min(1, f_Y - n_Y) * H`` worker-seconds more at Y
and ``min(1, max(0, f_X - (n_X - 1))) * H`` less at X (``f`` the continuous
fair share, ``n`` the present count). The slot is dark while Y's model
loads, ``load_time_Y`` seconds. The move happens only if the net gain is
above ``move_gain_factor * load_time_Y``. A move and its reversal cannot
both pass this test on the same signals, so moves do not flap.

Defaults, and why:

- ``target_utilization = 0.8``: a multi-server queue's waiting time climbs
  steeply past 80-85% busy, and the headroom absorbs a burst for the time a
  new worker takes to load (tens of seconds for a 14B model).
- ``scale_down_utilization = 0.6``: a dead band below the 0.8 at which the
  policy scales up. Without it, a load that sits near a boundary, measured
  with Poisson noise, adds and removes a worker every few periods.
- ``rate_min_arrivals = 20``, ``rate_window_s = 120``, ``rate_max_window_s =
  1800``, ``rate_sigmas = 2``: a video workload sees few arrivals per period
  (a count of 5 is +-45% noise). Twenty arrivals (+-22%) is the least a rate
  is read from, so the long window spans two minutes *and* twenty arrivals
  (at 100 jobs/h that is twelve minutes; a window of two minutes alone held
  four, and the policy chased them), but never more than half an hour, past
  which a rate is stale. Scaling on bounds two deviations wide instead of the
  estimate widens the dead band by the noise that is really there: at one
  deviation, a window of twenty arrivals crosses its bound several times an
  hour by chance, and replayed Poisson traffic at video rates added and
  removed DiT workers all day (``bench/elastic.py``'s step: 8 reversals at
  one deviation, 1 at two, the same SLO attainment). A spike does not wait
  for the window, because the backlog term sees the queue at once.
- ``backlog_drain_s = 30``: a queue should be gone in about the time a
  small worker takes to start; never sooner than this stage's load time,
  since a worker started for a queue helps only once it has loaded.
- ``period_s = 5``: the manager's control period (``--period``); the delays
  below are counted in it.
- ``up_delay_periods = 1``, ``down_delay_periods = 3``: asymmetric, as in
  Kubernetes' HPA and Ray Serve. Under-provisioning costs latency that grows
  every second; over-provisioning costs an idle slot. Giving a worker back
  too early costs a model load if the load returns, so the way down waits
  three times as long. One period of confirmation on the way up keeps a
  single burst from starting a worker whose load outlasts the burst. Ray
  Serve and Dynamo both oscillated without such delays.
- ``max_changes_per_period = 2``: bounds churn (and the disk and PCIe
  traffic of many models loading at once); one move or two starts per
  period. Raise it for large pools.
- ``move_gain_factor = 2``, ``move_horizon_s = 300``: a move is assumed to
  pay off over five minutes, a time over which a traffic mix is stable, and
  must earn twice its load cost to allow for estimation error: a full
  worker of imbalance justifies a move whose load takes up to 150 s.
- ``idle_to_zero_load_times = 1``: keep an idle worker warm until the idle
  time equals one cold start (the ski-rental break-even: never worse than
  twice the better of "always warm" and "always cold").
- floors default to 1 per stage: every stage can take a job without a cold
  start; set 0 to allow scale to zero.

:class:`NoScaling` keeps what it is given, :class:`StaticPolicy` holds fixed
targets: the null and the simplest policies, for tests and fixed setups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from manager.slo import Objective, choose_width, objective_budgets, sizing, workers_for

__all__ = [
    "Change",
    "NoScaling",
    "Policy",
    "PolicyConfig",
    "PolicyError",
    "ProportionalPolicy",
    "StageSignals",
    "StaticPolicy",
]

_EPS = 1e-6
_JITTER = 0.1  # fraction of a period a reading may come early and still count


class PolicyError(ValueError):
    """A policy that cannot be carried out on this pool (e.g. its floors do not fit)."""


@dataclass(frozen=True)
class StageSignals:
    """What a policy knows about one stage at one decision."""

    stage: str
    gpu: bool = False
    arrival_rate: float = 0.0  # tasks/s over the interval since the last reading
    service_time: float = 0.0  # mean seconds per task (smoothed); 0 = unknown yet
    queue_len: int = 0
    queue_wait: float = 0.0  # seconds the oldest queued task has waited
    busy: int = 0  # workers with a task
    workers: int = 0  # registered, not draining
    starting: int = 0  # launched (or waiting for a slot), not registered yet
    draining: int = 0  # draining, still holding their slot until they exit
    load_time: float = 0.0  # seconds from launch to a registered worker
    width: int = 1  # GPU slots each worker of the stage holds (its sequence-parallel degree)
    held_slots: int = -1  # slots the stage holds, workers of an older width included; -1: held x width

    @property
    def slots(self) -> int:
        """Slots the stage holds (every width it has)."""
        return self.held_slots if self.held_slots >= 0 else self.held * self.width

    @property
    def current(self) -> int:
        """Workers the stage has or will have: live plus starting."""
        return self.workers + self.starting

    @property
    def held(self) -> int:
        """Slots the stage holds, draining workers included."""
        return self.workers + self.starting + self.draining

    def brief(self) -> dict:
        """The numbers a decision log line shows."""
        return {"rate": round(self.arrival_rate, 3), "service_s": round(self.service_time, 3),
                "queued": self.queue_len, "wait_s": round(self.queue_wait, 1), "busy": self.busy,
                "workers": self.workers, "starting": self.starting, "draining": self.draining,
                "load_s": round(self.load_time, 1)}


@dataclass(frozen=True)
class Change:
    """Start (``delta > 0``) or drain (``delta < 0``) workers of ``stage``."""

    stage: str
    delta: int
    reason: str  # human-readable, with the numbers that led to it
    width: int = 1  # GPU slots of each worker started (sequence-parallel degree); drains: any


@runtime_checkable
class Policy(Protocol):
    def decide(self, now: float, signals: Mapping[str, StageSignals], gpu_slots: int,
               cpu_slots: int) -> list[Change]:
        """The changes to make now. ``now`` is monotonic seconds; only differences matter."""

    @property
    def targets(self) -> Mapping[str, int]:
        """What the policy is steering each stage towards (empty if it has no aim)."""

    def on_demand(self, stage: str) -> bool:
        """True if the stage may sit at zero workers because a queued task makes the policy start one."""


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of :class:`ProportionalPolicy`; the module docstring explains the defaults."""

    floors: Mapping[str, int] = field(default_factory=dict)
    default_floor: int = 1
    ceilings: Mapping[str, int] = field(default_factory=dict)  # default: no ceiling but the pool
    period_s: float = 5.0
    target_utilization: float = 0.8
    scale_down_utilization: float = 0.6
    rate_window_s: float = 120.0
    rate_max_window_s: float = 1800.0
    rate_min_arrivals: int = 20
    rate_sigmas: float = 2.0
    backlog_drain_s: float = 30.0
    up_delay_periods: int = 1
    down_delay_periods: int = 3
    max_changes_per_period: int = 2
    move_gain_factor: float = 2.0
    move_horizon_s: float = 300.0
    idle_to_zero_load_times: float = 1.0
    # latency objectives (manager/slo.py): a stage with a budget is sized to meet it
    budgets: Mapping[str, float] = field(default_factory=dict)  # stage -> its share of a p95 objective, s
    # workflow -> its [slo] and stage graph: budgets split over the measured stage times (explicit
    # ``budgets`` win), so a served workflow's objective sizes its stages without a profile
    objectives: Mapping[str, Objective] = field(default_factory=dict)
    sp_efficiency: Mapping[str, Mapping[int, float]] = field(default_factory=dict)  # stage -> {width: eff}
    service_cv: Mapping[str, float] = field(default_factory=dict)  # stage -> cv of a task's time (default 1)
    slo_quantile: float = 0.95
    slo_max_utilization: float = 0.95

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> PolicyError:
            return PolicyError(f"{name} must be {rule}, not {getattr(self, name)!r}")

        for stage, n in {**self.floors, **self.ceilings}.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise PolicyError(f"floor/ceiling of stage {stage!r} must be an integer >= 0, not {n!r}")
        for stage, ceiling in self.ceilings.items():
            if ceiling < self.floor(stage):
                raise PolicyError(f"stage {stage!r}: ceiling {ceiling} is below its floor {self.floor(stage)}")
        if self.default_floor < 0:
            raise bad("default_floor", ">= 0")
        if self.period_s <= 0:
            raise bad("period_s", "> 0")
        if not 0 < self.target_utilization <= 1:
            raise bad("target_utilization", "in (0, 1]")
        if not 0 < self.scale_down_utilization <= self.target_utilization:
            raise bad("scale_down_utilization", f"in (0, target_utilization={self.target_utilization}]")
        if self.rate_window_s < 0:
            raise bad("rate_window_s", ">= 0")
        if self.rate_max_window_s < self.rate_window_s:
            raise bad("rate_max_window_s", f">= rate_window_s={self.rate_window_s}")
        if self.rate_min_arrivals < 1:
            raise bad("rate_min_arrivals", ">= 1")
        if self.rate_sigmas < 0:
            raise bad("rate_sigmas", ">= 0")
        if self.backlog_drain_s <= 0:
            raise bad("backlog_drain_s", "> 0")
        if self.up_delay_periods < 0:
            raise bad("up_delay_periods", ">= 0")
        if self.down_delay_periods < 0:
            raise bad("down_delay_periods", ">= 0")
        if self.max_changes_per_period < 1:
            raise bad("max_changes_per_period", ">= 1")
        if self.move_gain_factor < 0:
            raise bad("move_gain_factor", ">= 0")
        if self.move_horizon_s <= 0:
            raise bad("move_horizon_s", "> 0")
        if self.idle_to_zero_load_times < 0:
            raise bad("idle_to_zero_load_times", ">= 0")
        for stage, b in self.budgets.items():
            if not isinstance(b, (int, float)) or isinstance(b, bool) or not b > 0:
                raise PolicyError(f"budget of stage {stage!r} must be seconds > 0, not {b!r}")
        for stage, table in self.sp_efficiency.items():
            for k, e in table.items():
                if isinstance(k, bool) or not isinstance(k, int) or k < 1 or not 0 < e <= 1:
                    raise PolicyError(f"sp_efficiency of stage {stage!r}: width {k!r} -> {e!r} must be an "
                                      "integer >= 1 -> efficiency in (0, 1]")
        if not 0.5 <= self.slo_quantile < 1:
            raise bad("slo_quantile", "in [0.5, 1)")
        if not 0 < self.slo_max_utilization <= 1:
            raise bad("slo_max_utilization", "in (0, 1]")

    def floor(self, stage: str) -> int:
        return self.floors.get(stage, self.default_floor)

    def slo_terms(self, stage: str) -> dict:
        """How :mod:`manager.slo` sizes ``stage``: its task-time cv, the quantile, the utilisation cap."""
        return {"cv": self.service_cv.get(stage, 1.0), "q": self.slo_quantile, "max_util": self.slo_max_utilization}

    def ceiling(self, stage: str, pool: int) -> int:
        return min(self.ceilings.get(stage, pool), pool)


def _pools(signals: Mapping[str, StageSignals]) -> dict[bool, list[str]]:
    pools: dict[bool, list[str]] = {True: [], False: []}
    for name, s in signals.items():
        pools[s.gpu].append(name)
    return pools


def _free(signals: Mapping[str, StageSignals], names: list[str], slots: int) -> int:
    return max(0, slots - sum(signals[s].slots for s in names))


def _largest_remainder(shares: Mapping[str, float], total: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Integers that sum to ``total`` (or less if capped), close to ``shares``; ties in order."""
    out = {s: min(caps[s], math.floor(v + _EPS)) for s, v in shares.items()}
    left = total - sum(out.values())
    order = sorted(shares, key=lambda s: -(shares[s] - math.floor(shares[s] + _EPS)))
    while left > 0:
        grown = False
        for s in order:
            if left > 0 and out[s] < caps[s]:
                out[s] += 1
                left -= 1
                grown = True
        if not grown:
            break
    return out


# -- the null and the simplest policies ---------------------------------------------------


class NoScaling:
    """Keeps what it is given: never starts or drains anything."""

    targets: Mapping[str, int] = MappingProxyType({})

    def decide(self, now: float, signals: Mapping[str, StageSignals], gpu_slots: int,
               cpu_slots: int) -> list[Change]:
        return []

    def on_demand(self, stage: str) -> bool:
        return False


class StaticPolicy:
    """Hold each named stage at a fixed number of workers (others are left alone).

    ``targets`` is a plain dict: change an entry and the next decision
    follows it. Starts go only into free slots; a lowered target drains
    live workers at once.
    """

    def __init__(self, targets: Mapping[str, int]):
        for stage, n in targets.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise PolicyError(f"target of stage {stage!r} must be an integer >= 0, not {n!r}")
        self.targets: dict[str, int] = dict(targets)

    def on_demand(self, stage: str) -> bool:
        return False

    def decide(self, now: float, signals: Mapping[str, StageSignals], gpu_slots: int,
               cpu_slots: int) -> list[Change]:
        out: list[Change] = []
        for gpu, names in _pools(signals).items():
            slots = gpu_slots if gpu else cpu_slots
            named = [s for s in names if s in self.targets]
            need = sum(self.targets[s] for s in named)
            if need > slots:
                detail = ", ".join(f"{s}={self.targets[s]}" for s in named)
                raise PolicyError(f"static targets need {need} {'GPU' if gpu else 'CPU'} slots ({detail}) "
                                  f"but the pool has {slots}")
            free = _free(signals, names, slots)
            for s in named:
                sig, want = signals[s], self.targets[s]
                if want < sig.current:
                    n = min(sig.current - want, sig.workers)
                    if n:
                        out.append(Change(s, -n, f"static target {want}, has {sig.current}"))
                elif want > sig.current and free:
                    n = min(want - sig.current, free)
                    free -= n
                    out.append(Change(s, n, f"static target {want}, has {sig.current}"))
        return out


# -- the proportional policy ------------------------------------------------------------


@dataclass
class _Memory:
    """What the policy remembers of a stage between decisions (plain data)."""

    readings: list[tuple[float, float]] = field(default_factory=list)  # (seconds, arrivals), oldest first
    rate: float = 0.0  # estimated arrival rate, and its bounds
    rate_lo: float = 0.0
    rate_hi: float = 0.0
    rate_long: float = 0.0  # over the whole window
    up_since: float | None = None  # first reading of the present run of "wants more"
    down_since: float | None = None  # ... of "survivors could absorb the load"
    over_since: float | None = None  # ... of "above its fair share"
    width_want: int = 0  # the width the latency objective asks for, and since when
    width_since: float | None = None
    width_changed: float | None = None  # when the stage last took another width


@dataclass
class _View:
    """One stage, assessed at one decision."""

    sig: StageSignals
    floor: int  # effective: 1 for a floor-0 stage with a queue, if the pool allows
    ceiling: int
    demand: float  # workers, continuous
    desired: int
    fair: float = 0.0  # continuous share of the pool
    target: int = 0  # integer share
    want_up: bool = False
    want_down: bool = False
    donor_ok: bool = False  # over its share long enough to give a slot away
    why_down: str = ""
    n: int = 0  # count as decided so far this period
    removable: int = 0  # live workers not yet chosen for draining this period
    touched: bool = False
    w: int = 1  # GPU slots per worker of the width the stage runs at (or is re-formed to)
    reform: bool = False  # the stage's workers are of another width: replace them


class ProportionalPolicy:
    """Workers in proportion to offered load, within a fixed pool (see the module docstring)."""

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config or PolicyConfig()
        self.memory: dict[str, _Memory] = {}
        self.last_now: float | None = None
        self.targets: dict[str, int] = {}
        self.widths: dict[str, int] = {}  # the width each stage runs at (stages with an sp_efficiency table)
        self._budgets: dict[str, float] = dict(self.config.budgets)  # this decision's, from objectives too

    def on_demand(self, stage: str) -> bool:
        return self.config.floor(stage) == 0

    @property
    def budgets(self) -> Mapping[str, float]:
        """Each stage's share of its workflows' p95 objectives at the last decision, s."""
        return MappingProxyType(self._budgets)

    # -- the decision ---------------------------------------------------------------
    def decide(self, now: float, signals: Mapping[str, StageSignals], gpu_slots: int,
               cpu_slots: int) -> list[Change]:
        cfg = self.config
        dt = None if self.last_now is None else now - self.last_now
        self.last_now = now
        changes: list[Change] = []
        times = {s: sig.service_time for s, sig in signals.items()}
        self._budgets = {**objective_budgets(cfg.objectives, times), **cfg.budgets}
        budget = cfg.max_changes_per_period
        for gpu, names in _pools(signals).items():
            if not names:
                continue
            slots = gpu_slots if gpu else cpu_slots
            self._check_floors(names, slots, gpu)
            views = {s: self._assess(signals[s], now, dt, slots) for s in names}
            self._share(views, slots)
            for s, v in views.items():
                m = self.memory[s]
                over = v.sig.current > v.target
                m.over_since = (m.over_since if m.over_since is not None else now) if over else None
                v.donor_ok = over and self._held(m.over_since, now, cfg.down_delay_periods * cfg.period_s)
                self.targets[s] = v.target
            free = _free(signals, names, slots)
            self._reform(views, free, changes)
            free = self._restore_floors(views, free, changes)
            budget, free = self._scale_up(views, free, budget, changes)
            budget = self._scale_down(views, budget, changes)
        return changes

    # -- per stage ------------------------------------------------------------------
    def _assess(self, sig: StageSignals, now: float, dt: float | None, slots: int) -> _View:
        cfg = self.config
        m = self.memory.setdefault(sig.stage, _Memory())
        raw = max(0.0, sig.arrival_rate)
        self._estimate_rate(m, raw, dt)
        floor, ceiling = cfg.floor(sig.stage), cfg.ceiling(sig.stage, slots)
        budget = self._budgets.get(sig.stage)
        w, S = sig.width, sig.service_time
        if S > 0 and budget is not None:
            w, S = self._width(sig, m, now, budget, slots, floor)
            ceiling = min(ceiling, slots // w)
        reform = w != sig.width
        if S > 0:
            # the headroom under target_utilization absorbs a small queue; a larger one adds
            # the capacity that drains it within the horizon (no sooner than a worker can load)
            # (at most a worker per queued task: a task longer than the horizon cannot be split)
            backlog = min(float(sig.queue_len), sig.queue_len * S / max(cfg.backlog_drain_s, sig.load_time))

            if budget is not None:  # the fewest workers whose p95 fits the stage's budget
                # a queue is part of what that sizing expects; it calls for more only when the
                # workers there are could not start every queued task within the budget's slack
                # (n workers free one every S/n seconds); as many queue as the sizing expects, so
                # counting each queued task as a worker more would chase the noise it was sized for
                slack = max(budget - S, cfg.backlog_drain_s, sig.load_time)
                backlog = sig.queue_len * S / slack

                def need(rate: float, queue: float) -> float:
                    n = workers_for(rate, S, budget, limit=max(1, slots // w), **cfg.slo_terms(sig.stage))
                    if n is None:  # out of reach at this pool: as busy as allowed
                        n = rate * S / cfg.slo_max_utilization
                    return max(float(n), rate * S, queue)
            else:
                def need(rate: float, queue: float) -> float:
                    return max(rate * S / cfg.target_utilization, rate * S + queue)

            demand, demand_lo = need(m.rate, backlog), need(m.rate_lo, backlog)
            # what the load needs, queue aside, read over the whole window (the shortest window's
            # estimate stops at its twentieth arrival, so a clump reads high)
            steady = need(max(m.rate_lo, m.rate_long), 0.0)
            work_hi = m.rate_hi * S + (0.0 if budget is not None else backlog)
        else:  # nothing finished yet: all we know is who is busy and whether tasks wait
            demand = demand_lo = steady = sig.busy + (1.0 if sig.queue_len else 0.0)
            work_hi = float(sig.busy) + (1.0 if sig.queue_len else 0.0)
        # scale up on what the load surely is (the lower bound), down on what it may be (the upper)
        desired = max(floor, min(ceiling, math.ceil(demand_lo - _EPS)))
        if desired > (0 if reform else sig.current):
            # the evidence (the lower bound) says more are needed: go to what the estimated rate
            # needs, not to the bound, or a steady load settles two deviations short of its count
            # (the queue has had its say in the bound; counting it twice would overshoot)
            desired = max(desired, min(ceiling, math.ceil(steady - _EPS)))
        if sig.current == 0 and not sig.queue_len:
            desired = floor  # from zero, only a queued task starts a worker: past rates are stale there
        elif sig.queue_len and desired == 0 and ceiling > 0:
            desired = 1
        cur = 0 if reform else sig.current
        v = _View(sig, floor, ceiling, demand, desired, n=cur, removable=0 if reform else sig.workers, w=w,
                  reform=reform)
        if desired > cur:
            m.up_since = m.up_since if m.up_since is not None else now
            v.want_up = self._held(m.up_since, now, cfg.up_delay_periods * cfg.period_s)
        else:
            m.up_since = None
        absorb, hold = False, cfg.down_delay_periods * cfg.period_s
        if cur > floor and sig.workers >= 1 and not reform:
            survivors = cur - 1
            if survivors == 0:  # to zero: on the idle clock alone, whatever the long-run rate says
                absorb = sig.queue_len == 0 and sig.busy == 0 and raw == 0
                hold = max(hold, cfg.idle_to_zero_load_times * sig.load_time)
                v.why_down = (f"idle for {max(hold, cfg.period_s):.0f} s, floor {floor}; "
                              f"a cold start costs {sig.load_time:.1f} s")
            elif desired < cur and budget is not None:
                # the survivors meet a tighter budget (the same dead band as below) at the upper rate
                tight = budget * cfg.scale_down_utilization / cfg.target_utilization
                n_hi = workers_for(m.rate_hi, S, tight, limit=survivors, **cfg.slo_terms(sig.stage))
                util = work_hi / survivors
                absorb = n_hi is not None and n_hi <= survivors and util <= cfg.slo_max_utilization
                v.why_down = (f"{survivors} survivor(s) of width {w} would meet {tight:.0f} s at p"
                              f"{cfg.slo_quantile * 100:g} (rate <= {m.rate_hi:.4f}/s x {S:.1f} s, "
                              f"{util:.0%} busy; budget {budget:.0f} s)")
            elif desired < cur:
                util = work_hi / survivors
                absorb = util <= cfg.scale_down_utilization
                v.why_down = (f"{survivors} survivor(s) would be {util:.0%} busy at most "
                              f"(<= {cfg.scale_down_utilization:.0%}; rate <= {m.rate_hi:.3f}/s x {S:.2f} s, "
                              f"{sig.queue_len} queued)")
        if absorb:
            m.down_since = m.down_since if m.down_since is not None else now
            v.want_down = self._held(m.down_since, now, hold)
        else:
            m.down_since = None
        return v

    def _width(self, sig: StageSignals, m: _Memory, now: float, budget: float, slots: int,
               floor: int) -> tuple[int, float]:
        """The width the stage should run at, and a task's time there. A stage without an
        sp_efficiency table keeps its width. Another width is taken only if it meets the budget
        with at least one slot fewer than the present one would (or the present one cannot meet it
        at all), and only once that has held for ``down_delay_periods``: a re-form costs a model
        load, so it must not follow noise."""
        cfg = self.config
        table = cfg.sp_efficiency.get(sig.stage)
        if not table:
            return sig.width, sig.service_time
        cur = self.widths.get(sig.stage, sig.width)
        s1 = sig.service_time * sig.width * table.get(sig.width, 1.0)  # one task's time on one slot
        terms = cfg.slo_terms(sig.stage)

        def slots_at(rate: float, k: int) -> float:
            sz = sizing(rate, s1, budget, k, table.get(k, 1.0), max_workers=max(1, slots // k), floor=max(1, floor),
                        **terms)
            return math.inf if sz is None else sz.slots

        pick = choose_width(m.rate, s1, budget, table, max_slots=slots, floor=max(1, floor), **terms)
        want = cur
        dwell = m.width_changed is None or now - m.width_changed >= cfg.move_horizon_s
        if pick.width != cur and dwell:
            # better over the whole plausible range of the rate, and by enough to pay for the re-form:
            # every new worker loads its model (move_gain_factor x that, as for a move, over
            # move_horizon_s); a width that wins a slot only on the estimate's rounding would flap
            def pays(r: float) -> bool:
                new, old = slots_at(r, pick.width), slots_at(r, cur)
                cost = cfg.move_gain_factor * sig.load_time * new / cfg.move_horizon_s
                return new <= old - max(1.0, cost)

            # (a width that cannot meet the budget at the estimate at all gives way to one that can)
            hopeless = math.isinf(slots_at(m.rate, cur)) and not math.isinf(slots_at(m.rate, pick.width))
            better = hopeless or all(pays(r) for r in {m.rate_lo, m.rate, m.rate_hi})
            if better:
                if m.width_want != pick.width:
                    m.width_want, m.width_since = pick.width, now
                if self._held(m.width_since, now, cfg.down_delay_periods * cfg.period_s):
                    want, m.width_changed = pick.width, now
            else:
                m.width_want, m.width_since = 0, None
        else:
            m.width_want, m.width_since = 0, None
        self.widths[sig.stage] = want
        return want, s1 / (want * table.get(want, 1.0))

    def _estimate_rate(self, m: _Memory, raw: float, dt: float | None) -> None:
        """The arrival rate over the shortest recent window holding ``rate_min_arrivals`` (at least a
        period: quick to follow a change), and bounds at ``rate_sigmas`` Poisson deviations that
        hold over both that window and the whole ``rate_window_s`` (slow to believe a change)."""
        cfg = self.config
        if dt is None or dt <= 0:  # first reading: no interval to count over
            if not m.readings:
                m.rate = m.rate_lo = m.rate_hi = m.rate_long = raw
            return
        m.readings.append((dt, raw * dt))
        span = sum(d for d, _ in m.readings)
        total = sum(k for _, k in m.readings)
        # the long window: at least rate_window_s *and* rate_min_arrivals (at a few jobs a minute two
        # minutes hold a handful, +-50 % noise), never more than rate_max_window_s (stale)
        while len(m.readings) > 1:
            d0, k0 = m.readings[0]
            if span - d0 >= cfg.rate_max_window_s or (span - d0 >= cfg.rate_window_s
                                                      and total - k0 >= cfg.rate_min_arrivals):
                m.readings.pop(0)
                span, total = span - d0, total - k0
            else:
                break
        n = t = 0.0
        for d, k in reversed(m.readings):
            n, t = n + k, t + d
            if n >= cfg.rate_min_arrivals and t >= cfg.period_s * (1 - _JITTER):
                break
        k_short, k_long = cfg.rate_sigmas * math.sqrt(n), cfg.rate_sigmas * math.sqrt(total)
        m.rate = n / t
        m.rate_long = total / span
        m.rate_lo = max(0.0, (n - k_short) / t, (total - k_long) / span)
        m.rate_hi = max((n + k_short) / t, (total + k_long) / span)

    def _held(self, since: float | None, now: float, seconds: float) -> bool:
        return since is not None and now - since >= seconds - _JITTER * self.config.period_s

    # -- per pool -------------------------------------------------------------------
    def _check_floors(self, names: list[str], slots: int, gpu: bool) -> None:
        floors = {s: self.config.floor(s) for s in names}
        kind = "GPU" if gpu else "CPU"
        if sum(floors.values()) > slots:
            detail = ", ".join(f"{s}={n}" for s, n in floors.items() if n)
            raise PolicyError(f"the floors need {sum(floors.values())} {kind} slots ({detail}) but the pool has "
                              f"{slots}: lower a floor or add slots")
        zero = [s for s, n in floors.items() if n == 0]
        if zero and sum(floors.values()) == slots:
            raise PolicyError(f"stage(s) {', '.join(zero)} have floor 0 but the other floors fill all {slots} "
                              f"{kind} slots: they could never run")

    def _share(self, views: dict[str, _View], slots: int) -> None:
        """Continuous and integer fair shares; floor-0 stages with a queue get a floor of 1 while room lasts."""
        room = slots - sum(v.floor * v.w for v in views.values())
        for v in sorted(views.values(), key=lambda v: -v.sig.queue_wait):
            if room >= v.w and v.floor == 0 and v.sig.queue_len and v.ceiling > 0:
                v.floor, room = 1, room - v.w
        for v in views.values():
            v.desired = max(v.desired, v.floor)
        if sum(v.desired * v.w for v in views.values()) <= slots:
            for v in views.values():
                v.fair = min(v.ceiling, max(float(v.floor), v.demand))
                v.target = v.desired
            return
        # shares are of slots; a stage of wide workers gets whole workers of its share
        weights = {s: max(0.0, min(v.demand, v.ceiling) - v.floor) * v.w for s, v in views.items()}
        total = sum(weights.values())
        fair_slots = {}
        for s, v in views.items():
            extra = room * weights[s] / total if total > 0 else room / len(views)
            fair_slots[s] = min(float(v.ceiling * v.w), v.floor * v.w + extra)
            v.fair = fair_slots[s] / v.w
        shares = _largest_remainder(fair_slots, slots, {s: v.ceiling * v.w for s, v in views.items()})
        for s, v in views.items():
            v.target = max(v.floor, min(shares[s] // v.w, v.desired))
        # a share a stage does not want (its desire is below it) goes to those short of theirs,
        # the furthest below its fair share first: the pool is short, so no slot stays unassigned
        left = slots - sum(v.target * v.w for v in views.values())
        for v in sorted(views.values(), key=lambda v: v.target - v.fair):
            while left >= v.w and v.target < min(v.desired, v.ceiling):
                v.target, left = v.target + 1, left - v.w

    def _donor(self, views: dict[str, _View], taker: str, *, for_floor: bool) -> _View | None:
        """The stage to take a slot from: most surplus over its share, above its floor."""
        best, key = None, None
        for s, v in views.items():
            if s == taker or v.n <= v.floor or v.removable < 1:
                continue
            if not for_floor and (not v.donor_ok or v.n <= v.target):
                continue
            k = (v.n - v.target, v.n - v.floor)
            if key is None or k > key:
                best, key = v, k
        return best

    def _take(self, donor: _View, taker: _View, reason: str, changes: list[Change]) -> None:
        donor.n -= 1
        donor.removable -= 1
        donor.touched = True
        self.memory[donor.sig.stage].down_since = None
        changes.append(Change(donor.sig.stage, -1, f"slot moves to {taker.sig.stage}: {reason}"))

    def _reform(self, views: dict[str, _View], free: int, changes: list[Change]) -> None:
        """Stages whose workers are of another width than the one chosen: their new workers start
        like any (floors, then up), and the caller drains the old ones as the new ones come up. If
        not even one new worker fits, the old ones are drained first (their jobs hand off at a
        step boundary and wait for the new width's load)."""
        for s, v in views.items():
            if not v.reform:
                continue
            sig = v.sig
            if free < v.w and sig.workers:
                changes.append(Change(s, -sig.workers, f"re-form from width {sig.width} to {v.w}: "
                                      f"{free} slot(s) free, so the old workers drain first"))
                v.touched = True

    def _restore_floors(self, views: dict[str, _View], free: int, changes: list[Change]) -> int:
        for s, v in sorted(views.items(), key=lambda kv: -kv[1].sig.queue_wait):
            short = v.floor - v.n
            if short <= 0:
                continue
            sig = v.sig
            reason = (f"cold start: {sig.queue_len} queued, oldest {sig.queue_wait:.1f} s, no worker"
                      if v.n == 0 and sig.queue_len and self.config.floor(s) == 0
                      else f"below its floor {v.floor}: has {v.n}")
            got = 0
            while got < short:
                if free >= v.w:
                    free, got = free - v.w, got + 1
                    continue
                donor = self._donor(views, s, for_floor=True)
                if donor is None:
                    break
                self._take(donor, v, reason, changes)
                free += donor.w
            if got:
                v.n += got
                v.touched = True
                changes.append(Change(s, got, reason, width=v.w))
        return free

    def _scale_up(self, views: dict[str, _View], free: int, budget: int,
                  changes: list[Change]) -> tuple[int, int]:
        cfg = self.config
        order = sorted(views.items(), key=lambda kv: (-(kv[1].target - kv[1].n), -kv[1].sig.queue_wait))
        for s, v in order:
            if not v.want_up or v.n >= v.target:
                continue
            sig = v.sig
            m = self.memory[s]
            why = (f"demand {v.demand:.2f} workers (rate {m.rate:.3f}/s, >= {m.rate_lo:.3f}, x "
                   f"{sig.service_time:.2f} s; {sig.queue_len} queued, oldest {sig.queue_wait:.1f} s) > {v.n}; "
                   f"target {v.target}")
            started = 0
            while v.n < v.target and budget > 0 and free >= v.w:
                v.n, free, budget, started = v.n + 1, free - v.w, budget - 1, started + 1
            if started:
                changes.append(Change(s, started, why, width=v.w))
            while v.n < v.target and budget >= 2:
                donor = self._donor(views, s, for_floor=False)
                if donor is None or donor.w < v.w - free:  # a wide worker starts only where it fits
                    break
                gain_w = min(1.0, v.fair - v.n) - min(1.0, max(0.0, donor.fair - (donor.n - 1)))
                gain = gain_w * cfg.move_horizon_s
                cost = cfg.move_gain_factor * sig.load_time
                if gain <= cost:
                    break
                reason = (f"{why}; gain {gain:.0f} worker-s over {cfg.move_horizon_s:.0f} s > "
                          f"{cfg.move_gain_factor:g} x load {sig.load_time:.1f} s")
                self._take(donor, v, reason, changes)
                free += donor.w - v.w
                v.n += 1
                budget -= 2
                changes.append(Change(s, 1, f"slot from {donor.sig.stage}: {reason}", width=v.w))
            v.touched = v.touched or v.n > sig.current
        return budget, free

    def _scale_down(self, views: dict[str, _View], budget: int, changes: list[Change]) -> int:
        for s, v in views.items():
            if budget <= 0:
                break
            if not v.want_down or v.touched or v.removable < 1 or v.n <= v.floor:
                continue
            v.n -= 1
            budget -= 1
            self.memory[s].down_since = None  # the next step down waits its own delay
            changes.append(Change(s, -1, v.why_down))
        return budget
