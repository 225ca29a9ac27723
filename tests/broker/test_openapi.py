"""The OpenAPI document and the validator agree: cases are derived from the document
and put to both (no server; ``tests/test_schemathesis.py`` fuzzes a running one)."""

from __future__ import annotations

import base64
import io
import math
from types import SimpleNamespace

import pytest
from jsonschema import Draft202012Validator
from PIL import Image

from broker.api import DEFAULT_WORKFLOW, FIELDS, Invalid, make_app, openapi_document, validate_job
from stages.workflow import load_workflow

LIMIT = 1 << 20
WORKFLOWS = {name: load_workflow(name) for name in ("wan_i2v", "synthetic3")}
SERVED = [("wan_i2v", "synthetic3"), ("synthetic3",), ("wan_i2v",)]


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
    if schema["type"] == "integer":
        step = schema.get("multipleOf", 1)
        return math.ceil(schema["minimum"] / step) * step
    return schema["minimum"]


def minimal_requests(doc: dict) -> dict[str, dict]:
    """Per workflow branch of the request schema: a body with exactly the fields it requires."""
    request = doc["components"]["schemas"]["JobRequest"]
    out = {}
    for branch in request["oneOf"]:
        properties = {**request["properties"], **branch["properties"]}
        required = dict.fromkeys([*request["required"], *branch["required"]])
        out[branch["title"]] = {name: simplest(properties[name]) for name in required}
    return out


def boundary_values(schema: dict) -> list:
    """Values at and just past every bound the document states, and of the wrong type."""
    wrong_type = [True, [1], {"a": 1}]
    if schema["type"] == "string":
        n = schema["maxLength"]
        return ["", " ", "\t\n", "x", " x ", "x" * n, "x" * (n + 1), 5, *wrong_type]
    lo, hi = schema["minimum"], schema["maximum"]
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


def test_each_workflow_requires_what_the_validator_requires(served):
    doc = openapi_document(served, LIMIT)
    request = component(doc, "JobRequest")
    minimal = minimal_requests(doc)
    assert set(minimal) == set(served)
    assert ("image" in minimal["wan_i2v"]) if "wan_i2v" in served else True
    assert "image" not in minimal.get("synthetic3", {})
    for name, body in minimal.items():
        request.validate(body)
        assert validate_job(body, served)[0] == name
        # the form spells numbers as text; its schema names the same required fields
        form = {k: v if isinstance(v, str) else str(v) for k, v in body.items()}
        assert validate_job(form, served, form=True)[0] == name
        for field in body:
            short = {k: v for k, v in body.items() if k != field}
            assert not request.is_valid(short), (name, field)
            assert not accepts(short, served), (name, field)


def test_the_default_workflow_applies_when_workflow_is_left_out(served):
    doc = openapi_document(served, LIMIT)
    workflow = doc["components"]["schemas"]["JobRequest"]["properties"]["workflow"]
    request = component(doc, "JobRequest")
    for name, body in minimal_requests(doc).items():
        body = {k: v for k, v in body.items() if k != "workflow"}
        if DEFAULT_WORKFLOW in served:
            assert workflow["default"] == DEFAULT_WORKFLOW
            # without `workflow` the request is the default's: valid only if it has what the default requires
            assert request.is_valid(body) == accepts(body, served) == (set(body) >= set(minimal_requests(doc)[
                DEFAULT_WORKFLOW]) - {"workflow"})
        else:
            assert "default" not in workflow
            assert not request.is_valid(body) and not accepts(body, served)


@pytest.mark.parametrize("field", list(FIELDS))
def test_document_and_validator_agree_at_every_bound(field, served):
    doc = openapi_document(served, LIMIT)
    request = component(doc, "JobRequest")
    schema = doc["components"]["schemas"]["JobRequest"]["properties"][field]
    for base in minimal_requests(doc).values():
        for value in boundary_values(schema):
            body = {**base, field: value}
            assert request.is_valid(body) == accepts(body, served), (field, value)


def test_unknown_fields_and_workflows_are_refused_by_both():
    doc = openapi_document(WORKFLOWS, LIMIT)
    request = component(doc, "JobRequest")
    base = minimal_requests(doc)["synthetic3"]
    for body in ({**base, "strength": 0.5}, {**base, "workflow": "t2v_huge"}, {**base, "workflow": 3}):
        assert not request.is_valid(body) and not accepts(body, WORKFLOWS), body


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
