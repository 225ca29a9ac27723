"""manager/slo.py: the latency objective turned into workers and widths, checked back to back."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manager.slo import choose_width, erlang_c, response_quantile, stage_budgets, wait_quantile, workers_for

EFF = {1: 1.0, 2: 1.0, 4: 0.926, 8: 0.705}  # stages/profiles/wan_i2v_480p.toml, denoise


def test_erlang_c_known_values():
    # M/M/1: the probability of waiting is the utilisation
    assert erlang_c(1, 0.7) == pytest.approx(0.7)
    # a textbook M/M/2 at 1.5 Erlangs: C = 0.6428...
    assert erlang_c(2, 1.5) == pytest.approx(0.642857, rel=1e-5)
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(3, 5.0) == 1.0
    assert erlang_c(4, 0.0) == 0.0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), a=st.floats(0.0, 80.0))
def test_erlang_c_is_a_probability_that_falls_with_workers(n, a):
    c = erlang_c(n, a)
    assert 0.0 <= c <= 1.0
    assert erlang_c(n + 1, a) <= c + 1e-12
    if a >= n:
        assert c == 1.0


def test_wait_quantile_edges():
    assert wait_quantile(2, 1.0, 3.0) == math.inf  # 3 Erlangs on 2 workers: no steady state
    assert wait_quantile(10, 0.01, 1.0) == 0.0  # waiting rarer than 5 %
    # M/M/1 at rho 0.5, S 1 s: P(W > t) = 0.5 exp(-0.5 t); p95 = ln(10) / 0.5
    assert wait_quantile(1, 0.5, 1.0, cv=1.0) == pytest.approx(math.log(10) / 0.5)
    # deterministic-ish service halves the tail (Allen-Cunneen)
    assert wait_quantile(1, 0.5, 1.0, cv=0.0) == pytest.approx(math.log(10) / 0.5 / 2)


@settings(max_examples=150, deadline=None)
@given(rate=st.floats(1e-4, 0.2), s=st.floats(1.0, 400.0), slack=st.floats(1.2, 4.0), cv=st.floats(0.0, 1.0))
def test_workers_for_meets_the_budget_and_is_monotone(rate, s, slack, cv):
    budget = s * (1 + 1.6449 * cv) * slack
    n = workers_for(rate, s, budget, cv=cv)
    assert n is not None
    assert n >= rate * s / 0.95 - 1e-9  # never busier than allowed
    assert response_quantile(n, rate, s, cv) <= budget
    if n > max(1, math.ceil(rate * s / 0.95 - 1e-9)):  # the fewest: one fewer misses
        assert response_quantile(n - 1, rate, s, cv) > budget
    assert workers_for(rate * 1.5, s, budget, cv=cv) >= n
    assert workers_for(rate, s, budget * 1.5, cv=cv) <= n


def test_workers_for_refuses_what_no_count_can_meet():
    assert workers_for(0.01, 400.0, 300.0, cv=0.0) is None  # the task alone overruns the budget
    assert workers_for(0.0, 400.0, 300.0) == 0


def test_choose_width_fewest_slots_then_widest():
    s1, budget = 358.6, 590.0
    low = choose_width(5 / 3600, s1, budget, EFF, cv=0.03)
    # one worker at k=1 would wait too long at 5 jobs/h, so it is two slots either way: the wider wins
    assert (low.width, low.workers, low.meets) == (2, 1, True)
    for rate_h in (5, 20, 80, 160):
        pick = choose_width(rate_h / 3600, s1, budget, EFF, cv=0.03)
        narrow = workers_for(rate_h / 3600, s1, budget, cv=0.03)
        assert pick.meets and pick.slots <= narrow
        assert pick.width in EFF


def test_choose_width_widens_only_when_the_objective_needs_it():
    s1 = 358.6
    # a budget shorter than one task at k=1 is met only by a wider worker
    tight = choose_width(2 / 3600, s1, 250.0, EFF, cv=0.03)
    assert tight.meets and tight.width >= 2
    # an impossible budget never widens: the most capacity per slot, k = 1 here (2 ties, narrower)
    hopeless = choose_width(2 / 3600, s1, 10.0, EFF, cv=0.03)
    assert not hopeless.meets and hopeless.width == 1
    # no table: width 1
    assert choose_width(0.01, 10.0, 100.0).width == 1


def test_stage_budgets_split_the_longest_path():
    means = {"text": 1.0, "image": 0.15, "dit": 358.6, "vae": 4.2, "mp4": 1.5}
    after = {"dit": ["text", "image"], "vae": ["dit"], "mp4": ["vae"]}
    b = stage_budgets(600.0, means, after)
    longest = 1.0 + 358.6 + 4.2 + 1.5
    assert b["dit"] == pytest.approx(600 * 358.6 / longest)
    assert sum(b[s] for s in ("text", "dit", "vae", "mp4")) == pytest.approx(600.0)
    with pytest.raises(ValueError, match="cycle"):
        stage_budgets(600.0, {"a": 1.0, "b": 1.0}, {"a": ["b"], "b": ["a"]})
    with pytest.raises(ValueError):
        stage_budgets(0.0, means, after)


def test_a_large_pool_of_long_tasks_runs_hotter_than_the_fixed_target():
    # 160 jobs/h of 358.6 s: 80 % utilisation asks for 20 workers; a 580 s p95 is met with fewer
    rate, s = 160 / 3600, 358.6
    assert workers_for(rate, s, 580.0, cv=0.03) < math.ceil(rate * s / 0.8)


# -- objectives: a workflow's [slo] split over measured stage times ---------------------------


def test_objective_budgets_split_each_workflow_and_keep_the_tightest_for_a_shared_stage():
    from manager.slo import Objective, objective_budgets

    i2v = Objective(600.0, {"enc": (), "img": (), "dit": ("enc", "img"), "dec": ("dit",)})
    t2v = Objective(750.0, {"enc": (), "dit2": ("enc",), "dec": ("dit2",)})
    means = {"enc": 1.0, "img": 0.5, "dit": 360.0, "dec": 9.0, "dit2": 360.0}
    b = objective_budgets({"i2v": i2v, "t2v": t2v}, means)
    # i2v's longest path enc -> dit -> dec is 370 s; t2v's 370 s too, with a looser objective
    assert b["dit"] == pytest.approx(600.0 * 360 / 370) and b["dit2"] == pytest.approx(750.0 * 360 / 370)
    assert b["dec"] == pytest.approx(min(600.0, 750.0) * 9 / 370)  # shared: the tighter workflow's
    assert b["img"] == pytest.approx(600.0 * 0.5 / 370)
    # a stage of t2v without a measured time yet: t2v gives no budgets, i2v still does
    b2 = objective_budgets({"i2v": i2v, "t2v": t2v}, {**means, "dit2": 0.0})
    assert "dit2" not in b2 and b2["dec"] == pytest.approx(600.0 * 9 / 370)


def test_an_objective_is_checked():
    from manager.slo import Objective

    with pytest.raises(ValueError, match="p95_s must be seconds > 0"):
        Objective(0.0, {"a": ()})
    with pytest.raises(ValueError, match="unknown stage"):
        Objective(60.0, {"a": ("b",)})
