"""bench/elastic_sim.py: the discrete-event model the GPU-hours benchmark runs on, driven by the
real policy and packing. The GPUs are modelled (this machine has none); the tests check the
model's bookkeeping, not timings."""

from __future__ import annotations

import json
import random

import pytest

from bench import elastic
from bench.elastic_sim import Deployment, monolithic, simulate, split
from manager.packing import plan
from manager.profile import load_profile


def poisson(rate_h: float, hours: float, wf: str = "wan_i2v", seed: int = 3):
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate_h / 3600)
        if t >= hours * 3600:
            return out
        out.append((t, wf, "standard"))


def test_static_split_holds_its_packed_gpus_and_finishes_every_job():
    prof = load_profile("wan_i2v_480p")
    stages, flows = split([prof])
    alloc = {s: 1 for s in stages} | {"denoise": 6}
    arr = poisson(30, 2)
    r = simulate(Deployment("static", stages, flows, static=alloc, gpus=32), arr, horizon_s=7200, seed=1)
    needs = [(s, stages[s].need) for s, n in alloc.items() for _ in range(n) if stages[s].need]
    held = plan(needs, [80.0] * 32, max_load=1.0).held
    assert held == 7  # six DiT GPUs and one GPU shared by the four small stages
    assert r.gpu_seconds == pytest.approx(held * 7200)
    assert r.jobs == len(arr) and r.unfinished["wan_i2v"] == 0
    assert min(r.latencies["wan_i2v"]) > 358.6 * 0.8  # at least a denoise (cv 0.03)
    assert r.attainment("wan_i2v") == 1.0


def test_small_stages_beside_a_dit_save_their_gpu_when_the_pool_allows_it():
    """max_load 1.2: the four small stages (0.05 each) sit beside DiTs where memory allows, so the
    allocation of the test above holds its six DiT GPUs and no seventh."""
    prof = load_profile("wan_i2v_480p")
    stages, flows = split([prof])
    alloc = {s: 1 for s in stages} | {"denoise": 6}
    arr = poisson(30, 2)
    r = simulate(Deployment("beside", stages, flows, static=alloc, gpus=32, max_load=1.2), arr,
                 horizon_s=7200, seed=1)
    assert r.gpu_seconds == pytest.approx(6 * 7200)
    assert r.jobs == len(arr) and r.unfinished["wan_i2v"] == 0


def test_workers_busy_on_one_gpu_share_it_in_equal_parts():
    """Two workers of a one-stage workflow packed on one GPU: a task alone takes its time; two at
    once each take twice as long (processor sharing), and the one left alone speeds up again."""
    from bench.elastic_sim import SimStage, SimWorkflow
    from manager.packing import StageNeed

    stage = SimStage("s", True, {"w:standard": 100.0}, 1e-9, 0.0, StageNeed(1.0, 1.0, 0.05))
    flows = {"w": SimWorkflow("w", {"s": ()}, "s", 1e9)}
    dep = Deployment("ps", {"s": stage}, flows, static={"s": 2}, gpus=2)
    alone = simulate(dep, [(0.0, "w", "standard")], horizon_s=1000, seed=1)
    assert alone.peak_gpus == 1 and alone.latencies["w"] == [pytest.approx(100.0, rel=1e-6)]
    two = simulate(dep, [(0.0, "w", "standard"), (0.0, "w", "standard")], horizon_s=1000, seed=1)
    assert two.latencies["w"] == [pytest.approx(200.0, rel=1e-6)] * 2
    # the second starts half-way through the first: 50 s alone, then both at half speed until the
    # first is done (100 s more), then the second alone (its last 50 s)
    staggered = simulate(dep, [(0.0, "w", "standard"), (50.0, "w", "standard")], horizon_s=1000, seed=1)
    assert staggered.latencies["w"] == [pytest.approx(150.0, rel=1e-6), pytest.approx(150.0, rel=1e-6)]


def test_monolithic_pipelines_take_whole_gpus():
    prof = load_profile("wan_i2v_480p")
    stages, flows = monolithic([prof], {"wan_i2v": 8})
    r = simulate(Deployment("sp8", stages, flows, static={"wan_i2v.pipeline": 2}, gpus=32), poisson(20, 1),
                 horizon_s=3600, seed=1)
    assert r.peak_gpus == 16 and r.gpu_seconds == pytest.approx(16 * 3600)
    assert r.pct("wan_i2v", 50) == pytest.approx(prof.pipeline_mean_s(8), rel=0.1)


def test_the_manager_follows_the_load_up_and_back_to_its_floors():
    prof = load_profile("wan_i2v_480p")
    stages, flows = split([prof])
    cfg = elastic.policy_config(stages, flows)
    # an hour at 100 jobs/h, then an hour idle: the manager scales up, then down to its floors
    arr = poisson(100, 1)
    r = simulate(Deployment("managed", stages, flows, policy=cfg, gpus=64), arr, horizon_s=2 * 3600, seed=2)
    assert r.unfinished["wan_i2v"] == 0 and r.jobs == len(arr)
    held = [h for _, h, _ in r.timeline]
    assert max(held) >= 8  # ~10 DiT workers at the peak
    assert held[-1] == 2  # floors: one DiT GPU, one shared by the small stages
    drains = [c for c in r.changes if c[1] == "denoise" and c[2] < 0]
    assert drains, "the denoise stage never scaled down"
    assert r.attainment("wan_i2v") >= 0.9


def test_quick_benchmark_writes_the_issue_json(tmp_path):
    out = tmp_path / "e.json"
    assert elastic.main(["--quick", "--json", str(out), "--plots", str(tmp_path / "plots")]) == 0
    data = json.loads(out.read_text())
    names = [c["name"] for c in data["configs"]]
    assert {"monolithic peak sp=1", "monolithic peak sp=8", "monolithic autoscaled sp=1", "OnePiece static",
            "OnePiece managed"} <= set(names)
    for c in data["configs"]:
        assert set(c["slo_attainment"]) == {"wan_i2v", "wan_t2v", "wan22_i2v"}
        assert c["gpu_slot_hours"] > 0
    assert set(data["ratios"]) >= {"vs_best_monolithic_autoscaled", "vs_monolithic_peak_sp8", "vs_monolithic_peak_sp1"}
    assert data["traces"]["mix"]["decomposition"][-1]["mechanisms_on"] == list(elastic.MECHANISMS)
