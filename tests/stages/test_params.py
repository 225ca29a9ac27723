"""Param types: parsing JSON and form values, defaults, JSON Schemas, and declarations."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from stages.params import (
    Boolean,
    DeclarationError,
    Image,
    Integer,
    Map,
    Number,
    ParamError,
    Text,
    param_from_table,
)
from stages.workflow import available_workflows, load_workflow

FRAMES = Integer("num_frames", default=81, minimum=1, maximum=161, congruent=(4, 1))
HEIGHT = Integer("height", default=480, minimum=64, maximum=1280, multiple_of=16)
SEED = param_from_table("seed", {"type": "integer", "default": "random", "minimum": 0, "maximum": 2**63 - 1})
GUIDANCE = Number("guidance_scale", default=5.0, minimum=0.0, maximum=20.0)
PROMPT = Text("prompt", required=True, max_length=2000)
WORK = Map("work", minimum=0.0, maximum=1000.0)


def refusal(param, raw, form=False) -> ParamError:
    with pytest.raises(ParamError) as err:
        param.parse(raw, form)
    assert err.value.field == param.name and err.value.reason == "invalid"
    assert err.value.message.startswith(param.name) and str(err.value) == err.value.message
    return err.value


@pytest.mark.parametrize("param, raw, form, message", [
    (PROMPT, 12, False, "prompt must be a string, not an integer"),
    (PROMPT, " \t", False, "prompt must not be empty"),
    (PROMPT, "x" * 2001, False, "prompt is 2001 characters long; the limit is 2000"),
    (HEIGHT, 500, False, "height must be a multiple of 16, got 500"),
    (HEIGHT, 48, False, "height must be between 64 and 1280, got 48"),
    (HEIGHT, True, False, "height must be an integer, not a boolean"),
    (HEIGHT, 480.5, False, "height must be an integer, not a number"),
    (HEIGHT, "480", False, "height must be an integer, not a string"),
    (HEIGHT, "four", True, "height must be an integer, got 'four'"),
    (FRAMES, 80, False, "num_frames must be 4k+1 (5, 9, 13, ...), got 80"),
    (FRAMES, 165, False, "num_frames must be between 1 and 161, got 165"),
    (SEED, 2**63, False, "seed must be between 0 and 9223372036854775807, got 9223372036854775808"),
    (Integer("n", minimum=0), -1, False, "n must be at least 0, got -1"),
    (Integer("n", maximum=9), 10, False, "n must be at most 9, got 10"),
    (GUIDANCE, 20.5, False, "guidance_scale must be between 0 and 20, got 20.5"),
    (GUIDANCE, "5", False, "guidance_scale must be a number, not a string"),
    (GUIDANCE, "five", True, "guidance_scale must be a number, got 'five'"),
    (GUIDANCE, False, False, "guidance_scale must be a number, not a boolean"),
    (GUIDANCE, float("nan"), False, "guidance_scale must be between 0 and 20, got nan"),
    (GUIDANCE, 10**400, False, "guidance_scale must be between 0 and 20, got 1000000000000000000000000000000000000..."),
    (Number("t", minimum=0.0), float("inf"), False, "t must be at least 0, got inf"),
    (Boolean("flag"), "maybe", True, "flag must be true or false, got 'maybe'"),
    (Boolean("flag"), 1, False, "flag must be true or false, not an integer"),
    (WORK, [1], False, "work must be an object of numbers, not an array"),
    (WORK, "{b: 2}", True, "work must be a JSON object, got '{b: 2}'"),
    (WORK, {"b": "2"}, False, "work['b'] must be a number, not a string"),
    (WORK, {"b": 1000.5}, False, "work['b'] must be between 0 and 1000, got 1000.5"),
    (WORK, {"": 1}, False, "work keys must be strings of 1 to 64 characters, got ''"),
    (WORK, {f"k{i}": 1 for i in range(65)}, False, "work has 65 keys; the limit is 64"),
    (Image("image", required=True), 3, False, "image must be a base64 string, not an integer"),
])
def test_refusals_name_the_param_and_say_what_is_wrong(param, raw, form, message):
    assert refusal(param, raw, form).message == message


def test_accepted_values():
    assert PROMPT.parse("a cat") == "a cat"
    assert HEIGHT.parse(480.0) == 480 and type(HEIGHT.parse(480.0)) is int  # JSON Schema's integer admits 480.0
    assert HEIGHT.parse(" 496 ", form=True) == 496
    assert FRAMES.parse(5) == 5
    assert GUIDANCE.parse(5) == 5.0 and type(GUIDANCE.parse(5)) is float
    assert GUIDANCE.parse("3.5", form=True) == 3.5
    assert Boolean("flag").parse("Yes", form=True) is True and Boolean("flag").parse("0", form=True) is False
    assert WORK.parse({"b": 2}) == {"b": 2.0}
    assert WORK.parse('{"b": 0}', form=True) == {"b": 0.0}
    assert Image("image").parse(bytearray(b"png")) == b"png"


def test_defaults():
    assert HEIGHT.make_default() == 480 and not PROMPT.has_default and PROMPT.make_default() is None
    seeds = {SEED.make_default() for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s < 2**63 for s in seeds)  # a fresh one each time
    assert Number("g", minimum=0.0).make_default() is None  # neither required nor defaulted: left out


def test_json_schemas():
    assert PROMPT.schema() == {"type": "string", "maxLength": 2000, "minLength": 1, "pattern": r"\S",
                               "description": ""}
    assert HEIGHT.schema() == {"type": "integer", "minimum": 64, "maximum": 1280, "multipleOf": 16, "default": 480,
                               "description": ""}
    frames = FRAMES.schema()
    assert frames["x-congruent"] == {"modulus": 4, "remainder": 1}
    assert frames["enum"] == list(range(1, 162, 4))  # JSON Schema has no "x % m == r": list the values
    assert "enum" not in Integer("n", minimum=1, maximum=10**6, congruent=(4, 1)).schema()  # too many to list
    both = Integer("n", minimum=0, maximum=100, multiple_of=3, congruent=(4, 1)).schema()
    assert both["enum"] == [9, 21, 33, 45, 57, 69, 81, 93]
    seed = SEED.schema()
    assert "default" not in seed and seed["x-default"] == "random"
    assert GUIDANCE.schema()["default"] == 5.0
    assert Boolean("flag", default=False).schema() == {"type": "boolean", "default": False, "description": ""}
    work = WORK.schema()
    validator = Draft202012Validator(work)
    assert validator.is_valid({"b": 2}) and not validator.is_valid({"b": -1}) and not validator.is_valid({"": 1})
    assert Image("image").schema()["contentEncoding"] == "base64"


def test_schema_and_parse_agree_on_every_shipped_param():
    values = [None, True, 0, 1, -1, 5, 16, 81, 480, 480.0, 4.5, 20.5, 2**63, "", " ", "x", "5", [1], {"b": 1},
              {"b": -1}, {"b": "x"}]
    for name in available_workflows():
        for param in load_workflow(name).params.values():
            if isinstance(param, Image):
                continue
            validator = Draft202012Validator(param.schema())
            for value in values:
                try:
                    param.parse(value)
                    accepted = True
                except ParamError:
                    accepted = False
                assert validator.is_valid(value) == accepted, (name, param.name, value)


def test_declarations_read_back_the_same():
    for name in available_workflows():
        for param in load_workflow(name).params.values():
            assert param_from_table(param.name, param.declaration()) == param
    assert SEED.declaration() == {"type": "integer", "required": False, "default": "random", "minimum": 0,
                                  "maximum": 2**63 - 1, "description": ""}
    assert FRAMES.declaration()["congruent"] == [4, 1]


@pytest.mark.parametrize("table, message", [
    ({"type": "float"}, "'type' must be one of string, integer, number, boolean, image, map, not 'float'"),
    ({}, "'type' must be one of"),
    ({"type": "integer", "max_length": 3}, "unknown key(s) ['max_length'] for an integer param"),
    ({"type": "integer", "required": True, "default": 1}, "'default' is given but the param is required"),
    ({"type": "integer", "minimum": 1.5}, "'minimum' must be an integer, not 1.5"),
    ({"type": "integer", "multiple_of": 0}, "'multiple_of' must be an integer >= 1, not 0"),
    ({"type": "integer", "congruent": [4]}, "'congruent' must be [m, r] with m >= 2 and 0 <= r < m, not [4]"),
    ({"type": "integer", "minimum": 0, "maximum": 9, "default": "random", "multiple_of": 2},
     "'default' = \"random\" needs 'minimum' and 'maximum', and neither 'multiple_of' nor 'congruent'"),
    ({"type": "integer", "default": "7"}, "'default' '7' is not an accepted value: n must be an integer, not a string"),
    ({"type": "string", "max_length": 3, "default": "four"},
     "'default' 'four' is not an accepted value: n is 4 characters long; the limit is 3"),
    ({"type": "number", "minimum": 1, "maximum": 0}, "'minimum' (1) is above 'maximum' (0)"),
    ({"type": "number", "minimum": float("nan")}, "'minimum' must be a finite number, not nan"),
    ({"type": "boolean", "default": 1}, "n must be true or false, not an integer"),
    ({"type": "map", "default": {"b": "x"}}, "n['b'] must be a number, not a string"),
    ({"type": "image", "minimum": 1}, "unknown key(s) ['minimum'] for an image param"),
    ({"type": "string", "description": 3}, "'description' must be a string, not 3"),
])
def test_declaration_errors_name_the_key(table, message):
    with pytest.raises(DeclarationError) as err:
        param_from_table("n", table)
    assert message in str(err.value)
