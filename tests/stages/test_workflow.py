"""Workflow files: the shipped ones load, and every mistake gets a clear message."""

from __future__ import annotations

import random
import statistics
import textwrap
from pathlib import Path

import pytest

from stages.workflow import (
    StageSpec,
    SyntheticSpec,
    Workflow,
    WorkflowError,
    available_workflows,
    load_workflow,
    loads_workflow,
    workflow_from_dict,
)


def test_shipped_workflows_are_listed_and_load():
    shipped = available_workflows()
    assert {"wan_i2v", "synthetic3"} <= set(shipped)
    for name, path in shipped.items():
        wf = load_workflow(name)
        assert isinstance(wf, Workflow) and wf.name == name
        assert wf.source == str(path)
        assert load_workflow(path) == wf == load_workflow(str(path))


def test_wan_i2v_graph():
    wf = load_workflow("wan_i2v")
    assert wf.description == "Wan2.1 image-to-video"
    assert list(wf.stages) == [
        "text_encode", "image_encode", "vae_encode", "denoise", "vae_decode", "video_encode",
    ]
    assert wf.result == "video_encode"
    assert wf.roots() == ["text_encode", "image_encode", "vae_encode"]
    assert wf.upstream("denoise") == ("text_encode", "image_encode", "vae_encode")
    assert wf.downstream("image_encode") == ["denoise"]
    assert wf.downstream("video_encode") == []
    denoise = wf.stages["denoise"]
    assert denoise == StageSpec(
        name="denoise", kind="denoise", after=("text_encode", "image_encode", "vae_encode"),
        outputs=("latents",), gpu=True, progress=True, options={},
    )
    assert wf.stages["text_encode"].outputs == ("prompt_embeds", "negative_prompt_embeds")
    assert wf.stages["video_encode"].gpu is False and wf.stages["video_encode"].outputs == ()
    with pytest.raises(KeyError, match="no stage 'upscale'"):
        wf.downstream("upscale")


def test_synthetic3_graph_and_costs():
    wf = load_workflow("synthetic3")
    assert list(wf.stages) == ["a", "b", "c"] and wf.result == "c"
    assert [s.kind for s in wf.stages.values()] == ["synthetic"] * 3
    a, b, c = (wf.stages[s].synthetic for s in "abc")
    assert a == SyntheticSpec(dist="constant", mean=0.05, output_bytes=1 << 20)
    assert (b.dist, b.mean, b.cv, b.output_bytes) == ("lognormal", 0.2, 0.3, 4 << 20)
    assert (c.dist, c.low, c.high, c.mean) == ("uniform", 0.02, 0.08, 0.05)
    assert wf.stages["b"].options["synthetic"]["output_bytes"] == 4 << 20


@pytest.mark.parametrize(
    "spec, cv",
    [
        (SyntheticSpec("constant", mean=0.5), 0.0),
        (SyntheticSpec("exponential", mean=0.5), 1.0),
        (SyntheticSpec("lognormal", mean=0.5, cv=0.3), 0.3),
        (SyntheticSpec("uniform", mean=0.5, low=0.25, high=0.75), 0.25 / 3**0.5 / 0.5),
    ],
)
def test_synthetic_samples_have_the_stated_mean_and_spread(spec, cv):
    rng = random.Random(1234)
    xs = [spec.sample(rng) for _ in range(20000)]
    assert min(xs) >= 0
    assert statistics.fmean(xs) == pytest.approx(0.5, rel=0.03)
    assert statistics.pstdev(xs) / statistics.fmean(xs) == pytest.approx(cv, abs=0.03)
    again = random.Random(1234)
    assert [spec.sample(again) for _ in range(5)] == xs[:5]  # reproducible from a seed


def test_synthetic_spec_shorthands_and_errors():
    assert SyntheticSpec.from_mapping({"service_time": 0.1}) == SyntheticSpec("constant", mean=0.1)
    assert SyntheticSpec.from_mapping({}) == SyntheticSpec()
    for table, message in [
        ({"service_time": {"dist": "gamma", "mean": 1}}, "dist must be one of"),
        ({"service_time": {"dist": "uniform", "mean": 1}}, "needs low and high"),
        ({"service_time": {"dist": "uniform", "low": 2, "high": 1}}, "is above high"),
        ({"service_time": {"dist": "lognormal"}}, "needs mean"),
        ({"service_time": {"dist": "constant", "mean": -1}}, "must be a number >= 0"),
        ({"service_time": {"dist": "constant", "mean": 1, "sigma": 2}}, "unknown service_time key"),
        ({"output_bytes": 1.5}, "output_bytes must be an integer"),
        ({"speed": 1}, "unknown synthetic key"),
    ]:
        with pytest.raises(ValueError, match=message):
            SyntheticSpec.from_mapping(table)


def test_fan_out_and_defaults_are_allowed():
    wf = workflow_from_dict({
        "name": "t2v",
        "result": "out",
        "stages": {
            "enc": {"outputs": ["e"]},
            "left": {"after": ["enc"], "outputs": ["l"], "model": "a"},
            "right": {"after": ["enc"], "outputs": ["r"]},
            "out": {"after": ["left", "right"]},
        },
    })
    assert wf.downstream("enc") == ["left", "right"]
    assert wf.stages["left"].kind == "left"  # kind defaults to the stage name
    assert wf.stages["left"].options == {"model": "a"}
    assert wf.stages["out"] == StageSpec("out", "out", ("left", "right"))


def write(tmp_path: Path, text: str, name: str = "broken.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD_HEAD = """
name = "w"
result = "b"
[stages.a]
outputs = ["x"]
"""


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param(
            GOOD_HEAD + '[stages.b]\nafter = ["ghost"]\n',
            "stage 'b': 'after' names unknown stage 'ghost'; known stages: ['a', 'b']",
            id="unknown-after",
        ),
        pytest.param(
            'name = "w"\nresult = "c"\n[stages.a]\nafter = ["c"]\n[stages.b]\nafter = ["a"]\n'
            '[stages.c]\nafter = ["b"]\n',
            "cycle: ",
            id="cycle",
        ),
        pytest.param(
            GOOD_HEAD + '[stages.b]\nafter = ["b"]\n', "stage 'b': lists itself in 'after'", id="self-loop",
        ),
        pytest.param('name = "w"\nresult = "a"\n', "no stages: add at least one [stages.NAME] table",
                     id="no-stages"),
        pytest.param(
            'name = "w"\n[stages.a]\n', "missing 'result': the stage whose output is the job's result",
            id="no-result",
        ),
        pytest.param(
            GOOD_HEAD.replace('"b"', '"zz"') + '[stages.b]\nafter = ["a"]\n',
            "result stage 'zz' is not a stage; known stages: ['a', 'b']",
            id="result-unknown",
        ),
        pytest.param(
            GOOD_HEAD + '[stages.b]\nafter = ["a"]\n[stages.a]\nkind = "again"\n', "each stage name may be declared only once",
            id="duplicate-stage",
        ),
        pytest.param(
            GOOD_HEAD.replace('"b"', '"a"') + '[stages.b]\nafter = ["a"]\n',
            "stage 'a': the result stage is waited for by ['b']",
            id="result-not-final",
        ),
        pytest.param(
            GOOD_HEAD + '[stages.b]\nafter = ["a"]\n[stages.orphan]\n',
            "stage 'orphan': does not lead to the result stage 'b'",
            id="dead-end",
        ),
        pytest.param(
            GOOD_HEAD + '[stages.b]\nafter = "a"\n', "stage 'b': 'after' must be a list of names",
            id="after-not-list",
        ),
        pytest.param(
            GOOD_HEAD + '[stages.b]\nafter = ["a", "a"]\n', "stage 'b': 'after' repeats ['a']",
            id="after-repeats",
        ),
        pytest.param(
            GOOD_HEAD + '[stages.b]\nafter = ["a"]\ngpu = "yes"\n', "stage 'b': 'gpu' must be true or false",
            id="gpu-not-bool",
        ),
        pytest.param(
            GOOD_HEAD + '[stages.b]\nafter = ["a"]\nkind = "synthetic"\n'
            '[stages.b.synthetic]\nservice_time = { dist = "uniform" }\n',
            "stage 'b': a uniform service_time needs low and high",
            id="synthetic-bad",
        ),
        pytest.param('nmae = "w"\n' + GOOD_HEAD, "unknown top-level key(s) ['nmae']", id="typo-top-level"),
    ],
)
def test_validation_errors_name_the_file_and_the_stage(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_cycle_message_shows_the_loop(tmp_path):
    path = write(tmp_path, """
        name = "w"
        result = "d"
        [stages.a]
        [stages.b]
        after = ["a", "c"]
        [stages.c]
        after = ["b"]
        [stages.d]
        after = ["c"]
    """)
    with pytest.raises(WorkflowError, match=r"stage '(b|c)': cycle: (b -> c -> b|c -> b -> c)"):
        load_workflow(path)


def test_name_defaults_to_file_stem_and_errors_are_value_errors(tmp_path):
    path = write(tmp_path, 'result = "a"\n[stages.a]\n', name="tiny_flow.toml")
    assert load_workflow(path).name == "tiny_flow"
    assert issubclass(WorkflowError, ValueError)
    with pytest.raises(WorkflowError, match="unknown workflow 'nope'; shipped workflows: .*wan_i2v"):
        load_workflow("nope")
    with pytest.raises(WorkflowError, match="cannot read workflow file"):
        load_workflow(tmp_path / "missing.toml")
    with pytest.raises(WorkflowError, match="<string>: missing 'result'"):
        loads_workflow("[stages.a]\n", default_name="x")
