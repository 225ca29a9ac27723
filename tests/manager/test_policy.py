"""The allocation policies on recorded and simulated signals, back to back: no processes, no sleeps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manager.policy import (Change, NoScaling, PolicyConfig, PolicyError, ProportionalPolicy, StageSignals,
                            StaticPolicy)

from .sim import StageState, World

P = 5.0  # period


def ideal(rate: float, service: float, util: float = 0.8) -> int:
    return max(1, math.ceil(rate * service / util - 1e-9))


def churn(log: list[list[Change]]) -> int:
    return sum(abs(c.delta) for changes in log for c in changes)


def per_stage(log: list[list[Change]], stage: str) -> list[int]:
    """Net change of ``stage`` at each decision."""
    return [sum(c.delta for c in changes if c.stage == stage) for changes in log]


def reversals(deltas: list[int]) -> int:
    signs = [1 if d > 0 else -1 for d in deltas if d]
    return sum(1 for a, b in zip(signs, signs[1:]) if a != b)


def sig(stage: str, **kw) -> StageSignals:
    kw.setdefault("gpu", True)
    return StageSignals(stage, **kw)


# -- steady load ----------------------------------------------------------------------------


def test_steady_recorded_load_settles_then_changes_nothing():
    world = World({"a": StageState(1.0, 2.0), "b": StageState(0.5, 1.0),
                   "c": StageState(2.0, 0.2, gpu=False)}, gpu_slots=8, cpu_slots=2, noise=False)
    policy = ProportionalPolicy()
    log = world.run(policy, 120)
    assert churn(log[12:]) == 0, [c for cs in log[12:] for c in cs]
    assert world.counts() == {"a": ideal(1.0, 2.0), "b": 1, "c": 1}
    assert policy.targets == world.counts()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rate,service", [(1.0, 2.0), (0.2, 10.0), (4.0, 0.5)])
def test_steady_poisson_load_does_not_flap(seed, rate, service):
    world = World({"a": StageState(rate, service), "b": StageState(1.0, 0.5)}, gpu_slots=12, seed=seed)
    log = world.run(ProportionalPolicy(), 220)
    late = log[20:]
    assert churn(late) <= 4, [c for cs in late for c in cs]
    # a reversal (up then down, or down then up) never follows within ten periods
    for stage in ("a", "b"):
        moves = [(i, d) for i, d in enumerate(per_stage(late, stage)) if d]
        for (i, d), (j, e) in zip(moves, moves[1:]):
            assert d * e > 0 or j - i > 10, f"{stage} flapped: {moves}"
    assert ideal(rate, service) <= world.counts()["a"] <= ideal(rate, service) + 1


# -- spikes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("up_delay", [1, 2])
def test_a_spike_scales_up_after_the_up_delay_capped_per_period(up_delay):
    cfg = PolicyConfig(up_delay_periods=up_delay, max_changes_per_period=2)
    world = World({"a": StageState(0.2, 2.0), "b": StageState(0.2, 1.0)}, gpu_slots=16, noise=False)
    policy = ProportionalPolicy(cfg)
    assert churn(world.run(policy, 30)[5:]) == 0
    world.stages["a"].rate = 2.0  # ten times the load: about 5 workers
    log, wanting = [], []
    for _ in range(20):
        log.append(world.step(policy)[1])
        wanting.append(policy.memory["a"].up_since is not None or bool(log[-1]))
    wanted_from = wanting.index(True)
    first = next(i for i, changes in enumerate(log) if changes)
    assert first == wanted_from + up_delay, log[: first + 1]
    assert all(churn([changes]) <= cfg.max_changes_per_period for changes in log)
    assert all(d >= 0 for d in per_stage(log, "a")), "scaled down during a spike"
    assert world.counts()["a"] >= ideal(2.0, 2.0)
    assert world.counts()["b"] == 1


def test_a_spike_that_ends_is_given_back_only_after_the_down_delay():
    cfg = PolicyConfig(down_delay_periods=3)
    world = World({"a": StageState(2.0, 2.0)}, gpu_slots=16, noise=False)
    policy = ProportionalPolicy(cfg)
    world.run(policy, 40)
    peak = world.counts()["a"]
    world.stages["a"].rate = 0.2
    log = world.run(policy, 80)
    downs = [i for i, d in enumerate(per_stage(log, "a")) if d < 0]
    assert downs and downs[0] >= cfg.down_delay_periods
    assert all(b - a >= cfg.down_delay_periods for a, b in zip(downs, downs[1:])), downs
    assert all(d <= 0 for d in per_stage(log, "a")) and reversals(per_stage(log, "a")) == 0
    assert world.counts()["a"] == 1 < peak


# -- a change in the mix --------------------------------------------------------------------


def test_a_step_change_in_the_mix_moves_capacity_and_settles():
    world = World({"a": StageState(1.6, 2.0), "b": StageState(0.4, 2.0)}, gpu_slots=4, noise=False)
    policy = ProportionalPolicy()
    world.run(policy, 40)
    assert world.counts() == {"a": 3, "b": 1}  # demand 4 + 1 > 4 slots: floors, then 3:0 of the rest
    world.stages["a"].rate, world.stages["b"].rate = 0.4, 1.6  # the mix flips
    log = world.run(policy, 60)
    changed = [i for i, changes in enumerate(log) if changes]
    assert changed, "nothing moved"
    assert changed[-1] - changed[0] <= 3, [(i, log[i]) for i in changed]
    assert world.counts() == {"a": 1, "b": 3}
    for stage in ("a", "b"):
        assert reversals(per_stage(log, stage)) <= 1
    moves = [c for changes in log for c in changes]
    assert all("slot moves to b" in c.reason for c in moves if c.stage == "a")
    assert all(churn([changes]) <= policy.config.max_changes_per_period for changes in log)


def test_one_pool_serves_many_workflows_and_moves_dit_capacity_between_them_as_the_mix_shifts():
    """wan_i2v and wan_t2v on one pool: the stages they share (text_encode, vae_decode) see the
    load of both, pooled, and their DiTs (denoise, denoise_t2v) trade workers when the mix of
    the two workflows flips, at the same total arrival rate: the shared stages do not move."""
    total = 0.8  # jobs/s over both workflows

    def rates(i2v_share: float) -> dict[str, float]:
        i2v, t2v = total * i2v_share, total * (1 - i2v_share)
        return {"text_encode": i2v + t2v, "image_encode": i2v, "denoise": i2v, "denoise_t2v": t2v,
                "vae_decode": i2v + t2v}

    service = {"text_encode": 0.4, "image_encode": 0.2, "denoise": 9.0, "denoise_t2v": 9.0, "vae_decode": 0.9}
    world = World({s: StageState(r, service[s]) for s, r in rates(0.75).items()}, gpu_slots=12, noise=False)
    policy = ProportionalPolicy()
    world.run(policy, 40)
    before = world.counts()
    assert before["denoise"] > before["denoise_t2v"]
    for s, r in rates(0.25).items():  # the mix flips: mostly text-to-video now
        world.stages[s].rate = r
    log = world.run(policy, 80)
    after = world.counts()
    assert after["denoise_t2v"] > after["denoise"]
    # the DiT capacity followed the mix: text-to-video has what image-to-video had, but for the one
    # worker the dead band (rate bounds two deviations wide) may leave with the incumbent, and
    # image-to-video keeps no more than its new load needs at the target utilisation
    i2v_need = math.ceil(total * 0.25 * service["denoise"] / policy.config.target_utilization)
    assert after["denoise_t2v"] >= before["denoise"] - 1 and after["denoise"] <= i2v_need, (before, after)
    for shared in ("text_encode", "vae_decode"):  # their pooled load did not change: no churn
        assert per_stage(log, shared) == [0] * len(log), shared
    for dit in ("denoise", "denoise_t2v"):
        assert reversals(per_stage(log, dit)) <= 1
    assert sum(world.counts().values()) <= 12


def test_with_free_slots_a_new_mix_is_served_at_once_and_the_old_one_given_back_slowly():
    world = World({"a": StageState(1.6, 2.0), "b": StageState(0.4, 2.0)}, gpu_slots=8, noise=False)
    policy = ProportionalPolicy()
    world.run(policy, 40)
    world.stages["a"].rate, world.stages["b"].rate = 0.4, 1.6
    log = world.run(policy, 60)
    b_ups = [i for i, d in enumerate(per_stage(log, "b")) if d]
    assert b_ups and b_ups[-1] - b_ups[0] <= 3 and world.counts()["b"] == ideal(1.6, 2.0)
    a = per_stage(log, "a")
    assert all(d <= 0 for d in a) and a.index(-1) > b_ups[-1]  # a gives back only once sure
    assert 1 <= world.counts()["a"] <= 2


def test_a_move_happens_only_when_its_gain_outweighs_the_load_cost():
    def signals(load_time: float) -> dict[str, StageSignals]:
        # 4 slots, none free. a has 3 workers for a demand of 2.75; b has 1 for a demand of 5:
        # the fair split is 2 and 2, and a's survivors could not absorb its load by scaling down
        return {"a": sig("a", arrival_rate=1.1, service_time=2.0, workers=3, busy=3),
                "b": sig("b", arrival_rate=2.0, service_time=2.0, workers=1, busy=1, queue_len=4,
                         queue_wait=6.0, load_time=load_time)}

    def moves(load_time: float) -> list[Change]:
        policy = ProportionalPolicy(PolicyConfig(default_floor=1))
        out = []
        for k in range(8):  # the same signals, period after period
            out += policy.decide(k * P, signals(load_time), 4, 0)
        return out

    cheap = moves(load_time=20.0)
    assert [c.delta for c in cheap if c.stage == "b"][:1] == [1]
    assert any(c.stage == "a" and c.delta == -1 and "moves to b" in c.reason for c in cheap)
    assert "gain" in next(c.reason for c in cheap if c.stage == "b")
    # a worker that takes 20 minutes to load is not worth moving for a few minutes' imbalance
    assert moves(load_time=1200.0) == []


# -- going idle ------------------------------------------------------------------------------


def test_an_idle_stage_scales_down_only_while_the_survivors_absorb_its_load():
    cfg = PolicyConfig(down_delay_periods=3)
    world = World({"a": StageState(2.0, 2.0), "b": StageState(0.5, 1.0)}, gpu_slots=12, noise=False)
    policy = ProportionalPolicy(cfg)
    world.run(policy, 30)
    world.stages["a"].rate = 0.6  # 1.2 busy workers: two survivors are the least that stay under 60%
    log = world.run(policy, 100)
    n = world.counts()["a"]
    assert n == 3, n  # at 2: 1.2 / 1 survivor would be 120% busy; at 3, 1.2 (+ noise bound) / 2 > 60%
    for i, changes in enumerate(log):
        for c in changes:
            assert c.stage != "a" or c.delta < 0
    assert per_stage(log, "b") == [0] * len(log)


@pytest.mark.parametrize("floor", [0, 1])
def test_a_stage_that_goes_idle_goes_to_its_floor_to_zero_only_after_a_cold_start_worth(floor):
    load_time = 40.0  # 8 periods: longer than the down delay
    cfg = PolicyConfig(floors={"a": floor}, down_delay_periods=3)
    world = World({"a": StageState(0.3, 2.0, load_time=load_time), "b": StageState(0.3, 1.0)}, gpu_slots=4,
                  noise=False)
    policy = ProportionalPolicy(cfg)
    world.run(policy, 30)
    assert world.counts()["a"] == 1
    world.stages["a"].rate = 0.0
    log = world.run(policy, 30)
    downs = [i for i, d in enumerate(per_stage(log, "a")) if d]
    if floor == 1:
        assert downs == [] and world.counts()["a"] == 1
    else:
        # the first idle reading starts the clock; it must run for max(down delay, load time)
        assert downs == [math.ceil(load_time / P)], downs
        assert "idle" in next(c.reason for cs in log for c in cs if c.stage == "a")
        assert world.counts()["a"] == 0


def test_a_job_for_a_stage_at_zero_starts_a_worker_at_once():
    cfg = PolicyConfig(floors={"a": 0}, up_delay_periods=3)
    policy = ProportionalPolicy(cfg)
    quiet = {"a": sig("a", load_time=30.0), "b": sig("b", workers=1)}
    assert policy.decide(0.0, quiet, 2, 0) == []
    queued = {"a": sig("a", queue_len=1, queue_wait=0.2, arrival_rate=0.2, load_time=30.0),
              "b": sig("b", workers=1)}
    (change,) = policy.decide(1.0, queued, 2, 0)  # early, not a whole period later: no delay either
    assert change.stage == "a" and change.delta == 1 and "cold start" in change.reason


def test_a_cold_start_takes_a_slot_from_a_stage_above_its_floor_when_the_pool_is_full():
    policy = ProportionalPolicy(PolicyConfig(floors={"a": 0}))
    full = {"a": sig("a", queue_len=2, queue_wait=1.0), "b": sig("b", workers=3, busy=1, service_time=1.0,
                                                                   arrival_rate=0.5)}
    changes = policy.decide(0.0, full, 3, 0)
    assert sorted((c.stage, c.delta) for c in changes) == [("a", 1), ("b", -1)]


# -- failures ------------------------------------------------------------------------------


def test_a_dead_worker_is_replaced():
    world = World({"a": StageState(1.0, 2.0), "b": StageState(0.5, 1.0)}, gpu_slots=8, noise=False)
    policy = ProportionalPolicy()
    world.run(policy, 20)
    have = world.counts()
    world.stages["a"].workers -= 1  # it died: the broker no longer lists it
    log = world.run(policy, 5)
    assert world.counts() == have
    assert sum(per_stage(log, "a")) == 1
    world.stages["b"].workers -= 1  # below its floor: replaced at the next decision, no delay
    (changes,) = world.run(policy, 1)
    assert [(c.stage, c.delta) for c in changes] == [("b", 1)] and "floor" in changes[0].reason


def test_floor_restoration_is_not_capped():
    policy = ProportionalPolicy(PolicyConfig(max_changes_per_period=1))
    empty = {s: sig(s) for s in "abcd"}
    changes = policy.decide(0.0, empty, 4, 0)
    assert sorted((c.stage, c.delta) for c in changes) == [(s, 1) for s in "abcd"]


# -- a short pool ---------------------------------------------------------------------------


def test_a_short_pool_is_split_in_proportion_to_demand_and_floors_are_kept():
    world = World({"a": StageState(3.2, 2.0), "b": StageState(1.6, 2.0), "c": StageState(0.0, 1.0),
                   "d": StageState(3.0, 1.0, gpu=False)}, gpu_slots=6, cpu_slots=2, noise=False)
    policy = ProportionalPolicy()
    world.run(policy, 60)
    got = world.counts()
    # demand a=8, b=4 workers; c keeps its floor; 6 - 3 floors = 3 split 7:3 -> a 1+2, b 1+1
    assert (got["a"], got["b"], got["c"]) == (3, 2, 1)
    assert got["d"] == 2  # the CPU pool is separate
    assert policy.targets["a"] == 3


def test_floors_that_do_not_fit_are_refused_clearly():
    policy = ProportionalPolicy(PolicyConfig(floors={"a": 2, "b": 2}))
    with pytest.raises(PolicyError, match=r"floors need 4 GPU slots \(a=2, b=2\) but the pool has 3"):
        policy.decide(0.0, {"a": sig("a"), "b": sig("b")}, 3, 0)
    starved = ProportionalPolicy(PolicyConfig(floors={"a": 0, "b": 2}))
    with pytest.raises(PolicyError, match="a have floor 0 but the other floors fill all 2 GPU slots"):
        starved.decide(0.0, {"a": sig("a"), "b": sig("b")}, 2, 0)
    with pytest.raises(PolicyError, match="target_utilization"):
        PolicyConfig(target_utilization=1.5)
    with pytest.raises(PolicyError, match="ceiling 1 is below its floor 2"):
        PolicyConfig(floors={"a": 2}, ceilings={"a": 1})


def test_ceilings_are_kept():
    world = World({"a": StageState(4.0, 2.0)}, gpu_slots=16, noise=False)
    policy = ProportionalPolicy(PolicyConfig(ceilings={"a": 3}))
    world.run(policy, 30)
    assert world.counts()["a"] == 3


# -- the null and static policies ----------------------------------------------------------------


def test_no_scaling_keeps_what_it_is_given():
    policy = NoScaling()
    assert policy.decide(0.0, {"a": sig("a", queue_len=9), "b": sig("b", workers=5)}, 2, 0) == []
    assert dict(policy.targets) == {}


def test_static_policy_holds_its_targets_within_free_slots():
    policy = StaticPolicy({"a": 2, "b": 1})
    changes = policy.decide(0.0, {"a": sig("a"), "b": sig("b", workers=3), "c": sig("c", workers=1)}, 4, 0)
    # b drains 2 (their slots free only when they exit), a gets the one free slot now
    assert [(c.stage, c.delta) for c in changes] == [("b", -2)]
    after = {"a": sig("a"), "b": sig("b", workers=1), "c": sig("c", workers=1)}
    assert [(c.stage, c.delta) for c in policy.decide(1.0, after, 4, 0)] == [("a", 2)]
    policy.targets["a"] = 1
    settled = {"a": sig("a", workers=2), "b": sig("b", workers=1), "c": sig("c", workers=1)}
    assert [(c.stage, c.delta) for c in policy.decide(2.0, settled, 4, 0)] == [("a", -1)]
    with pytest.raises(PolicyError, match="static targets need 5 GPU slots"):
        StaticPolicy({"a": 3, "b": 2}).decide(0.0, after, 4, 0)


# -- properties --------------------------------------------------------------------------------

stage_load = st.tuples(st.floats(0.0, 3.0), st.sampled_from([0.0, 0.5, 2.0, 8.0]), st.integers(0, 1))
floors = st.dictionaries(st.sampled_from("abcd"), st.integers(0, 2), max_size=4)


@settings(max_examples=60, deadline=None)
@given(loads=st.lists(st.dictionaries(st.sampled_from("abcd"), stage_load, min_size=4, max_size=4), min_size=1,
                      max_size=12),
       floors=floors, gpu_slots=st.integers(3, 9), cpu_slots=st.integers(3, 6),
       deaths=st.lists(st.sampled_from("abcd"), max_size=6), seed=st.integers(0, 1000))
def test_decisions_never_exceed_slots_never_go_below_floors_and_respect_the_cap(loads, floors, gpu_slots,
                                                                                  cpu_slots, deaths, seed):
    gpu = {"a": True, "b": True, "c": False, "d": True}
    world = World({s: StageState(0.0, 1.0, gpu=gpu[s], load_time=10.0) for s in "abcd"}, gpu_slots=gpu_slots,
                  cpu_slots=cpu_slots, seed=seed, load_periods=2)
    cfg = PolicyConfig(floors=floors, max_changes_per_period=2, down_delay_periods=1)
    policy = ProportionalPolicy(cfg)
    for period, load in enumerate(loads * 3):
        for s, (rate, service, _) in load.items():
            world.stages[s].rate, world.stages[s].service = rate, service
        if deaths and period % 3 == 1:
            victim = world.stages[deaths.pop()]
            victim.workers = max(0, victim.workers - 1)
        signals = world.signals()
        try:
            changes = policy.decide(world.t, signals, gpu_slots, cpu_slots)
        except PolicyError:
            # only floors that cannot fit are refused
            for pool, slots in ((True, gpu_slots), (False, cpu_slots)):
                names = [s for s in "abcd" if gpu[s] == pool]
                fl = [cfg.floor(s) for s in names]
                if sum(fl) > slots or (0 in fl and sum(fl) == slots):
                    return
            raise
        world.apply(changes)
        world.t += P
        deficit = 0
        for pool, slots in ((True, gpu_slots), (False, cpu_slots)):
            names = [s for s in "abcd" if gpu[s] == pool]
            after = {s: signals[s].current + sum(c.delta for c in changes if c.stage == s) for s in names}
            ups = sum(c.delta for c in changes if c.stage in names and c.delta > 0)
            downs = -sum(c.delta for c in changes if c.stage in names and c.delta < 0)
            free = max(0, slots - sum(signals[s].held for s in names))
            assert ups <= free + downs, (signals, changes)  # every start has a slot, now or once one drains
            assert sum(after.values()) <= slots
            for s in names:
                floor = cfg.floor(s) or (1 if signals[s].queue_len else 0)
                assert after[s] >= min(cfg.floor(s), signals[s].current), (s, signals[s], changes)
                deficit += max(0, floor - signals[s].current)
        for c in changes:
            assert c.delta != 0 and c.reason
            if c.delta < 0:
                assert -c.delta <= signals[c.stage].workers  # only live workers are drained
        assert churn([changes]) <= cfg.max_changes_per_period + 2 * deficit, (signals, changes)


def test_which_stages_start_on_demand():
    assert ProportionalPolicy(PolicyConfig(floors={"a": 0})).on_demand("a")
    assert not ProportionalPolicy(PolicyConfig(floors={"a": 0})).on_demand("b")
    assert not NoScaling().on_demand("a") and not StaticPolicy({"a": 0}).on_demand("a")


# -- latency objectives and elastic width (manager/slo.py) ------------------------------------

DIT_EFF = {1: 1.0, 2: 1.0, 4: 0.926, 8: 0.705}


def slo_policy(**kw) -> ProportionalPolicy:
    kw.setdefault("budgets", {"dit": 580.0})
    kw.setdefault("service_cv", {"dit": 0.03})
    return ProportionalPolicy(PolicyConfig(**kw))


def replay(policy, signals_at, periods: int, slots: int = 64) -> list[list[Change]]:
    return [policy.decide(i * P, {"dit": signals_at(i)}, slots, 4) for i in range(periods)]


def test_slo_sizing_asks_for_the_workers_the_objective_needs():
    from manager.slo import workers_for

    rate, s = 80 / 3600, 358.6
    policy = slo_policy()
    log = replay(policy, lambda i: sig("dit", arrival_rate=rate, service_time=s, workers=1, busy=1, load_time=49.0),
                 1440)
    want = workers_for(rate, s, 580.0, cv=0.03)
    # the signals keep saying "1 worker": the policy keeps asking for the rest, never more than the
    # objective's count (it scales up on the rate's lower bound, so it may stop one short of it)
    assert want - 1 <= policy.targets["dit"] <= want
    assert 0 < max(per_stage(log, "dit")) <= want - 1  # from 1 worker up to the objective's count


def test_slo_stage_scales_down_only_when_survivors_meet_a_tighter_budget():
    rate, s = 40 / 3600, 358.6
    policy = slo_policy()
    n = 12  # far more than 40 jobs/h needs
    log = replay(policy, lambda i: sig("dit", arrival_rate=rate, service_time=s, workers=n, busy=4, load_time=49.0),
                 1440)
    downs = [c for cs in log for c in cs if c.delta < 0]
    assert downs and all("survivor(s) of width 1 would meet" in c.reason for c in downs)
    assert all(c.delta == -1 for c in downs)  # one at a time


def test_width_changes_only_after_the_delay_and_starts_wider_workers():
    policy = slo_policy(sp_efficiency={"dit": DIT_EFF})
    rate = 5 / 3600  # two k=1 workers or one k=2 worker meet 580 s: the same slots, the wider wins
    log = replay(policy, lambda i: sig("dit", arrival_rate=rate, service_time=358.6, workers=2, load_time=49.0),
                 3, slots=16)
    assert all(c.width == 1 for cs in log for c in cs)  # no re-form before down_delay_periods has held
    # a tie in slots does not re-form: it must save a slot over the whole plausible rate
    log = replay(policy, lambda i: sig("dit", arrival_rate=rate, service_time=358.6, workers=2, load_time=49.0),
                 40, slots=16)
    assert policy.widths["dit"] == 1


def test_width_reforms_when_it_saves_a_slot():
    # 358.6 s at k=1 cannot meet a 300 s budget at any count; k=2 (179 s) can: re-form to 2
    policy = slo_policy(budgets={"dit": 300.0}, sp_efficiency={"dit": DIT_EFF})
    rate = 10 / 3600
    changes = []
    for i in range(1440):
        changes += policy.decide(i * P, {"dit": sig("dit", arrival_rate=rate, service_time=358.6, workers=3,
                                                    load_time=49.0)}, 16, 4)
        if policy.widths.get("dit", 1) != 1:
            break
    assert policy.widths["dit"] >= 2
    start = [c for c in changes if c.delta > 0 and c.width == policy.widths["dit"]]
    # start-first: the new width's workers start into free slots, the old ones stay until the caller replaces them
    assert start and not [c for c in changes if c.delta < 0]
    # the same decision with no room for a new worker (3 of 4 slots held, a width-2 worker needs 2)
    # drains the old workers first
    policy2 = slo_policy(budgets={"dit": 300.0}, sp_efficiency={"dit": DIT_EFF})
    drained = []
    for i in range(1440):
        drained += policy2.decide(i * P, {"dit": sig("dit", arrival_rate=rate, service_time=358.6, workers=3,
                                                     load_time=49.0)}, 4, 4)
        if drained:
            break
    assert [c for c in drained if c.delta == -3 and "re-form" in c.reason]


def test_wide_workers_count_their_slots():
    # a stage of width-4 workers holds 4 slots each: with 8 slots and 2 such workers, nothing is free
    policy = ProportionalPolicy(PolicyConfig(default_floor=1))
    out = policy.decide(0.0, {"dit": sig("dit", workers=2, width=4, busy=2, queue_len=5, arrival_rate=1.0,
                                         service_time=10.0),
                              "vae": sig("vae", workers=0, arrival_rate=0.0)}, 8, 4)
    # vae is below its floor; the only way is to take slots from dit, which frees 4
    assert [c for c in out if c.stage == "vae" and c.delta == 1]
    assert [c for c in out if c.stage == "dit" and c.delta == -1]


def test_slo_config_is_checked():
    with pytest.raises(PolicyError, match="budget"):
        PolicyConfig(budgets={"dit": 0})
    with pytest.raises(PolicyError, match="sp_efficiency"):
        PolicyConfig(sp_efficiency={"dit": {3: 1.5}})
    with pytest.raises(PolicyError, match="slo_quantile"):
        PolicyConfig(slo_quantile=1.0)
    with pytest.raises(PolicyError, match="rate_max_window_s"):
        PolicyConfig(rate_window_s=600.0, rate_max_window_s=300.0)


# -- video rates: a few arrivals a minute ----------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_steady_video_rate_is_read_from_enough_arrivals_and_does_not_flap(seed):
    """100 jobs/h of 6-minute DiT tasks, Poisson: two minutes hold ~3 arrivals. The policy must
    read the rate from twenty of them (not from whatever two minutes hold), climb to what the
    objective needs, and then hold still instead of chasing the noise for hours."""
    from manager.slo import workers_for

    rate, s = 100 / 3600, 360.0
    world = World({"dit": StageState(rate, s, load_time=45.0)}, gpu_slots=64, seed=seed, load_periods=9)
    policy = slo_policy(budgets={"dit": 600.0})
    world.run(policy, 720)  # an hour to find its count
    log = world.run(policy, 2160)  # three steady hours
    deltas = per_stage(log, "dit")
    # (a two-minute window read the rate from ~3 arrivals: 18 to 33 reversals and 128 to 173
    # workers started or drained in these three hours, seeds 1 to 6)
    assert reversals(deltas) <= 3, [(i, c) for i, cs in enumerate(log) for c in cs]
    assert sum(abs(d) for d in deltas) <= 16, deltas
    want = workers_for(rate, s, 600.0, cv=0.03)
    assert want - 1 <= world.counts()["dit"] <= want + 3, (world.counts(), want)


def test_a_queue_the_objective_expects_adds_no_worker_and_a_surge_does():
    # 14 workers of 360 s for a 600 s budget: a queue of 6 starts within 360 x 6 / 14 = 154 s, inside
    # the 240 s of slack (a worker per queued task would have asked for 16); 40 queued would not
    policy = slo_policy(budgets={"dit": 600.0})
    calm = dict(arrival_rate=100 / 3600, service_time=360.0, workers=14, busy=14, load_time=45.0)
    out = [c for i in range(60) for c in policy.decide(i * P, {"dit": sig("dit", queue_len=6, **calm)}, 64, 4)]
    assert not [c for c in out if c.delta > 0], out
    surge = policy.decide(60 * P, {"dit": sig("dit", queue_len=40, **calm)}, 64, 4)
    surge += policy.decide(61 * P, {"dit": sig("dit", queue_len=40, **calm)}, 64, 4)
    assert sum(c.delta for c in surge if c.delta > 0) >= 2, surge


@pytest.mark.parametrize("load_time, reforms", [(45.0, False), (5.0, True)])
def test_a_width_reforms_only_when_its_saving_pays_for_the_reloads(load_time, reforms):
    """Twelve 2-wide slots against fourteen 1-wide ones save 2. Re-forming re-loads every worker:
    2 x 45 s x 12 slots over a 300 s horizon is 3.6 slots, more than it saves, so the width stays
    (it used to re-form for any slot, and flapped on rounding); with 5 s loads it pays and happens.
    The rate is known exactly here (rate_sigmas 0): this is the width rule alone."""
    from manager.slo import sizing

    eff = {1: 1.0, 2: 1.0}
    policy = slo_policy(budgets={"dit": 450.0}, sp_efficiency={"dit": eff}, rate_sigmas=0.0)
    rate, s1 = 100 / 3600, 360.0
    one, two = sizing(rate, s1, 450.0, 1, 1.0, cv=0.03), sizing(rate, s1, 450.0, 2, 1.0, cv=0.03)
    assert (one.slots, two.slots) == (14, 12)
    log = replay(policy, lambda i: sig("dit", arrival_rate=rate, service_time=s1, workers=one.workers, busy=10,
                                       load_time=load_time), 720)
    assert (policy.widths["dit"] == 2) is reforms
    assert bool([c for cs in log for c in cs if c.width == 2]) is reforms


def test_a_workflows_objective_sizes_its_stages_once_their_times_are_measured():
    """No budgets given: the policy splits the workflow's p95 over the measured stage times
    (enc 10 s, dit 360 s: dit gets 600 x 360 / 370 s) and sizes dit to it; before dit has a
    time it has no split to make, and a queue asks one worker at a time."""
    from manager.slo import Objective, workers_for

    obj = Objective(600.0, {"enc": (), "dit": ("enc",)})
    rate = 100 / 3600
    policy = ProportionalPolicy(PolicyConfig(objectives={"wf": obj}, service_cv={"dit": 0.03}))
    unknown = policy.decide(0.0, {"enc": sig("enc", service_time=10.0, workers=1),
                                  "dit": sig("dit", queue_len=3, workers=1, busy=1)}, 64, 4)
    assert sum(c.delta for c in unknown if c.stage == "dit") <= 1 and "dit" not in policy.budgets
    for i in range(1, 721):
        policy.decide(i * P, {"enc": sig("enc", arrival_rate=rate, service_time=10.0, workers=1, busy=0),
                              "dit": sig("dit", arrival_rate=rate, service_time=360.0, workers=1, busy=1,
                                         load_time=45.0)}, 64, 4)
    assert policy.budgets["dit"] == pytest.approx(600.0 * 360 / 370)
    want = workers_for(rate, 360.0, 600.0 * 360 / 370, cv=0.03)
    assert want - 1 <= policy.targets["dit"] <= want + 1, (policy.targets, want)
