"""The OpenAPI 3.1 document of the REST API (``GET /v1/openapi.json``).

Built from the same field table the validator uses (``broker.api.FIELDS``,
passed in as JSON Schemas), so the documented bounds are the enforced ones.
"""

from __future__ import annotations

from typing import Any

VERSION = "0.1.0"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


def document(fields: dict[str, dict], required: list[str], workflows: list[str], default_workflow: str,
             max_request_bytes: int, image: dict[str, Any]) -> dict:
    """The whole document; ``fields`` maps each scalar request field to its JSON Schema."""
    image_rule = (f"{', '.join(image['formats'])}, {image['min_side']}x{image['min_side']} to "
                  f"{image['max_side']}x{image['max_side']} pixels, at most {max_request_bytes} bytes. Required by "
                  "workflows with an image_encode or vae_encode stage.")
    workflow = {"type": "string", "enum": workflows, "default": default_workflow,
                "description": "The workflow to run."}
    json_request = {
        "type": "object", "additionalProperties": False, "required": required,
        "properties": {**fields, "workflow": workflow,
                       "image": {"type": "string", "contentEncoding": "base64",
                                 "description": "Base64 image (a data: URL prefix is accepted): " + image_rule}},
    }
    form_request = {
        "type": "object", "additionalProperties": False, "required": required,
        "properties": {**fields, "workflow": workflow,
                       "image": {"type": "string", "contentMediaType": "application/octet-stream",
                                 "description": "The image as a file part: " + image_rule}},
    }
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Job id."}
    not_found = _error("No job with this id.")
    schemas = {
        "JobRequest": json_request,
        "JobRequestForm": form_request,
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
                **{k: {"type": ["number", "null"], "description": "Unix time"}
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
                "created": {"type": "number"}, "finished": {"type": ["number", "null"]},
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
                           "created": {"type": "number"}, "finished": {"type": ["number", "null"]},
                           "reason": {"type": ["string", "null"]}, "links": _ref("Links")},
        },
        "Event": {
            "type": "object", "required": ["seq", "ts", "type", "data"],
            "description": "One server-sent event, sent as `id: <seq>`, `event: <type>`, `data: <this object>`.",
            "properties": {
                "seq": {"type": "integer"}, "ts": {"type": "number"},
                "type": {"type": "string", "enum": ["queued", "requeued", "stage_assigned", "stage_started",
                                                    "progress", "stage_finished", "stage_retry",
                                                    "succeeded", "failed", "cancelled"]},
                "data": {"type": "object"},
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
            "type": "object",
            "properties": {"workers": {"type": "array", "items": _ref("Worker")}, "queued": {"type": "integer"},
                           "busy": {"type": "integer"}, "running": {"type": "integer"}},
        },
        "Stages": {
            "type": "object", "required": ["stages", "missing"],
            "properties": {"stages": {"type": "object", "additionalProperties": _ref("Stage")},
                           "missing": {"type": "array", "items": {"type": "string"},
                                       "description": "Stages without a live, non-draining worker."},
                           "workflows": {"type": "object"}},
        },
        "Status": {
            "type": "object", "required": ["status"],
            "properties": {"status": {"type": "string"}, "missing": {"type": "array", "items": {"type": "string"}}},
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
                    "400": _error("A field is missing, malformed or out of bounds, or the body is not valid."),
                    "413": _error(f"The body is larger than {max_request_bytes} bytes."),
                    "415": _error("The body is neither application/json nor multipart/form-data."),
                },
            },
            "get": {
                "summary": "Recent jobs, newest first",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                           "maximum": 1000, "default": 20}}],
                "responses": {
                    "200": _json({"type": "object", "properties": {"jobs": {"type": "array",
                                                                            "items": _ref("JobSummary")}}},
                                 "Jobs."),
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
                               " every 15 s while idle. Each event's data is an Event object.",
                "responses": {"200": {"description": "An event stream.",
                                      "content": {"text/event-stream": {"schema": _ref("Event")}}},
                              "400": _error("Bad Last-Event-ID."), "404": not_found},
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
        "/v1/openapi.json": {"get": {"summary": "This document",
                                     "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")}}},
        "/healthz": {"get": {"summary": "The process is up",
                             "responses": {"200": _json(_ref("Status"), "Up.")}}},
        "/readyz": {"get": {"summary": "Every served stage has a live worker",
                            "responses": {"200": _json(_ref("Status"), "Ready."),
                                          "503": _json(_ref("Status"), "Not ready; `missing` lists the stages.")}}},
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
