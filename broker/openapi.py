"""The OpenAPI 3.1 document of the REST API (``GET /v1/openapi.json``).

Generated, never written by hand where the validator has a say: the caller
(``broker.api.openapi_document``) passes, for each served workflow, what its
``[params.NAME]`` tables declare:

- ``params``: each parameter's JSON Schema as its declaration produces it
  (bounds, ``multipleOf``, ``maxLength``, the values of a ``4k+1`` integer,
  the default);
- ``required``: the parameters a submission must carry;
- ``images``: the image parameters, sent as base64 in JSON and as a file part
  in a form,

so the documented rules are the enforced ones. Each workflow has its own
request schema (``JobRequest_<name>``, ``additionalProperties: false``): its
parameters and ``workflow`` as a constant, which it requires unless it is the
default workflow (that one also takes ``workflow`` left out, null or empty).
``JobRequest`` is the ``oneOf`` of them, and exactly one branch matches any
request that names a served workflow or none; ``JobRequestForm`` is the same
for multipart/form-data. What JSON Schema cannot say (an image that decodes,
its size, the body limit) is a documented 4xx.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .auth import ACCESS, OPEN

VERSION = "0.1.0"
EVENT_TYPES = ["queued", "requeued", "stage_assigned", "stage_started", "progress", "stage_finished",
               "stage_retry", "succeeded", "failed", "cancelled"]


SLO = {"type": ["object", "null"], "description": "The latency objective its jobs are served to ([slo]), if any.",
       "properties": {"p95_s": {"type": "number", "description": "p95 seconds from submission to result."},
                      "description": {"type": "string"}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


def component_name(workflow: str, form: bool = False) -> str:
    """The component of ``workflow``'s request schema: ``JobRequest_<name>`` (``JobRequestForm_<name>``)."""
    return f"JobRequest{'Form' if form else ''}_{workflow}"


def request_schema(name: str, workflow: Mapping[str, Any], image: dict, default: bool, form: bool = False) -> dict:
    """The body of a ``name`` job: its declared params, ``image`` standing in for each image param's
    schema, and ``workflow``, required unless ``default`` (then also null or empty; a form has no null)."""
    params = workflow["params"]
    required = list(workflow["required"])
    properties = {}
    for p, schema in params.items():
        if p in workflow["images"]:
            schema = {**image, "description": f"{schema.get('description', '')} {image['description']}".strip()}
        elif not form and p not in required:
            schema = nullable(schema)
        properties[p] = schema
    if default:
        properties["workflow"] = {"enum": [name, ""] if form else [name, "", None], "default": name,
                                  "description": f"{name}, the default workflow: it may be left out, null or empty."}
    else:
        properties["workflow"] = {"const": name, "description": "The workflow to run."}
        required.append("workflow")
    described = workflow["description"] or name
    return {
        "type": "object", "title": name, "additionalProperties": False, "required": required,
        "properties": properties,
        "description": f"A {name} job ({described}). It requires {', '.join(required) or 'nothing'}; an optional"
                       " parameter left out or null takes its default.",
    }


def nullable(schema: dict) -> dict:
    """``schema`` that also admits null: in JSON, an optional parameter sent as null is left out."""
    out = {**schema, "type": [schema["type"], "null"]}
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def request_union(workflows: Mapping[str, Any], default_workflow: str | None, form: bool) -> dict:
    """``oneOf`` the per-workflow request schemas; exactly one matches a request for a served workflow."""
    names = sorted(workflows)
    refs = [_ref(component_name(n, form)) for n in names]
    how = (f"Left out, `workflow` is {default_workflow}." if default_workflow
           else "`workflow` is required: more than one workflow is served and the default one is not.")
    schema: dict[str, Any] = {"oneOf": refs, "description": f"A job of one of the served workflows. {how}"}
    if default_workflow is None and names:  # every branch requires `workflow`: it tells them apart
        schema["discriminator"] = {"propertyName": "workflow",
                                   "mapping": {n: ref["$ref"] for n, ref in zip(names, refs, strict=True)}}
    return schema


def document(workflows: Mapping[str, Mapping[str, Any]], default_workflow: str | None, max_request_bytes: int,
             image: Mapping[str, Any], secured: bool = False) -> dict:
    """The whole document.

    ``workflows`` maps each served workflow to its ``description``, ``params``
    (name -> JSON Schema), ``required`` and ``images`` (param names);
    ``default_workflow`` is the one a request naming none gets (None: none);
    ``image`` holds the accepted ``formats`` and ``min_side``/``max_side``.
    """
    image_rule = (f"{', '.join(image['formats'])}, {image['min_side']}x{image['min_side']} to "
                  f"{image['max_side']}x{image['max_side']} pixels, at most {max_request_bytes} bytes.")
    json_image = {"type": "string", "minLength": 1, "contentEncoding": "base64",
                  "description": "Base64 (a data: URL prefix is accepted): " + image_rule}
    form_image = {"type": "string", "minLength": 1, "contentMediaType": "application/octet-stream",
                  "description": "A file part: " + image_rule}
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Job id."}
    not_found = _error("No job with this id.")
    nullable_number = {"type": ["number", "null"]}
    requests = {}
    for name, workflow in sorted(workflows.items()):
        requests[component_name(name)] = request_schema(name, workflow, json_image, name == default_workflow,
                                                        form=False)
        requests[component_name(name, form=True)] = request_schema(name, workflow, form_image,
                                                                   name == default_workflow, form=True)
    # how a form sends what is not text: images as files, maps as JSON (the validator reads both)
    encoding = {p: {"contentType": "image/png, image/jpeg, image/webp, application/octet-stream"}
                for w in workflows.values() for p in w["images"]}
    encoding.update({p: {"contentType": "application/json"} for w in workflows.values()
                     for p, schema in w["params"].items() if schema.get("type") == "object"})
    declared = {"type": "object", "description": "The declaration as the workflow file writes it.",
                "required": ["type", "required"],
                "properties": {"type": {"type": "string",
                                        "enum": ["string", "integer", "number", "boolean", "image", "map"]},
                               "required": {"type": "boolean"}, "default": {"description": "Its default; "
                                                                            "\"random\" for a random integer."},
                               "description": {"type": "string"}}}
    schemas = {
        "JobRequest": request_union(workflows, default_workflow, form=False),
        "JobRequestForm": request_union(workflows, default_workflow, form=True),
        **requests,
        "Param": {**declared, "properties": {**declared["properties"],
                                             "schema": {"type": "object", "description": "Its JSON Schema."}}},
        "WorkflowSummary": {
            "type": "object", "required": ["name", "description", "default", "result", "stages", "params", "links"],
            "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                           "default": {"type": "boolean", "description": "Whether a job naming no workflow "
                                                                         "gets this one."},
                           "result": {"type": "string", "description": "The stage whose output is the result."},
                           "stages": {"type": "array", "items": {"type": "string"}},
                           "params": {"type": "object", "additionalProperties": declared},
                           "slo": SLO,
                           "links": {"type": "object", "properties": {"self": {"type": "string"}}}},
        },
        "Workflow": {
            "type": "object",
            "required": ["name", "description", "default", "result", "stages", "params", "models", "images"],
            "properties": {
                "name": {"type": "string"}, "description": {"type": "string"}, "default": {"type": "boolean"},
                "result": {"type": "string", "description": "The stage whose output is the job's result."},
                "stages": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["kind", "model", "after", "outputs", "gpu"],
                    "properties": {"kind": {"type": "string"},
                                   "model": {"type": "string", "description": "The weights it holds; \"\": none."},
                                   "after": {"type": "array", "items": {"type": "string"}},
                                   "outputs": {"type": "array", "items": {"type": "string"}},
                                   "gpu": {"type": "boolean"}, "progress": {"type": "boolean"}}}},
                "models": {"type": "array", "items": {"type": "string"}},
                "images": {"type": "array", "items": {"type": "string"},
                           "description": "The image params: sent base64 in JSON, as a file part in a form."},
                "params": {"type": "object", "additionalProperties": _ref("Param")},
                "slo": SLO,
                "links": {"type": "object", "properties": {"self": {"type": "string"}}},
            },
        },
        "Error": {
            "type": "object", "required": ["error", "field"],
            "properties": {"error": {"type": "string", "description": "What is wrong, naming the field."},
                           "field": {"type": ["string", "null"], "description": "The offending field or header."}},
        },
        "Links": {"type": "object", "properties": {k: {"type": "string"} for k in ("self", "events", "result")}},
        "JobCreated": {
            "type": "object", "required": ["id", "state", "links"],
            "properties": {"id": {"type": "string"}, "state": {"const": "queued"}, "links": _ref("Links")},
        },
        "JobState": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
        "StageTask": {
            "type": "object",
            "properties": {
                "state": {"type": "string",
                          "enum": ["pending", "queued", "assigned", "running", "done", "failed", "cancelled"]},
                "worker": {"type": ["string", "null"]},
                "attempt": {"type": "integer"},
                **{k: {**nullable_number, "description": "Unix time"}
                   for k in ("queued", "assigned", "started", "finished")},
                "timings": {"type": "object", "additionalProperties": {"type": "number"}},
                "error": {"type": ["string", "null"]},
            },
        },
        "Job": {
            "type": "object", "required": ["id", "workflow", "state", "created", "links"],
            "properties": {
                "id": {"type": "string"}, "workflow": {"type": "string"}, "state": _ref("JobState"),
                "params": {"type": "object", "description": "The validated parameters (no image)."},
                "created": {"type": "number"}, "finished": nullable_number,
                "reason": {"type": ["string", "null"], "description": "Why it failed or was cancelled."},
                "stages": {"type": "object", "additionalProperties": _ref("StageTask")},
                "result": {"type": ["object", "null"], "description": "Result metadata; `url` once succeeded.",
                           "properties": {"url": {"type": "string"}}},
                "links": _ref("Links"),
            },
        },
        "JobSummary": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "workflow": {"type": "string"}, "state": _ref("JobState"),
                           "created": {"type": "number"}, "finished": nullable_number,
                           "reason": {"type": ["string", "null"]}, "links": _ref("Links")},
        },
        "Event": {
            "type": "object", "required": ["seq", "ts", "type", "data"],
            "description": "The JSON object on an event's `data:` line (see EventStreamItem).",
            "properties": {
                "seq": {"type": "integer", "description": "The event's number; also its `id:` line."},
                "ts": {"type": "number"},
                "type": {"type": "string", "enum": EVENT_TYPES, "description": "Also its `event:` line."},
                "data": {"type": "object"},
            },
        },
        "EventStreamItem": {
            "type": "object", "required": ["id", "event", "data"],
            "description": "One server-sent event as sent: the lines `id: <seq>`, `event: <type>` and "
                           "`data: <Event as one line of JSON>`, then an empty line.",
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$", "description": "The Event's seq."},
                "event": {"type": "string", "enum": EVENT_TYPES, "description": "The Event's type."},
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref("Event")},
            },
        },
        "Worker": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "load": {"type": "integer"}, "capacity": {"type": "integer"},
                           "draining": {"type": "boolean"}, "last_seen": {"type": "number"},
                           "registered": {"type": "number"}, "holding": {"type": "integer"},
                           "reported_load": {"type": ["integer", "null"]}, "info": {"type": "object"}},
        },
        "Stage": {
            "type": "object", "additionalProperties": True,
            "properties": {"workers": {"type": "array", "items": _ref("Worker")}, "queued": {"type": "integer"},
                           "busy": {"type": "integer"}, "running": {"type": "integer"},
                           "stuck": {"type": "array", "items": {"type": "object"},
                                     "description": "Tasks that look stuck, if any."}},
        },
        "Stages": {
            "type": "object", "required": ["stages", "missing"],
            "properties": {"stages": {"type": "object", "additionalProperties": _ref("Stage")},
                           "missing": {"type": "array", "items": {"type": "string"},
                                       "description": "Stages without a live, non-draining worker."},
                           "workflows": {"type": "object"},
                           "allocation": {"type": "object", "description": "With a node manager: per stage, "
                                                                           "its workers, starting, draining, target."},
                           "slots": {"type": "object", "description": "With a node manager: its GPU/CPU pools."},
                           "decisions": {"type": "array", "items": {"type": "object"},
                                         "description": "With a node manager: its recent decisions."}},
        },
        "StageSignals": {
            "type": "object",
            "properties": {**{k: {"type": "integer"} for k in ("arrivals", "completed", "retries", "queue_len",
                                                                "busy", "workers", "draining", "capacity", "load")},
                           "service_time_sum": {"type": "number"}, "oldest_wait_s": {"type": "number"}},
        },
        "Signals": {
            "type": "object", "required": ["now", "signals", "stages", "gpu"],
            "properties": {"now": {"type": "number", "description": "Unix time of the reading."},
                           "signals": {"type": "object", "additionalProperties": _ref("StageSignals"),
                                       "description": "Cumulative counters and gauges per stage."},
                           "stages": {"type": "object", "additionalProperties": _ref("Stage")},
                           "gpu": {"type": "object", "additionalProperties": {"type": "boolean"},
                                   "description": "Whether each stage runs on a GPU."}},
        },
        "Status": {
            "type": "object", "required": ["status"],
            "properties": {"status": {"type": "string"},
                           "missing": {"type": "array", "items": {"type": "string"},
                                       "description": "Stages without a live worker."},
                           "reasons": {"type": "array", "items": {"type": "string"},
                                       "description": "Why it is not ready, in words."}},
        },
    }
    paths = {
        "/v1/jobs": {
            "post": {
                "summary": "Submit a job",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": _ref("JobRequest")},
                    "multipart/form-data": {"schema": _ref("JobRequestForm"), "encoding": encoding},
                }},
                "responses": {
                    "201": {**_json(_ref("JobCreated"), "Accepted and durable; Location names the job."),
                            "headers": {"Location": {"schema": {"type": "string"}}}},
                    "400": _error("The workflow is unknown (or left out where no default is served), a parameter "
                                  "is unknown to it, missing, malformed or out of bounds, the image does not "
                                  "decode or is too small or large, or the body is not valid."),
                    "413": _error(f"The body is larger than {max_request_bytes} bytes."),
                    "415": _error("The body is neither application/json nor multipart/form-data."),
                },
            },
            "get": {
                "summary": "Recent jobs, newest first",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                           "maximum": 1000, "default": 20}}],
                "responses": {
                    "200": _json({"type": "object", "required": ["jobs"],
                                  "properties": {"jobs": {"type": "array", "items": _ref("JobSummary")}}}, "Jobs."),
                    "400": _error("Bad limit."),
                },
            },
        },
        "/v1/jobs/{id}": {
            "parameters": [job_id],
            "get": {"summary": "A job's state", "responses": {"200": _json(_ref("Job"), "The job."), "404": not_found}},
            "delete": {
                "summary": "Cancel a job",
                "responses": {
                    "202": _json({"type": "object", "properties": {"id": {"type": "string"},
                                                                   "state": {"const": "cancelled"}}}, "Cancelled."),
                    "404": not_found,
                    "409": _error("The job has already ended; the message names its state."),
                },
            },
        },
        "/v1/jobs/{id}/events": {
            "parameters": [job_id, {"name": "Last-Event-ID", "in": "header", "required": False,
                                    "schema": {"type": "integer"}, "description": "Resume after this event."}],
            "get": {
                "summary": "Progress as server-sent events",
                "description": "The job's past events, then live ones until it ends; a `: keep-alive` comment"
                               " every 15 s while idle. Each event is an EventStreamItem: `id:`, `event:` and"
                               " `data:` lines, the data an Event object as one line of JSON.",
                "responses": {
                    # Before OpenAPI 3.2's itemSchema, the schema of an event stream describes each event.
                    "200": {"description": "An event stream: `id: <seq>`, `event: <type>`, `data: <Event JSON>`"
                                           " per event, and `: keep-alive` comments.",
                            "content": {"text/event-stream": {"schema": _ref("EventStreamItem")}}},
                    "400": _error("Bad Last-Event-ID."), "404": not_found,
                },
            },
        },
        "/v1/jobs/{id}/result": {
            "parameters": [job_id],
            "get": {
                "summary": "The video",
                "responses": {
                    "200": {"description": "The mp4.",
                            "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
                    "307": {"description": "The result is in an object store (--results s3://...): follow "
                                           "Location, a presigned URL valid for a few minutes.",
                            "headers": {"Location": {"schema": {"type": "string"}}}},
                    "404": not_found,
                    "409": _error("The job has not succeeded; the message names its state."),
                    "410": _error("The job succeeded but its file is gone."),
                },
            },
        },
        "/v1/stages": {"get": {"summary": "Stages, their workers and queues",
                               "responses": {"200": _json(_ref("Stages"), "Stages.")}}},
        "/v1/signals": {"get": {"summary": "Cumulative per-stage counters, for a node manager in another process",
                                "responses": {"200": _json(_ref("Signals"), "Signals.")}}},
        "/v1/workflows": {"get": {
            "summary": "The served workflows",
            "description": "Each with its stages and parameters (type, required, default); `default` names the "
                           "workflow of a job that names none (null: a job must name one).",
            "responses": {"200": _json({"type": "object", "required": ["default", "workflows"],
                                        "properties": {"default": {"type": ["string", "null"]},
                                                       "workflows": {"type": "array",
                                                                     "items": _ref("WorkflowSummary")}}},
                                       "Workflows, by name.")}}},
        "/v1/workflows/{name}": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "Workflow name (see /v1/workflows)."}],
            "get": {
                "summary": "One served workflow",
                "description": "Its stages (kind, model, after, outputs, gpu), the models it uses, its result "
                               "stage and its parameters: each declaration with its JSON Schema, as the request "
                               "schema JobRequest_<name> uses them.",
                "responses": {"200": _json(_ref("Workflow"), "The workflow."),
                              "404": _error("No workflow of this name is served.")},
            },
        },
        "/v1/workers/{id}/drain": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "Worker id (see /v1/stages)."}],
            "post": {
                "summary": "Drain a worker",
                "description": "Bind nothing new to the worker and tell it to finish its tasks and leave.",
                "responses": {
                    "202": _json({"type": "object", "required": ["id", "state"],
                                  "properties": {"id": {"type": "string"}, "state": {"const": "draining"}}},
                                 "Draining."),
                    "404": _error("No registered worker with this id."),
                },
            },
        },
        "/v1/workers/{id}/lost": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "Worker id (see /v1/stages)."}],
            "post": {
                "summary": "Report a worker gone",
                "description": "For launchers (the node manager): the worker's process exited, so its tasks and "
                               "the outputs it held are re-made now instead of once its heartbeats lapse.",
                "responses": {
                    "202": _json({"type": "object", "required": ["id", "state"],
                                  "properties": {"id": {"type": "string"}, "state": {"const": "lost"}}},
                                 "Its work is being re-made."),
                    "404": _error("No registered worker with this id."),
                },
            },
        },
        "/v1/openapi.json": {"get": {"summary": "This document",
                                     "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")}}},
        "/healthz": {"get": {"summary": "The process is up",
                             "responses": {"200": _json(_ref("Status"), "Up.")}}},
        "/readyz": {"get": {"summary": "Every served stage has a live worker",
                            "responses": {"200": _json(_ref("Status"), "Ready."),
                                          "503": _json(_ref("Status"), "Not ready; `missing` lists the stages, "
                                                                       "`reasons` says why.")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Prometheus text format 0.0.4.",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    _secure(paths, secured)
    paths["/v1/jobs"]["post"]["responses"].setdefault("429", _error(
        "This key submits too fast (per-key token bucket); the Retry-After header says when to try again."))
    paths["/v1/jobs"]["post"]["responses"].setdefault("503", _error(
        "Too many unfinished jobs, of this key or in all; Retry-After says when to try again. Nothing "
        "accepted is dropped."))
    paths["/v1/jobs/{id}/events"]["get"]["responses"].setdefault("429", _error(
        "This key has too many event streams open; Retry-After says when to try again."))
    return {
        "openapi": "3.1.0",
        "info": {"title": "OnePiece broker", "version": VERSION,
                 "description": "Multi-stage video jobs, one request schema per workflow: submit, follow, "
                                "fetch, cancel. "
                                "Every error is JSON with `error` and `field`. "
                                "A broker started with API keys (--api-keys) needs `Authorization: Bearer <key>` "
                                "on every route but /healthz, /readyz and this document; each operation's "
                                "`x-scopes` says which scopes may call it (admin may call all). A key with "
                                "only `submit` sees and cancels its own jobs."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer",
                       "description": "An API key from `onepiece keys create` (op_<id>_<secret>)."}}},
    }


def _secure(paths: dict, secured: bool) -> None:
    """Each operation's security from the table the API enforces (broker/auth.py: ACCESS, OPEN):
    ``x-scopes`` always; the requirement itself only where this broker has keys (without them,
    on loopback or with --insecure, every route is open, and the document says so)."""
    for path, ops in paths.items():
        for method, op in ops.items():
            if method not in ("get", "post", "put", "patch", "delete", "head", "options"):
                continue  # "parameters" shared by a path's operations
            route = (method.upper(), path)
            if route in OPEN:
                op["security"] = []
                continue
            scopes = ACCESS.get(route)
            if scopes is None:
                raise AssertionError(f"{route} is neither open nor in broker.auth.ACCESS")
            op["security"] = [{"apiKey": []}] if secured else []
            op["x-scopes"] = list(scopes)
            if not secured:
                continue
            op.setdefault("responses", {})
            op["responses"].setdefault("401", _error("No valid API key (with keys configured)."))
            op["responses"].setdefault("403", _error(f"The key lacks the scope: one of {', '.join(scopes)}, "
                                                     "or admin."))
