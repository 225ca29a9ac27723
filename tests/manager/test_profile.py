"""Stage profiles: the shipped Wan2.1 I2V profile parses, covers its workflow, and the
synthetic workflows built from it are valid."""

from __future__ import annotations

import math

import pytest

from manager.profile import PIPELINE_STAGE, ProfileError, available_profiles, load_profile, profile_from_dict
from stages.workflow import load_workflow, workflow_from_dict


@pytest.fixture(scope="module")
def profile():
    return load_profile("wan_i2v_480p")


def test_shipped_profile_parses(profile):
    assert "wan_i2v_480p" in available_profiles()
    assert profile.workflow == "wan_i2v"
    assert profile.job["frames"] == 81 and profile.job["steps"] == 40
    assert profile.parallel_stage == "denoise"
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
    with pytest.raises(ProfileError, match="no entry"):
        profile_from_dict(ok).check_workflow(load_workflow("wan_i2v"))
