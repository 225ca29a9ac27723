"""Stage profiles: the shipped Wan2.1 I2V and Wan2.2 A14B I2V profiles parse, cover their
workflows, their numbers add up, and the synthetic workflows built from them are valid."""

from __future__ import annotations

import math

import pytest

from manager.profile import (PIPELINE_STAGE, MonolithicVariant, ProfileError, available_profiles, load_profile,
                             profile_from_dict)
from stages.workflow import load_workflow, workflow_from_dict


@pytest.fixture(scope="module")
def profile():
    return load_profile("wan_i2v_480p")


def test_shipped_profile_parses(profile):
    assert "wan_i2v_480p" in available_profiles()
    assert profile.workflow == "wan_i2v"
    assert profile.job["frames"] == 81 and profile.job["steps"] == 40
    assert profile.parallel_stages == ("denoise",)
    assert profile.sp_degrees == (1, 8)


def test_every_stage_of_the_workflow_has_an_entry(profile):
    wf = load_workflow("wan_i2v")
    profile.check_workflow(wf)  # raises if a stage is missing or its gpu flag differs
    assert set(wf.stages) <= set(profile.stages)
    for name, stage in profile.stages.items():
        assert stage.mean_s > 0, name
        assert stage.gpu == wf.stages[name].gpu, name
    assert profile.stages["video_encode"].gpu is False


def test_split_workflow_is_valid_and_keeps_the_dag(profile):
    wf = workflow_from_dict(profile.split_workflow(bytes_scale=0.01))
    base = load_workflow("wan_i2v")
    assert list(wf.stages) == list(base.stages)
    assert wf.result == base.result
    for name, spec in wf.stages.items():
        assert spec.kind == "synthetic"
        assert spec.after == base.stages[name].after
        assert spec.gpu == base.stages[name].gpu
        assert spec.synthetic.mean == pytest.approx(profile.stages[name].mean_s)
        assert spec.synthetic.output_bytes == round(profile.stages[name].service.output_bytes * 0.01)
        assert spec.options["load_s"] == profile.stages[name].load_s


@pytest.mark.parametrize("sp", [1, 8])
def test_monolithic_workflow_is_one_pipeline_stage(profile, sp):
    wf = workflow_from_dict(profile.monolithic_workflow(sp))
    assert list(wf.stages) == [PIPELINE_STAGE] and wf.result == PIPELINE_STAGE
    spec = wf.stages[PIPELINE_STAGE]
    assert spec.gpu and spec.options["slots"] == sp
    others = sum(s.mean_s for n, s in profile.stages.items() if n != "denoise")
    denoise = profile.stages["denoise"]
    assert spec.synthetic.mean == pytest.approx(others + denoise.mean_s / (sp * denoise.sp_efficiency.get(sp, 1.0)))


def test_costs_add_up(profile):
    # the monolithic pipeline holds its GPU through every stage, the CPU one included
    assert profile.monolithic_gpu_seconds_per_job(1) == pytest.approx(
        profile.gpu_seconds_per_job() + profile.cpu_seconds_per_job())
    # sequence parallelism keeps k GPUs through the non-DiT phases: more GPU-seconds per job
    assert profile.monolithic_gpu_seconds_per_job(8) > profile.monolithic_gpu_seconds_per_job(1)
    # long jobs scale the per-segment stages, not the prompt encoder
    assert profile.mean_s("denoise", "long") == pytest.approx(2 * profile.mean_s("denoise"))
    assert profile.mean_s("text_encode", "long") == profile.mean_s("text_encode")
    # one copy of every model per pipeline; the VAE is shared by encode and decode
    assert profile.monolithic_memory_gb(1) == pytest.approx(32.8 + 11.4 + 1.3 + 0.5)
    assert math.isclose(profile.pipeline_cv(1), profile.pipeline_cv(1, None))


def test_bad_profiles_are_refused():
    ok = {"stages": {"a": {"gpu": True, "service_time": {"dist": "constant", "mean": 1.0}}}}
    assert profile_from_dict(ok).stages["a"].mean_s == 1.0
    with pytest.raises(ProfileError, match="gpu"):
        profile_from_dict({"stages": {"a": {"service_time": 1.0}}})
    with pytest.raises(ProfileError, match="unknown key"):
        profile_from_dict({"stages": {"a": {"gpu": True, "service_time": 1.0, "sevice": 2}}})
    with pytest.raises(ProfileError, match="service_time"):
        profile_from_dict({"stages": {"a": {"gpu": True, "service_time": {"dist": "gamma", "mean": 1}}}})
    with pytest.raises(ProfileError, match="unknown stage"):
        profile_from_dict({**ok, "classes": {"long": {"scale": {"b": 2.0}}}})
    with pytest.raises(ProfileError, match="sp_degree"):
        profile_from_dict({**ok, "monolithic": {"sp_degrees": [1, 8]}})
    with pytest.raises(ProfileError, match="offload"):
        profile_from_dict({**ok, "monolithic": {"h2d_gbps": 25.0, "variants": {"x": {"offload": ["nope"]}}}})
    with pytest.raises(ProfileError, match="h2d_gbps"):
        profile_from_dict({**ok, "monolithic": {"variants": {"x": {"offload": ["a"]}}}})
    with pytest.raises(ProfileError, match="not both"):
        profile_from_dict({**ok, "monolithic": {"sp_degrees": [1], "variants": {"x": {}}}})
    with pytest.raises(ProfileError, match="no entry"):
        profile_from_dict(ok).check_workflow(load_workflow("wan_i2v"))


# -- Wan2.2 A14B: two experts ----------------------------------------------------------------

@pytest.fixture(scope="module")
def wan22():
    return load_profile("wan22_i2v_480p")


def test_wan22_profile_covers_the_expert_split_workflow(wan22):
    wf = load_workflow("wan22_i2v")
    assert wan22.workflow == "wan22_i2v" and "wan22_i2v_480p" in available_profiles()
    wan22.check_workflow(wf)
    assert set(wan22.stages) == set(wf.stages)  # no CLIP stage: Wan2.2 A14B has no image encoder
    assert wan22.parallel_stages == ("denoise_high", "denoise_low")
    assert wan22.stages["denoise_high"].model_id != wan22.stages["denoise_low"].model_id


def test_wan22_boundary_steps_add_up(wan22):
    job = wan22.job
    assert job["high_steps"] + job["low_steps"] == job["steps"] == 40
    high, low = wan22.stages["denoise_high"].mean_s, wan22.stages["denoise_low"].mean_s
    # both experts are the same DiT shape: the same time per step
    assert high / job["high_steps"] == pytest.approx(low / job["low_steps"], rel=1e-3)
    # and the DiT work per job is Wan2.1 14B's (same tokens, same shape)
    assert high + low == pytest.approx(load_profile("wan_i2v_480p").stages["denoise"].mean_s, rel=1e-3)


def test_wan22_boundary_matches_the_shipped_scheduler(wan22):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=wan22.job["flow_shift"], solver_order=2, solver_type="bh2", final_sigmas_type="zero")
    sched.set_timesteps(wan22.job["steps"])
    boundary = wan22.job["boundary_ratio"] * 1000
    assert sum(1 for t in sched.timesteps if t >= boundary) == wan22.job["high_steps"]


def test_wan22_memory_fits_where_it_claims(wan22):
    assert wan22.gpu_memory_gb == 80.0
    for name, stage in wan22.stages.items():  # one model per split worker
        assert stage.peak_gb >= stage.memory_gb, name
        assert stage.peak_gb <= wan22.gpu_memory_gb, name
    assert wan22.stages["denoise_high"].memory_gb == pytest.approx(28.6, abs=0.1)  # 14.29e9 params x 2 bytes
    for v in wan22.variants:
        assert wan22.fits(v), v.name
    # everything resident on one GPU does not fit: that is why the variants offload or shard
    assert not wan22.fits(MonolithicVariant("all", sp=1))
    assert wan22.monolithic_peak_gb(1) > 80.0


def test_wan22_monolithic_variants_and_their_costs(wan22):
    names = [v.name for v in wan22.variants]
    assert names == ["resident", "swap", "fsdp2", "fsdp8"]
    plain = wan22.pipeline_mean_s(1)  # every stage in order, nothing copied
    # resident: T5 copied in each job; swap: both experts copied in each job
    assert wan22.copy_s_per_job("resident") == pytest.approx(11.4 / 25.0)
    assert wan22.copy_s_per_job("swap") == pytest.approx(2 * 28.6 / 25.0)
    assert wan22.pipeline_mean_s("swap") == pytest.approx(plain + 2 * 28.6 / 25.0)
    assert wan22.monolithic_memory_gb("swap") < wan22.monolithic_memory_gb("resident")
    # sharded: both experts split over k GPUs, the rest held on all k
    fsdp8 = wan22.variant("fsdp8")
    dit = sum(wan22.stages[s].mean_s for s in wan22.parallel_stages)
    assert wan22.pipeline_mean_s(fsdp8) == pytest.approx(plain - dit + dit / (8 * 0.705))
    # the split pays no copies and no held-but-idle GPUs: it needs the fewest GPU-seconds
    split = wan22.gpu_seconds_per_job()
    assert all(split < wan22.monolithic_gpu_seconds_per_job(v) for v in wan22.variants)
    for v in wan22.variants:
        wf = workflow_from_dict(wan22.monolithic_workflow(v))
        spec = wf.stages[PIPELINE_STAGE]
        assert spec.options["slots"] == v.sp
        assert spec.synthetic.mean == pytest.approx(wan22.pipeline_mean_s(v))
        assert spec.options["load_s"] == pytest.approx(2 * 42.7 + 17.0 + 1.0)


def test_wan22_split_workflow_keeps_the_expert_dag(wan22):
    base = load_workflow("wan22_i2v")
    wf = workflow_from_dict(wan22.split_workflow(bytes_scale=0.01))
    assert list(wf.stages) == list(base.stages) and wf.result == base.result
    assert wf.stages["denoise_low"].after == ("denoise_high", "text_encode", "vae_encode")
    for name, spec in wf.stages.items():
        assert spec.kind == "synthetic" and spec.gpu == base.stages[name].gpu
        assert spec.outputs == base.stages[name].outputs
        assert spec.synthetic.mean == pytest.approx(wan22.stages[name].mean_s)


def test_synthetic_workflows_declare_their_params(wan22):
    """steps and work, once stages.workflow accepts [params.*] tables (Workflow.params)."""
    import dataclasses

    from stages.workflow import Workflow

    split, mono = wan22.split_workflow(), wan22.monolithic_workflow("swap")
    if "params" not in {f.name for f in dataclasses.fields(Workflow)}:
        assert "params" not in split and "params" not in mono
        pytest.skip("stages.workflow does not know [params.*] tables yet")
    for table in (split, mono):
        assert table["params"]["steps"] == {"type": "integer", "default": 1, "minimum": 1, "maximum": 1000}
        assert table["params"]["work"] == {"type": "map", "minimum": 0.0, "maximum": 1000.0}
        assert set(workflow_from_dict(table).params) == {"steps", "work"}


@pytest.mark.parametrize("name", sorted(available_profiles()))
def test_profile_and_workflow_declare_the_same_gpu_memory(name):
    """The memory a workflow declares for a GPU stage (what the Node Manager packs by) is the
    profile's (what the benchmarks cost): one figure, written twice only for the two readers."""
    prof = load_profile(name)
    wf = load_workflow(prof.workflow)
    for stage, need in prof.stage_needs().items():
        opts = wf.stages[stage].options
        assert (float(opts["memory_gb"]), float(opts["peak_gb"])) == (need.memory_gb, need.peak_gb), stage
