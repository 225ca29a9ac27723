"""The node manager's policy as the command line builds it: the served workflows' [slo] become
its objectives, and --profile gives it the sp_efficiency tables that let it run groups."""

from __future__ import annotations

import pytest

from manager.policy import ProportionalPolicy
from onepiece.cli import _policy, _settings, build_parser
from stages.workflow import load_workflow


def policy_of(*argv: str):
    args = build_parser().parse_args(["up", *argv])
    return _policy(args, _settings(args))


def test_each_served_workflows_slo_is_an_objective_of_the_policy():
    policy = policy_of("--workflows", "wan_i2v", "wan_t2v")
    assert isinstance(policy, ProportionalPolicy)
    objectives = policy.config.objectives
    for name in ("wan_i2v", "wan_t2v"):
        wf = load_workflow(name)
        assert objectives[name].p95_s == wf.slo.p95_s
        assert set(objectives[name].after) == set(wf.stages)
    assert objectives["wan_t2v"].after["denoise_t2v"] == ("text_encode",)
    assert policy.config.sp_efficiency == {}  # no profile: every stage runs width 1


def test_a_profile_gives_its_dit_an_sp_efficiency_table():
    policy = policy_of("--workflows", "wan_i2v", "--profile", "wan_i2v_480p")
    assert set(policy.config.sp_efficiency) == {"denoise"}
    assert policy.config.sp_efficiency["denoise"][1] == 1.0 and 8 in policy.config.sp_efficiency["denoise"]
    assert policy.config.service_cv["denoise"] < 0.1  # a fixed step count: little spread


def test_an_unknown_profile_is_refused_clearly():
    with pytest.raises(SystemExit, match="unknown profile 'no_such_profile'; shipped: "):
        policy_of("--profile", "no_such_profile")


def test_a_profile_that_shares_some_stages_gives_only_those():
    # wan22's profile shares text_encode and vae_decode with wan_t2v; its experts are not served
    policy = policy_of("--workflows", "wan_t2v", "--profile", "wan22_i2v_480p")
    assert policy.config.sp_efficiency == {} and "text_encode" in policy.config.service_cv
    assert "denoise_high" not in policy.config.service_cv


def test_a_profile_for_stages_not_served_is_refused(tmp_path):
    other = tmp_path / "other.toml"
    other.write_text("""
name = "other"
workflow = "nothing_served"
description = "stages nobody serves"
hardware = "none"
[stages.elsewhere]
gpu = true
load_s = 1.0
[stages.elsewhere.service_time]
dist = "constant"
mean = 1.0
""")
    with pytest.raises(SystemExit, match="none of its stages"):
        policy_of("--workflows", "wan_i2v", "--profile", str(other))


@pytest.mark.parametrize("command", ["up", "manager"])
def test_gpu_max_load_defaults_to_one_and_refuses_less(command, capsys):
    parser = build_parser()
    assert parser.parse_args([command]).gpu_max_load == 1.0
    assert parser.parse_args([command, "--gpu-max-load", "1.2"]).gpu_max_load == 1.2
    for bad in ("0.5", "nan", "lots"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--gpu-max-load", bad])
        assert "--gpu-max-load" in capsys.readouterr().err


def test_gpu_max_load_without_gpu_memory_is_an_error_not_a_flag_that_does_nothing(capsys):
    from onepiece.cli import _gpu_max_load

    parser = build_parser()
    assert _gpu_max_load(parser.parse_args(["manager"])) is None
    assert _gpu_max_load(parser.parse_args(["manager", "--gpu-memory-gb", "80", "--gpu-max-load", "1.2"])) == 1.2
    with pytest.raises(SystemExit) as exc:
        _gpu_max_load(parser.parse_args(["up", "--gpu-max-load", "1.2"]))
    assert exc.value.code == 2 and "--gpu-max-load needs --gpu-memory-gb" in capsys.readouterr().err
