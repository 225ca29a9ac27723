"""manager.packing: the invariants under random sequences of places and removes (hypothesis),
then worked examples with the shipped Wan profiles on 80 GB GPUs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manager.packing import GpuPool, StageNeed, Worker, capacity, declared_need, plan
from manager.profile import load_profile

EPS = 1e-9

sizes = st.lists(st.sampled_from([16.0, 24.0, 40.0, 80.0, 141.0]), min_size=1, max_size=5)


@st.composite
def needs(draw):
    memory = draw(st.floats(0.0, 60.0, allow_nan=False))
    peak = memory + draw(st.floats(0.1, 60.0, allow_nan=False))
    return StageNeed(memory, peak, draw(st.floats(0.0, 1.0, allow_nan=False)))


# an op: ("place", stage, need) or ("remove", index into the placed workers)
ops = st.lists(st.one_of(st.tuples(st.just("place"), st.sampled_from("abcd"), needs()),
                         st.tuples(st.just("remove"), st.integers(0, 50))), max_size=40)


def check_invariants(pool: GpuPool, placed: list[Worker]) -> None:
    for g, size in enumerate(pool.sizes_gb):
        assert pool.peak_gb(g) <= size + EPS, f"GPU {g} over-committed"  # 1
        if pool.max_load is not None:
            assert pool.load(g) <= pool.max_load + EPS  # 2
    on = [w for g in range(len(pool.sizes_gb)) for w in pool.workers(g)]
    assert sorted(map(id, on)) == sorted(map(id, placed))  # 3: each placed worker on exactly one GPU
    assert all(w in pool.workers(pool.gpu_of(w)) for w in placed)
    assert pool.held() == sum(1 for g in range(len(pool.sizes_gb)) if pool.workers(g))  # 4


@settings(max_examples=300, deadline=None)
@given(sizes, st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0])), ops)
def test_invariants_hold_after_every_place_and_remove(sizes_gb, max_load, steps):
    pool = GpuPool(sizes_gb, max_load=max_load)
    placed: list[Worker] = []
    for op in steps:
        if op[0] == "place":
            w = Worker(op[1], op[2])
            room = [g for g in range(len(sizes_gb)) if pool.fits(g, w.need)]
            left = {g: sizes_gb[g] - pool.peak_gb(g) - w.need.peak_gb for g in room}  # free after placing
            gpu = pool.place(w)
            if gpu is None:
                assert room == [] and pool.gpu_of(w) is None  # refused only when no GPU has room
            else:
                # best fit: no GPU with room would have been left tighter; ties to the lowest index
                assert gpu == min(room, key=lambda g: (left[g], g))
                placed.append(w)
        elif placed:
            w = placed.pop(op[1] % len(placed))
            before = [(pool.peak_gb(g), pool.memory_gb(g), pool.load(g)) for g in range(len(sizes_gb))]
            gpu = pool.remove(w)
            after = [(pool.peak_gb(g), pool.memory_gb(g), pool.load(g)) for g in range(len(sizes_gb))]
            for g in range(len(sizes_gb)):  # 5: exactly its memory, on its GPU only
                freed = (w.need.peak_gb, w.need.memory_gb, w.need.load) if g == gpu else (0.0, 0.0, 0.0)
                assert after[g] == pytest.approx(tuple(b - f for b, f in zip(before[g], freed)), abs=1e-6)
        check_invariants(pool, placed)


@settings(max_examples=200, deadline=None)
@given(sizes, st.one_of(st.none(), st.just(1.0)), st.lists(st.tuples(st.sampled_from("abcd"), needs()), max_size=12))
def test_a_plan_never_over_commits_and_is_deterministic(sizes_gb, max_load, demands):
    p = plan(demands, sizes_gb, max_load=max_load)
    assert p == plan(demands, sizes_gb, max_load=max_load)
    assert len(p.gpus) == len(demands)
    for g, size in enumerate(sizes_gb):
        assert sum(n.peak_gb for (_, n), pg in zip(demands, p.gpus) if pg == g) <= size + EPS
    assert p.held == len({g for g in p.gpus if g is not None})
    assert p.fits == (None not in p.gpus)


def test_remove_of_a_worker_that_is_not_placed_says_so():
    pool = GpuPool([80.0])
    with pytest.raises(KeyError, match="'a' is on no GPU"):
        pool.remove(Worker("a", StageNeed(1.0, 2.0)))


def test_declarations_that_cannot_be_packed_are_refused():
    with pytest.raises(ValueError, match="peak_gb 1.0 is below memory_gb 2.0"):
        StageNeed(2.0, 1.0)
    with pytest.raises(ValueError, match="peak_gb must be a finite number > 0"):
        StageNeed(0.0, 0.0)
    with pytest.raises(ValueError, match="GPU memory sizes"):
        GpuPool([80.0, 0.0])


def test_small_workers_share_a_used_gpu_so_that_a_big_one_finds_a_whole_one():
    pool = GpuPool([80.0, 80.0])
    small = [Worker(s, StageNeed(5.0, 10.0)) for s in "abc"]
    assert [pool.place(w) for w in small] == [0, 0, 0]  # best fit: beside each other, not spread
    assert pool.held() == 1 and pool.peak_gb(0) == 30.0 and pool.memory_gb(0) == 15.0
    big = Worker("big", StageNeed(40.0, 60.0))
    assert pool.place(big) == 1 and pool.held() == 2
    assert pool.place(Worker("big", StageNeed(40.0, 60.0))) is None  # no GPU has 60 GB of peak left
    pool.remove(small[0])
    assert pool.peak_gb(0) == 20.0 and pool.choose(StageNeed(40.0, 60.0)) == 0  # its memory is free again


# -- the shipped profiles on 80 GB GPUs -------------------------------------------------------------


def profile_needs(name: str, busiest: str, working_set_gb: float | None = None) -> dict[str, StageNeed]:
    """The GPU stages of a profile as packing needs. load: the share of time a worker is busy
    when it feeds one worker of the busiest stage (which is then busy all the time)."""
    prof = load_profile(name)
    out = {}
    for s, p in prof.stages.items():
        if p.gpu:
            peak = p.peak_gb if working_set_gb is None else p.memory_gb + working_set_gb
            out[s] = StageNeed(p.memory_gb, peak, min(1.0, p.mean_s / prof.stages[busiest].mean_s))
    return out


def test_wan_i2v_small_stages_share_one_gpu_and_each_denoiser_gets_its_own():
    n = profile_needs("wan_i2v_480p", "denoise")
    small = ["text_encode", "image_encode", "vae_encode", "vae_decode"]
    assert sum(n[s].peak_gb for s in small) == pytest.approx(34.1)  # 12.5 + 1.6 + 8.0 + 12.0
    demands = [("denoise", n["denoise"])] * 3 + [(s, n[s]) for s in small]
    p = plan(demands, [80.0] * 8, max_load=1.0)
    assert p.gpus == (0, 1, 2, 3, 3, 3, 3) and p.held == 4  # 3 denoisers alone, 4 small stages on 1 GPU
    # without a load limit memory alone decides: the small stages fill the gaps beside the
    # denoisers (58 + 12.5 <= 80), which is safe for memory but slows a denoiser down
    assert plan(demands, [80.0] * 8).held == 3
    # the live pool does what the plan says, whatever order the workers come in
    pool = GpuPool([80.0] * 8, max_load=1.0)
    assert [pool.place(Worker(s, need)) for s, need in reversed(demands)] == [0, 0, 0, 0, 1, 2, 3]
    assert pool.held() == 4


def test_wan22_experts_share_an_80gb_gpu_only_while_both_peaks_fit():
    n = profile_needs("wan22_i2v_480p", "denoise_low")
    high, low = n["denoise_high"], n["denoise_low"]
    assert high.peak_gb + low.peak_gb == pytest.approx(77.2)  # the profile's 10 GB working set: fits
    assert plan([("denoise_high", high), ("denoise_low", low)], [80.0]).fits
    # the 25.2 GB upper-bound working set the profile discusses: 2 x 53.8 GB > 80, never together
    big = profile_needs("wan22_i2v_480p", "denoise_low", working_set_gb=25.2)
    p = plan([("denoise_high", big["denoise_high"]), ("denoise_low", big["denoise_low"])], [80.0, 80.0])
    assert p.gpus == (0, 1)
    assert not plan([("denoise_high", big["denoise_high"]), ("denoise_low", big["denoise_low"])], [80.0]).fits
    # and with loads, a busy expert keeps its GPU to itself even where the memory would fit
    assert plan([("denoise_high", high), ("denoise_low", low)], [80.0, 80.0], max_load=1.0).gpus == (0, 1)


def test_capacity_counts_whole_rounds_of_one_worker_per_stage():
    needs_ = [("big", StageNeed(40.0, 60.0, 1.0))] + [(s, StageNeed(5.0, 10.0, 0.1)) for s in "abc"]
    # round 1: big alone on GPU 0 (load), a, b, c on GPU 1; round 2: no 60 GB of room left
    assert capacity(needs_, [80.0, 80.0], max_load=1.0) == 4
    assert capacity([], [80.0]) == 0
    assert capacity([("x", StageNeed(1.0, 100.0))], [80.0]) == 0


def test_a_profile_declares_its_gpu_stages_memory_for_the_manager():
    prof = load_profile("wan_i2v_480p")
    needs = prof.stage_needs()
    assert set(needs) == {s for s, p in prof.stages.items() if p.gpu} and "video_encode" not in needs
    assert needs["denoise"] == StageNeed(32.8, 58.0)
    stages = prof.split_workflow()["stages"]  # the synthetic split workflow carries them as stage options
    assert (stages["denoise"]["memory_gb"], stages["denoise"]["peak_gb"]) == (32.8, 58.0)
    assert "memory_gb" not in stages["video_encode"]


@pytest.mark.parametrize("names, dits", [(["wan_i2v"], {"denoise": 3}),
                                         (["wan_i2v", "wan_t2v", "wan22_i2v"],
                                          {"denoise": 2, "denoise_t2v": 2, "denoise_high": 1, "denoise_low": 2})])
def test_the_shipped_workflows_declarations_put_the_small_stages_on_one_gpu(names, dits):
    """What `onepiece up --gpu-memory-gb 80` does with the shipped Wan workflows: one worker of
    every small stage (shared across the workflows) on one GPU, each DiT worker alone (its load
    is 1.0), with the load limit the CLI sets (1 per GPU)."""
    from stages.workflow import load_workflow

    stages = {}
    for name in names:
        for s, spec in load_workflow(name).stages.items():
            if spec.gpu:
                stages[s] = declared_need(s, spec.options)
    small = [s for s in stages if s not in dits]
    demands = [(s, stages[s]) for s in small] + [(s, stages[s]) for s, n in dits.items() for _ in range(n)]
    placed = plan(demands, [80.0] * 16, max_load=1.0)
    assert placed.fits
    assert len({placed.gpus[i] for i, (s, _) in enumerate(demands) if s in small}) == 1
    assert placed.held == 1 + sum(dits.values())


def test_frees_says_whether_a_group_leaving_empties_its_gpus():
    pool = GpuPool([80.0, 80.0], max_load=1.2)
    dit, small, other = Worker("dit", StageNeed(32.8, 58.0, 1.0)), Worker("s", StageNeed(1.0, 10.0, 0.05)), \
        Worker("dit", StageNeed(32.8, 58.0, 1.0))
    assert [pool.place(w) for w in (dit, small, other)] == [0, 0, 1]
    assert pool.frees([other]) and pool.frees([dit, small])
    assert not pool.frees([dit]) and not pool.frees([small]) and not pool.frees([])
