"""The OpenAPI 3.1 document of the REST API (``GET /v1/openapi.json``).

Generated, never written by hand where the validator has a say: the caller
(``broker.api.openapi_document``) passes the validator's own declarations,

- ``fields``: each request field but ``image`` and ``workflow``, as the JSON
  Schema its declaration produces (bounds, ``multipleOf``, ``maxLength``, the
  values of a ``4k+1`` field);
- ``workflows``: each served workflow and the fields a submission for it must
  carry (``image`` where the workflow reads one),

so the documented rules are the enforced ones. The request schema is the
union of the fields (``additionalProperties: false``) and a ``oneOf`` with one
branch per workflow, which names the workflow and its required fields; the
default workflow's branch also matches a request without ``workflow``.
What JSON Schema cannot say (an image that decodes, its size, the body
limit) is a documented 4xx.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

VERSION = "0.1.0"
EVENT_TYPES = ["queued", "requeued", "stage_assigned", "stage_started", "progress", "stage_finished",
               "stage_retry", "succeeded", "failed", "cancelled"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


def request_schema(fields: Mapping[str, dict], image: dict, workflows: Mapping[str, Sequence[str]],
                   default_workflow: str | None) -> dict:
    """One submission body: every field, and per workflow which of them it requires.

    ``workflows`` maps each served workflow to its required fields; the branch
    of ``default_workflow`` (None: no default is served) also matches when
    ``workflow`` is left out, the others require it, so exactly one branch
    matches any request that names a served workflow or none.
    """
    names = sorted(workflows)
    workflow: dict[str, Any] = {"type": "string", "enum": names, "description": "The workflow to run."}
    if default_workflow in workflows:
        workflow["default"] = default_workflow
        workflow["description"] += f" Left out, null or empty: {default_workflow}."
    else:
        workflow["description"] += " Required: the default workflow is not served here."
    first = list(workflows[names[0]]) if names else []
    common = [f for f in first if all(f in workflows[n] for n in names)]
    schema: dict[str, Any] = {
        "type": "object", "additionalProperties": False, "required": common,
        "properties": {**fields, "workflow": workflow, "image": image},
        "description": "A job. An optional field left out or null takes its default.",
    }
    branches = []
    for name in names:
        required = list(workflows[name])
        if name != default_workflow:
            required.append("workflow")
        branches.append({"title": name, "description": f"A {name} job: it requires {', '.join(required)}.",
                         "properties": {"workflow": {"const": name}}, "required": required})
    if branches:
        schema["oneOf"] = branches
    return schema


def document(fields: Mapping[str, dict], workflows: Mapping[str, Sequence[str]], default_workflow: str | None,
             max_request_bytes: int, image: Mapping[str, Any]) -> dict:
    """The whole document.

    ``fields`` maps each request field but ``image`` and ``workflow`` to its JSON
    Schema; ``workflows`` maps each served workflow to the fields it requires;
    ``image`` holds the accepted ``formats`` and ``min_side``/``max_side``.
    """
    image_rule = (f"{', '.join(image['formats'])}, {image['min_side']}x{image['min_side']} to "
                  f"{image['max_side']}x{image['max_side']} pixels, at most {max_request_bytes} bytes. Required by "
                  "workflows with an image_encode or vae_encode stage (see each workflow's branch).")
    json_image = {"type": "string", "minLength": 1, "contentEncoding": "base64",
                  "description": "Base64 image (a data: URL prefix is accepted): " + image_rule}
    form_image = {"type": "string", "minLength": 1, "contentMediaType": "application/octet-stream",
                  "description": "The image as a file part: " + image_rule}
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Job id."}
    not_found = _error("No job with this id.")
    nullable_number = {"type": ["number", "null"]}
    schemas = {
        "JobRequest": request_schema(fields, json_image, workflows, default_workflow),
        "JobRequestForm": request_schema(fields, form_image, workflows, default_workflow),
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
                    "multipart/form-data": {"schema": _ref("JobRequestForm")},
                }},
                "responses": {
                    "201": {**_json(_ref("JobCreated"), "Accepted and durable; Location names the job."),
                            "headers": {"Location": {"schema": {"type": "string"}}}},
                    "400": _error("A field is missing, malformed or out of bounds, the image does not decode or "
                                  "is too small or large, or the body is not valid."),
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
    return {
        "openapi": "3.1.0",
        "info": {"title": "OnePiece broker", "version": VERSION,
                 "description": "Multi-stage image-to-video jobs: submit, follow, fetch, cancel. "
                                "Every error is JSON with `error` and `field`."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
