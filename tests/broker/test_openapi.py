"""The OpenAPI document and the validator agree: cases are derived from the document, one
request schema per workflow, and put to both (no server; ``tests/test_schemathesis.py``
fuzzes a running one)."""

from __future__ import annotations

import base64
import io
import math
from types import SimpleNamespace

import pytest
from jsonschema import Draft202012Validator
from PIL import Image

from broker.api import DEFAULT_WORKFLOW, Invalid, default_workflow, make_app, openapi_document, validate_job
from stages.workflow import available_workflows, load_workflow

LIMIT = 1 << 20
WORKFLOWS = {name: load_workflow(name) for name in available_workflows()}
SERVED = [tuple(WORKFLOWS), ("wan_i2v", "synthetic3"), ("synthetic3",), ("wan_i2v",), ("wan_t2v", "wan22_i2v"),
          ("synthetic3", "wan22_t2v", "wan_t2v")]


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG_B64 = _png_b64()


@pytest.fixture(params=SERVED, ids="+".join)
def served(request) -> dict:
    return {name: WORKFLOWS[name] for name in request.param}


def component(doc: dict, name: str) -> Draft202012Validator:
    """A validator for one component schema, its $refs resolved within the document."""
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def accepts(body: dict, workflows: dict, form: bool = False) -> bool:
    try:
        validate_job(body, workflows, form)
    except Invalid:
        return False
    return True


def simplest(schema: dict):
    """The simplest value a field's schema allows; the image is a real one (JSON Schema only says base64)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("contentEncoding") == "base64":
        return PNG_B64
    if schema["type"] == "string":
        return "x"
    if schema["type"] == "object":
        return {}
    if schema["type"] == "boolean":
        return False
    if schema["type"] == "integer":
        step = schema.get("multipleOf", 1)
        return math.ceil(schema.get("minimum", 0) / step) * step
    return schema.get("minimum", 0)


def branches(doc: dict, form: bool = False) -> dict[str, dict]:
    """The request schema of each served workflow, by workflow name."""
    schemas = doc["components"]["schemas"]
    union = schemas["JobRequestForm" if form else "JobRequest"]
    out = {}
    for ref in union["oneOf"]:
        branch = schemas[ref["$ref"].rsplit("/", 1)[1]]
        out[branch["title"]] = branch
    return out


def minimal_requests(doc: dict) -> dict[str, dict]:
    """Per workflow: a body with exactly the fields its request schema requires."""
    return {name: {field: simplest(branch["properties"][field]) for field in branch["required"]}
            for name, branch in branches(doc).items()}


def boundary_values(schema: dict) -> list:
    """Values at and just past every bound the document states, and of the wrong type."""
    wrong_type = [True, [1], {"a": 1}, None]
    schema = {**schema, "type": schema["type"][0] if isinstance(schema["type"], list) else schema["type"]}
    if schema["type"] == "string":
        n = schema.get("maxLength", 100)
        return ["", " ", "\t\n", "x", " x ", "x" * n, "x" * (n + 1), 5, *wrong_type]
    if schema["type"] == "object":
        values = schema["additionalProperties"]
        lo, hi = values["minimum"], values["maximum"]
        n, width = schema["maxProperties"], schema["propertyNames"]["maxLength"]
        return [{}, {"b": lo}, {"b": hi}, {"b": lo - 0.5}, {"b": hi + 0.5}, {"b": int(hi)}, {"b": "1"},
                {"b": True}, {"b": None}, {"": 1}, {"x" * width: 1}, {"x" * (width + 1): 1},
                {f"k{i}": lo for i in range(n)}, {f"k{i}": lo for i in range(n + 1)}, [1], "x", 3, True, None]
    lo, hi = schema["minimum"], schema.get("maximum", schema["minimum"] + 10**6)
    if schema["type"] == "number":
        return [lo, hi, lo - 0.5, hi + 0.5, (lo + hi) / 2, int(hi), "5", *wrong_type]
    step = schema.get("multipleOf", 1)
    first = math.ceil(lo / step) * step
    values = [lo - 1, lo, first, first + 1, first + step, hi, hi + 1, float(first), first + 0.5, str(first),
              *wrong_type]
    for v in schema.get("enum", [])[:3]:
        values += [v, v + 1, v - 1]
    return values


def test_the_document_is_valid_openapi_3_1(served):
    validator = pytest.importorskip("openapi_spec_validator")
    doc = openapi_document(served, LIMIT)
    validator.validate(doc)
    assert doc["openapi"] == "3.1.0"


def test_every_route_is_documented():
    app = make_app(SimpleNamespace(settings=SimpleNamespace(max_request_bytes=LIMIT)))
    doc = openapi_document(WORKFLOWS, LIMIT)
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item if method != "parameters"}
    assert routes == documented


def test_one_request_schema_per_workflow_from_its_declaration(served):
    doc = openapi_document(served, LIMIT)
    schemas = doc["components"]["schemas"]
    assert set(branches(doc)) == set(branches(doc, form=True)) == set(served)
    default = default_workflow(served)
    for name, wf in served.items():
        for form in (False, True):
            branch = schemas[f"JobRequest{'Form' if form else ''}_{name}"]
            assert branch["additionalProperties"] is False
            assert set(branch["properties"]) == set(wf.params) | {"workflow"}
            required = [n for n, p in wf.params.items() if p.required]
            assert branch["required"] == required + ([] if name == default else ["workflow"])
            for pname, param in wf.params.items():
                if pname not in wf.images():
                    schema = branch["properties"][pname]
                    if not form and not param.required:  # JSON's null is "left out"
                        assert schema["type"] == [param.schema()["type"], "null"]
                        schema = {**schema, "type": param.schema()["type"]}
                        if "enum" in schema:
                            assert schema["enum"][-1] is None
                            schema["enum"] = schema["enum"][:-1]
                    assert schema == param.schema()
            for pname in wf.images():
                image = branch["properties"][pname]
                assert ("contentMediaType" in image) if form else image["contentEncoding"] == "base64"
    if default is None:  # every branch requires `workflow`, which tells them apart
        assert schemas["JobRequest"]["discriminator"]["propertyName"] == "workflow"
    else:
        assert "discriminator" not in schemas["JobRequest"]


def test_each_workflow_requires_what_the_validator_requires(served):
    doc = openapi_document(served, LIMIT)
    request = component(doc, "JobRequest")
    minimal = minimal_requests(doc)
    assert set(minimal) == set(served)
    for name in served:
        assert ("image" in minimal[name]) == (name in ("wan_i2v", "wan22_i2v"))
    for name, body in minimal.items():
        request.validate(body)
        assert validate_job(body, served)[0] == name
        # the form spells numbers as text; its schema names the same required fields
        form = {k: v if isinstance(v, str) else str(v) for k, v in body.items()}
        assert validate_job(form, served, form=True)[0] == name
        for field in body:
            short = {k: v for k, v in body.items() if k != field}
            if field == "workflow" and accepts(short, served):
                # what is left is a body of the default workflow (wan22_i2v's minimum is wan_i2v's)
                assert request.is_valid(short) and validate_job(short, served)[0] == default_workflow(served)
                continue
            assert not request.is_valid(short), (name, field)
            assert not accepts(short, served), (name, field)


def test_the_default_workflow_applies_when_workflow_is_left_out(served):
    doc = openapi_document(served, LIMIT)
    request = component(doc, "JobRequest")
    default = default_workflow(served)
    assert default == (DEFAULT_WORKFLOW if DEFAULT_WORKFLOW in served else
                       next(iter(served)) if len(served) == 1 else None)
    minimal = minimal_requests(doc)
    for name, body in minimal.items():
        for left_out in ({}, {"workflow": None}, {"workflow": ""}):
            bare = {**{k: v for k, v in body.items() if k != "workflow"}, **left_out}
            fields = set(bare) - {"workflow"}
            if default is None:
                assert not request.is_valid(bare) and not accepts(bare, served)
                continue
            assert branches(doc)[default]["properties"]["workflow"]["default"] == default
            # without `workflow` the request is the default's: valid only if the default accepts its fields
            expected = set(minimal[default]) - {"workflow"} <= fields <= set(served[default].params)
            assert request.is_valid(bare) == accepts(bare, served) == expected, (name, bare)


def test_document_and_validator_agree_at_every_bound(served):
    doc = openapi_document(served, LIMIT)
    request = component(doc, "JobRequest")
    minimal = minimal_requests(doc)
    checked = set()
    for name, branch in branches(doc).items():
        for field, schema in branch["properties"].items():
            if field == "workflow" or schema.get("contentEncoding") == "base64":
                continue
            for value in boundary_values(schema):
                body = {**minimal[name], field: value}
                assert request.is_valid(body) == accepts(body, served), (name, field, value)
            checked.add(schema["type"][0] if isinstance(schema["type"], list) else schema["type"])
    assert checked >= ({"string", "integer"} if set(served) - {"synthetic3"} else {"integer", "object"})


def test_a_request_for_one_workflow_is_refused_as_another_by_both():
    doc = openapi_document(WORKFLOWS, LIMIT)
    request = component(doc, "JobRequest")
    minimal = minimal_requests(doc)
    refused = 0
    for a, body in minimal.items():
        for b in WORKFLOWS:
            if a != b:
                moved = {**body, "workflow": b}
                # the whole schema and b's say the same, and the validator agrees with them
                agree = request.is_valid(moved) == component(doc, f"JobRequest_{b}").is_valid(moved)
                assert agree and request.is_valid(moved) == accepts(moved, WORKFLOWS), (a, b)
                refused += not accepts(moved, WORKFLOWS)
    assert refused >= 8  # an image where none is taken, a prompt that synthetic3 does not require, ...
    i2v = {**minimal["wan_i2v"], "workflow": "wan_t2v"}
    assert not component(doc, "JobRequest_wan_t2v").is_valid(i2v) and not accepts(i2v, WORKFLOWS)
    wan22 = {"prompt": "x", "guidance_scale_2": 2.0, "workflow": "wan_t2v"}
    assert not request.is_valid(wan22) and not accepts(wan22, WORKFLOWS)
    wan22["workflow"] = "wan22_t2v"
    assert request.is_valid(wan22) and accepts(wan22, WORKFLOWS)


def test_unknown_fields_and_workflows_are_refused_by_both():
    doc = openapi_document(WORKFLOWS, LIMIT)
    request = component(doc, "JobRequest")
    base = minimal_requests(doc)["synthetic3"]
    for body in ({**base, "strength": 0.5}, {**base, "workflow": "t2v_huge"}, {**base, "workflow": 3}):
        assert not request.is_valid(body) and not accepts(body, WORKFLOWS), body


def test_the_workflows_routes_are_documented():
    doc = openapi_document(WORKFLOWS, LIMIT)
    view = {"name": "w", "description": "", "default": True, "result": "c", "models": [], "images": [],
            "stages": {"c": {"kind": "synthetic", "model": "", "after": [], "outputs": [], "gpu": False}},
            "params": {"steps": {"type": "integer", "required": False, "default": 1, "schema": {}}}}
    component(doc, "Workflow").validate(view)
    wrong = {**view, "params": {"steps": {"type": "float", "required": False}}}
    assert not component(doc, "Workflow").is_valid(wrong)
    assert "404" in doc["paths"]["/v1/workflows/{name}"]["get"]["responses"]


def test_events_are_documented_as_sent():
    doc = openapi_document(WORKFLOWS, LIMIT)
    media = doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    item = doc["components"]["schemas"][media["schema"]["$ref"].rsplit("/", 1)[1]]
    assert set(item["required"]) == {"id", "event", "data"}
    assert item["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/Event"}
    component(doc, "EventStreamItem").validate({"id": "3", "event": "progress", "data": '{"seq":3}'})
    component(doc, "Event").validate({"seq": 3, "ts": 1.5, "type": "progress", "data": {"step": 1}})


def test_bodies_other_engineers_are_adding_are_allowed():
    doc = openapi_document(WORKFLOWS, LIMIT)
    component(doc, "Status").validate({"status": "not ready", "missing": ["denoise"],
                                       "reasons": ["denoise has no live worker"]})
    stage = {"workers": [], "queued": 0, "busy": 0, "running": 0, "stuck": [{"task": "t", "worker": "w"}]}
    component(doc, "Stages").validate({"stages": {"denoise": stage}, "missing": []})
    assert not component(doc, "Status").is_valid({"status": "x", "reasons": "not a list"})
