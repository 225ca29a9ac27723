"""Workflow files: the shipped ones load, and every mistake gets a clear message."""

from __future__ import annotations

import random
import statistics
import textwrap
from pathlib import Path

import pytest

from stages.params import Image, Integer, Map, Number, ParamError, Text
from stages.workflow import (
    StageSpec,
    SyntheticSpec,
    Workflow,
    WorkflowError,
    available_workflows,
    check_shared,
    load_workflow,
    loads_workflow,
    workflow_from_dict,
)


SHIPPED = {"wan_i2v", "wan_t2v", "wan22_i2v", "wan22_t2v", "synthetic3"}
ZERO3 = Path(__file__).resolve().parents[2] / "bench" / "workflows" / "zero3.toml"


def test_shipped_workflows_are_listed_and_load():
    shipped = available_workflows()
    assert SHIPPED <= set(shipped)
    for name, path in shipped.items():
        wf = load_workflow(name)
        assert isinstance(wf, Workflow) and wf.name == name
        assert wf.source == str(path)
        assert load_workflow(path) == wf == load_workflow(str(path))


def test_wan_i2v_graph():
    wf = load_workflow("wan_i2v")
    assert wf.description == "Wan2.1 image-to-video 14B"
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
        outputs=("latents",), gpu=True, progress=True, model="wan2.1-i2v-14b",
        options={"memory_gb": 32.8, "peak_gb": 58.0, "gpu_load": 1.0},  # what GPU packing reads
    )
    assert wf.models() == ["umt5-xxl", "clip-vit-h-14", "wan2.1-vae", "wan2.1-i2v-14b"]
    assert wf.stages["video_encode"].model == ""
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
    assert wf.stages["left"].model == "a" and wf.stages["left"].options == {}
    assert wf.stages["right"].model == ""
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
        pytest.param(GOOD_HEAD + '[stages.b]\nafter = ["a"]\nmodel = 3\n', "stage 'b': 'model' must be a string",
                     id="model-not-string"),
        pytest.param(GOOD_HEAD.replace('"w"', '"my flow"') + '[stages.b]\nafter = ["a"]\n',
                     "'name' 'my flow' may hold only letters", id="name-with-space"),
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


# -- parameters ------------------------------------------------------------------------------


def test_the_shipped_params():
    i2v, t2v = load_workflow("wan_i2v"), load_workflow("wan_t2v")
    assert list(i2v.params) == ["prompt", "negative_prompt", "height", "width", "num_frames", "steps",
                                "guidance_scale", "seed", "fps", "image"]
    assert i2v.images() == ["image"] and t2v.images() == []
    assert i2v.params["prompt"] == Text("prompt", required=True, max_length=2000, description="What the video shows.")
    assert i2v.params["num_frames"].congruent == (4, 1) and i2v.params["height"].multiple_of == 16
    assert isinstance(i2v.params["image"], Image) and i2v.params["image"].required
    assert t2v.params["steps"].default == 50 and i2v.params["steps"].default == 40
    wan22 = load_workflow("wan22_t2v").params["guidance_scale_2"]
    assert isinstance(wan22, Number) and not wan22.required and not wan22.has_default
    synthetic = load_workflow("synthetic3").params
    assert synthetic["steps"] == Integer("steps", default=1, minimum=1, maximum=1000,
                                         description=synthetic["steps"].description)
    assert isinstance(synthetic["work"], Map) and (synthetic["work"].minimum, synthetic["work"].maximum) == (0, 1000)
    zero3 = load_workflow(ZERO3)
    assert {"steps", "work"} <= set(zero3.params) and zero3.images() == []


def test_resolve_params_fills_defaults_and_is_idempotent():
    wf = load_workflow("wan22_i2v")
    params = wf.resolve_params({"prompt": "a boat", "image": "ignored here", "height": 64.0})
    seed = params.pop("seed")
    assert 0 <= seed < 2**63
    assert params == {"prompt": "a boat", "negative_prompt": "", "height": 64, "width": 832, "num_frames": 81,
                      "steps": 40, "guidance_scale": 3.5, "fps": 16}  # no image, no guidance_scale_2
    again = wf.resolve_params({**params, "seed": seed})
    assert again == {**params, "seed": seed}
    assert wf.resolve_params(again) == again
    form = wf.resolve_params({"prompt": "p", "steps": " 7 ", "guidance_scale_2": "2.5", "seed": "3"}, form=True)
    assert (form["steps"], form["guidance_scale_2"], form["seed"]) == (7, 2.5, 3)
    assert load_workflow("synthetic3").resolve_params({}) == {"steps": 1}
    no_params = workflow_from_dict({"name": "bare", "result": "a", "stages": {"a": {}}})
    assert no_params.params == {} and no_params.resolve_params({}) == {}


@pytest.mark.parametrize("name, raw, field, reason, words", [
    ("wan_t2v", {"prompt": "p", "foo": 1}, "foo", "unknown_field",
     "unknown field 'foo' for workflow 'wan_t2v'; accepted: prompt, negative_prompt, height, width, num_frames"),
    ("wan_t2v", {"prompt": "p", "image": "x"}, "image", "unknown_field", "unknown field 'image' for workflow"),
    ("wan_i2v", {"prompt": "p", "b": 1, "a": 2}, "a", "unknown_field", "unknown fields 'a', 'b' for workflow"),
    ("wan_i2v", {"steps": 4}, "prompt", "missing", "prompt is required by workflow 'wan_i2v'"),
    ("wan_i2v", {"prompt": "p", "steps": 101}, "steps", "invalid",
     "steps must be between 1 and 100, got 101 (workflow 'wan_i2v')"),
    ("synthetic3", {"work": {"b": 1001}}, "work", "invalid", "work['b'] must be between 0 and 1000, got 1001"),
    ("synthetic3", {"prompt": 3}, "prompt", "invalid", "prompt must be a string, not an integer"),
])
def test_resolve_params_refusals_name_the_param_and_the_workflow(name, raw, field, reason, words):
    with pytest.raises(ParamError) as err:
        load_workflow(name).resolve_params(raw)
    assert (err.value.field, err.value.reason) == (field, reason)
    assert words in err.value.message and str(err.value) == err.value.message


def test_a_workflow_without_params_accepts_none():
    wf = workflow_from_dict({"name": "bare", "result": "a", "stages": {"a": {}}})
    with pytest.raises(ParamError, match="unknown field 'prompt' for workflow 'bare'; accepted: none"):
        wf.resolve_params({"prompt": "p"})


@pytest.mark.parametrize("table, message", [
    ('[params.steps]\ntype = "float"\n', "param 'steps': 'type' must be one of string, integer"),
    ('[params.steps]\ntype = "integer"\nmaximun = 3\n', "param 'steps': unknown key(s) ['maximun']"),
    ('[params.steps]\ntype = "integer"\nminimum = 1\nmaximum = 10\ndefault = 11\n',
     "param 'steps': 'default' 11 is not an accepted value: steps must be between 1 and 10, got 11"),
    ('[params.prompt]\ntype = "string"\nrequired = true\ndefault = "x"\n',
     "param 'prompt': 'default' is given but the param is required"),
    ('[params.n]\ntype = "integer"\nminimum = 1\nmaximum = 161\ncongruent = [4, 1]\ndefault = 80\n',
     "param 'n': 'default' 80 is not an accepted value: n must be 4k+1 (5, 9, 13, ...), got 80"),
    ('[params.h]\ntype = "integer"\nmultiple_of = 16\ndefault = 100\n', "n accepted value: h must be a multiple"),
    ('[params.n]\ntype = "integer"\ncongruent = [4, 4]\n', "param 'n': 'congruent' must be [m, r]"),
    ('[params.n]\ntype = "integer"\nminimum = 5\nmaximum = 1\n', "param 'n': 'minimum' (5) is above 'maximum' (1)"),
    ('[params.n]\ntype = "integer"\nminimum = 2\nmaximum = 3\ncongruent = [4, 1]\n',
     "param 'n': no integer between 'minimum' 2 and 'maximum' 3"),
    ('[params.seed]\ntype = "integer"\ndefault = "random"\n', "param 'seed': 'default' = \"random\" needs"),
    ('[params.x]\ntype = "number"\nmaximum = "high"\n', "param 'x': 'maximum' must be a finite number"),
    ('[params.x]\ntype = "string"\nminimum = 1\n', "param 'x': unknown key(s) ['minimum'] for a string param"),
    ('[params.image]\ntype = "image"\ndefault = "x"\n', "param 'image': unknown key(s) ['default']"),
    ('[params.work]\ntype = "map"\nmaximum = 10\ndefault = { b = 11 }\n',
     "param 'work': 'default' {'b': 11} is not an accepted value: work['b'] must be at most 10, got 11"),
    ('[params.flag]\ntype = "boolean"\nrequired = "yes"\n', "param 'flag': 'required' must be true or false"),
    ('[params.workflow]\ntype = "string"\n', "param 'workflow': 'workflow' is reserved"),
    ('[params."frame-count"]\ntype = "integer"\n', "param 'frame-count': a param name is an identifier"),
    ('params = 3\n', "'params' must be a table of [params.NAME] tables"),
])
def test_param_declaration_errors_name_the_file_the_param_and_the_key(tmp_path, table, message):
    text = GOOD_HEAD + '[stages.b]\nafter = ["a"]\n'
    if table.startswith("params ="):
        text = table + text
    else:
        text += table
    path = write(tmp_path, text)
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


# -- the workflows of one broker -----------------------------------------------------------------


def test_check_shared_accepts_the_shipped_set():
    check_shared({name: load_workflow(name) for name in available_workflows()})
    check_shared({"zero3": load_workflow(ZERO3)})


def _flow(name: str, stages: dict) -> Workflow:
    last = list(stages)[-1]
    return workflow_from_dict({"name": name, "result": last, "stages": stages}, source=f"{name}.toml")


def test_a_shared_stage_name_must_be_the_same_stage():
    i2v = load_workflow("wan_i2v")
    other_model = _flow("mine", {"text_encode": {"kind": "text_encode", "model": "t5-small", "gpu": True,
                                                 "outputs": ["prompt_embeds", "negative_prompt_embeds"]}})
    with pytest.raises(WorkflowError) as err:
        check_shared({"wan_i2v": i2v, "mine": other_model})
    message = str(err.value)
    assert message.startswith("mine.toml: stage 'text_encode': its model 't5-small' differs from 'umt5-xxl'")
    assert "of workflow 'wan_i2v'" in message and "another name" in message
    other_kind = _flow("mine", {"a": {"kind": "denoise"}})
    with pytest.raises(WorkflowError, match="stage 'a': its kind 'denoise' differs from 'synthetic'"):
        check_shared({"synthetic3": load_workflow("synthetic3"), "mine": other_kind})
    other_outputs = _flow("mine", {"a": {"kind": "synthetic", "outputs": ["z"],
                                         "synthetic": {"service_time": 0.05, "output_bytes": 1 << 20}}})
    with pytest.raises(WorkflowError, match="stage 'a': its outputs \\('z',\\) differs from \\('x',\\)"):
        check_shared({"synthetic3": load_workflow("synthetic3"), "mine": other_outputs})
    # synthetic3 and zero3 both name their stages a, b, c, with other costs: not servable together
    with pytest.raises(WorkflowError, match="stage 'a': its options .* differs from"):
        check_shared({"synthetic3": load_workflow("synthetic3"), "zero3": load_workflow(ZERO3)})
    # the same stage in another place of the graph is fine: only `after` may differ
    same = _flow("mine", {"a": {"kind": "synthetic", "outputs": ["x"],
                                "synthetic": {"service_time": {"dist": "constant", "mean": 0.05},
                                              "output_bytes": 1048576}},
                          "d": {"kind": "synthetic", "after": ["a"], "synthetic": {}}})
    check_shared({"synthetic3": load_workflow("synthetic3"), "mine": same})


def test_one_kind_and_model_is_one_stage_name():
    t2v = load_workflow("wan_t2v")
    renamed = _flow("mine", {"umt5": {"kind": "text_encode", "model": "umt5-xxl", "gpu": True,
                                      "outputs": ["prompt_embeds", "negative_prompt_embeds"]}})
    with pytest.raises(WorkflowError) as err:
        check_shared({"wan_t2v": t2v, "mine": renamed})
    assert str(err.value) == (
        "mine.toml: stage 'umt5': runs kind 'text_encode' with model 'umt5-xxl' like stage 'text_encode' of workflow"
        f" 'wan_t2v' ({t2v.source}); name it 'text_encode' so that one worker serves both")
    # other kinds of the same model are other stages (the VAE's encoder and decoder), and "" is no model
    check_shared({name: load_workflow(name) for name in ("wan_i2v", "wan22_i2v")})
    check_shared({"x": _flow("x", {"p": {"kind": "synthetic"}, "q": {"kind": "synthetic", "after": ["p"]}})})
