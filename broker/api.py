"""The REST API of the broker (aiohttp), versioned under ``/v1``.

Routes::

    POST   /v1/jobs                 submit (JSON with a base64 image, or multipart/form-data)
    GET    /v1/jobs?limit=N         recent jobs, newest first
    GET    /v1/jobs/{id}            one job: state, per-stage timings, result link
    GET    /v1/jobs/{id}/events     server-sent events: history, then live until the job ends
    GET    /v1/jobs/{id}/result     the mp4 once the job succeeded
    DELETE /v1/jobs/{id}            cancel
    GET    /v1/stages               workers per stage, queue lengths, missing stages, and with a
                                    node manager its allocation, slots and recent decisions
    GET    /v1/signals              cumulative per-stage counters, for a node manager elsewhere
    GET    /v1/workflows            served workflows: stages, parameters (type, default, bounds)
    GET    /v1/workflows/{name}     one workflow: its stages (kind, model, after, outputs, gpu), its
                                    parameters with their JSON Schema, the models it uses, its result
    POST   /v1/workers/{id}/drain   bind nothing new to a worker; it finishes its work and leaves
    POST   /v1/workers/{id}/lost    a launcher saw the worker's process exit: its work is re-made now
    GET    /v1/openapi.json         OpenAPI 3.1 description of all of this
    GET    /healthz                 the process is up
    GET    /readyz                  every served stage has a live worker and no work is stuck
    GET    /metrics                 Prometheus text format

Every error is JSON ``{"error": "<message naming the field>", "field": "<name>"}``
with a 4xx status; bad input never reaches the broker and never costs a 500.
The request fields, their defaults and bounds are the ``[params.NAME]`` tables
of each served workflow (:mod:`stages.params`): the validator
(:func:`validate_job`, through :meth:`Workflow.resolve_params`), the OpenAPI
document (:func:`openapi_document`, one request schema per workflow) and
``GET /v1/workflows`` all read them, so they cannot disagree. A submission
that names no workflow is one of the default workflow (:func:`default_workflow`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image, UnidentifiedImageError

from stages.params import ParamError, show, type_name
from stages.workflow import Workflow

from . import openapi
from .auth import ACCESS, OPEN, ApiKey, KeyRing, allows, exposure_error, is_loopback
from .errors import CoreError, UnknownJob
from .limits import Limits, Refusal
from .service import Broker

log = logging.getLogger("onepiece.broker.api")

__all__ = ["Invalid", "default_workflow", "make_app", "openapi_document", "start_api", "validate_job",
           "workflow_view"]

DEFAULT_WORKFLOW = "wan_i2v"
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WEBP"}  # MPO: multi-picture camera JPEG
IMAGE_MAX_SIDE = 4096
IMAGE_MIN_SIDE = 16
HEARTBEAT_S = 15.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_LIST = 1000

BROKER: web.AppKey[Broker] = web.AppKey("broker", Broker)
KEYS: web.AppKey = web.AppKey("keys", object)  # a KeyRing, or None: no keys (loopback only, or --insecure)
LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
EXPOSED: web.AppKey[str] = web.AppKey("exposed", str)  # the non-loopback host served without keys
API_KEY: web.RequestKey = web.RequestKey("api_key", object)  # the request's ApiKey, with keys
INSECURE_WARN_S = 60.0
HEARTBEAT: web.AppKey[float] = web.AppKey("heartbeat_s", float)
STREAMS: web.AppKey[set] = web.AppKey("streams", set)


class Invalid(Exception):
    """A refused request: becomes ``{"error", "field"}`` with ``status``; ``reason`` labels the metric."""

    def __init__(self, field: str | None, message: str, status: int = 400, reason: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status
        self.reason = reason or (f"invalid_{field}" if field else "invalid")
        self.retry_after_s = retry_after_s  # 429/503: when to try again (a Retry-After header)


# -- validation ----------------------------------------------------------------------


def default_workflow(workflows: Mapping[str, Workflow]) -> str | None:
    """The workflow of a submission that names none: wan_i2v where it is served, else the only
    served workflow, else None (the submission must name one)."""
    if DEFAULT_WORKFLOW in workflows:
        return DEFAULT_WORKFLOW
    if len(workflows) == 1:
        return next(iter(workflows))
    return None


_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str, field: str = "image") -> bytes:
    """Standard or URL-safe base64, whitespace and a ``data:`` URL prefix allowed; errors name ``field``."""
    if text[:5].lower() == "data:":
        m = _DATA_URL.match(text)
        if m is None:
            raise Invalid(field, f"{field} is a data: URL but not a base64 one (expected data:<type>;base64,...)")
        text = text[m.end():]
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4) if len(text) % 4 != 1 else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Invalid(field, f"{field} is not valid base64: {exc}") from None


def check_image(data: bytes, max_bytes: int, field: str = "image") -> None:
    """Refuse anything that is not a whole PNG/JPEG/WEBP of sane size. CPU-bound: run it in a thread."""
    if not data:
        raise Invalid(field, f"{field} is empty")
    if len(data) > max_bytes:
        raise Invalid(field, f"{field} is {len(data)} bytes; the limit is {max_bytes}", reason="image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in IMAGE_FORMATS:
                raise Invalid(field, f"{field} is {fmt or 'of an unknown format'}; use PNG, JPEG or WEBP")
            w, h = im.size
            if w > IMAGE_MAX_SIDE or h > IMAGE_MAX_SIDE:
                raise Invalid(field, f"{field} is {w}x{h}; the largest accepted is {IMAGE_MAX_SIDE}x{IMAGE_MAX_SIDE}",
                              reason="image_too_large")
            if w < IMAGE_MIN_SIDE or h < IMAGE_MIN_SIDE:
                raise Invalid(field, f"{field} is {w}x{h}; the smallest accepted is {IMAGE_MIN_SIDE}x{IMAGE_MIN_SIDE}")
            im.verify()
        # verify() leaves the image unusable and misses truncated pixel data: decode it for real
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Invalid:
        raise
    except Image.DecompressionBombError:
        raise Invalid(field, f"{field} has too many pixels", reason="image_too_large") from None
    except UnidentifiedImageError:
        raise Invalid(field, f"{field} could not be decoded: not a PNG, JPEG or WEBP file") from None
    except Exception as exc:  # Pillow raises many kinds of error on hostile input
        raise Invalid(field, f"{field} could not be decoded ({type(exc).__name__}: {show(str(exc), 80)})") from None


def validate_job(body: Mapping[str, Any], workflows: Mapping[str, Workflow], form: bool = False
                 ) -> tuple[str, dict, dict[str, str | bytes]]:
    """Check a submission against its workflow's declared parameters, without touching the
    image bytes' contents.

    Returns ``(workflow name, params, images)``: ``params`` with every default
    filled (what the stages receive), ``images`` each given image param's value
    as sent, a base64 ``str`` or raw ``bytes``, still to go through
    :func:`decode_base64` and :func:`check_image`. ``form`` allows numbers and
    maps written as text, and bytes parts that are UTF-8 text.
    """
    name = body.get("workflow")
    if isinstance(name, (bytes, bytearray)) and form:
        name = _form_text("workflow", name)
    if name is None or name == "":
        name = default_workflow(workflows)
        if name is None:
            raise Invalid("workflow", f"workflow is required; served: {', '.join(sorted(workflows))}")
    if not isinstance(name, str):
        raise Invalid("workflow", f"workflow must be a string, not {type_name(name)}")
    if name not in workflows:
        raise Invalid("workflow", f"unknown workflow {show(name)}; served: {', '.join(sorted(workflows))}")
    wf = workflows[name]
    fields = {k: v for k, v in body.items() if k != "workflow"}
    if "image" in fields and "image" not in wf.params:
        raise Invalid("image", f"workflow {name!r} takes no image: leave image out (its parameters: "
                      f"{', '.join(wf.params) or 'none'})", reason="unknown_field")
    if form:  # a part sent as a file is text, but for an image
        texts = set(wf.params) - set(wf.images())
        fields = {k: _form_text(k, v) if isinstance(v, (bytes, bytearray)) and k in texts else v
                  for k, v in fields.items()}
    try:
        params = wf.resolve_params(fields, form=form)
    except ParamError as exc:
        raise Invalid(exc.field, exc.message, reason=None if exc.reason in ("invalid", "missing") else exc.reason
                      ) from None
    images: dict[str, str | bytes] = {}
    for image in wf.images():  # resolve_params leaves them to the caller
        value = fields.get(image)
        if value is None or (isinstance(value, (str, bytes, bytearray)) and not value):
            if wf.params[image].required:
                raise Invalid(image, f"{image} is required by workflow {name!r}")
            continue
        try:
            images[image] = wf.params[image].parse(value, form)
        except ParamError as exc:
            raise Invalid(exc.field, exc.message) from None
    return name, params, images


def _form_text(name: str, value: bytes) -> str:
    """A multipart part sent as bytes (a file part, or a part with a non-text type) as text."""
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid(name, f"{show(name)} is not UTF-8 text") from None


def _image_bytes(name: str, image: str | bytes, max_bytes: int) -> bytes:
    data = decode_base64(image, name) if isinstance(image, str) else bytes(image)
    check_image(data, max_bytes, name)
    return data


def _log_params(params: Mapping[str, Any]) -> str:
    """The short parameters of a job for its log line: numbers and flags, not texts or maps."""
    short = [f"{k}={v}" for k, v in params.items() if isinstance(v, (int, float)) and k != "seed"]
    return (", " + " ".join(short)) if short else ""


# -- request bodies ----------------------------------------------------------------------


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Invalid("body", "body is not valid JSON", reason="malformed_body") from None
    if not isinstance(body, dict):
        raise Invalid("body", f"body must be a JSON object, not {type_name(body)}", reason="malformed_body")
    return body


async def _form_body(request: web.Request) -> dict:
    """The parts of a multipart/form-data body by name: text parts as str, the others (files,
    parts of a non-text type, text that is not UTF-8) as bytes, for validate_job to sort out once
    it knows which fields are images. A part without a filename may still be an image."""
    limit = request.app[BROKER].settings.max_request_bytes
    parts: dict[str, list] = {}
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise Invalid("body", "every part of the multipart/form-data body must be a named field",
                              reason="malformed_body")
            data = bytearray()
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total)
                data.extend(chunk)
            value: str | bytes = part.decode(bytes(data))
            ctype = part.headers.get("Content-Type", "text/plain")
            if part.filename is None and ctype.startswith("text/"):
                try:
                    value = value.decode(part.get_charset(default="utf-8"))
                except (UnicodeDecodeError, LookupError):
                    pass  # stays bytes: an image part sent without a filename, or text validate_job refuses
            parts.setdefault(part.name, []).append(value)
    except (Invalid, web.HTTPException):
        raise
    except Exception as exc:  # aiohttp's multipart reader raises ValueError, AssertionError, ...
        raise Invalid("body", f"body is not valid multipart/form-data: {show(str(exc), 80)}",
                      reason="malformed_body") from None
    for name, values in parts.items():
        if len(values) > 1:
            raise Invalid(name, f"{show(name)} is given {len(values)} times", reason="duplicate_field")
    return {name: values[0] for name, values in parts.items()}


# -- handlers ------------------------------------------------------------------------------


def _error(status: int, field: str | None, message: str) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


def _links(job_id: str) -> dict:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "result": f"{base}/result"}


def _job_view(job: dict) -> dict:
    """The stored job without internal paths; the result is reached by its URL."""
    view = dict(job)
    links = _links(job["id"])
    result = job.get("result")
    if result:
        view["result"] = {k: v for k, v in result.items() if k != "path"}
        if job["state"] == "succeeded":
            view["result"]["url"] = links["result"]
    view["links"] = links
    return view


def _key(request: web.Request) -> ApiKey | None:
    """The API key of the request (None when the API has no keys)."""
    return request.get(API_KEY)


def _job_or_404(request: web.Request, job_id: str) -> dict:
    """The job, if it exists and the request's key may see it: a key with only ``submit`` sees its
    own jobs, and another key's job is answered as one that does not exist (no existence leak)."""
    job = request.app[BROKER].job(job_id)
    key = _key(request)
    if job is None or (key is not None and not allows(key, ("read",)) and job.get("owner") != key.id):
        raise Invalid("id", f"no job with id {show(job_id)}", status=404, reason="unknown_job")
    return job


def _refused(r: Refusal, what: str) -> Invalid:
    return Invalid(None, r.message, status=r.status, retry_after_s=r.retry_after_s,
                   reason="rate_limited" if r.status == 429 else f"{what}_overloaded")


async def submit(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    key = _key(request)
    # before the body is read: an overload costs as little as possible
    refusal = request.app[LIMITS].submit(key.id if key else None, asyncio.get_running_loop().time(),
                                         getattr(broker, "active_by_owner", {}).get(key.id, 0) if key else 0,
                                         getattr(broker, "active", 0))
    if refusal is not None:
        raise _refused(refusal, "jobs")
    ctype = request.content_type
    if ctype == "application/json":
        body, form = await _json_body(request), False
    elif ctype == "multipart/form-data":
        body, form = await _form_body(request), True
    else:
        raise Invalid("Content-Type", f"Content-Type {ctype!r} is not accepted; send application/json"
                      " or multipart/form-data", status=415, reason="unsupported_media_type")
    workflow, params, images = validate_job(body, broker.workflows, form)
    payload = None
    if images:
        limit = broker.settings.max_request_bytes
        payload = {k: await asyncio.to_thread(_image_bytes, k, v, limit) for k, v in images.items()}
    try:
        job_id = broker.submit(workflow, params, payload, **({"owner": key.id} if key is not None else {}))
    except CoreError as exc:
        raise Invalid("workflow", str(exc), reason="refused") from None
    links = _links(job_id)
    log.info("job %s accepted: %s%s%s", job_id, workflow, _log_params(params),
             f" (key {key.id})" if key is not None else "")
    return web.json_response({"id": job_id, "state": "queued", "links": links}, status=201,
                             headers={"Location": links["self"]})


async def list_jobs(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIST:
        raise Invalid("limit", f"limit must be an integer between 1 and {MAX_LIST}, got {show(raw)}")
    key = _key(request)
    mine = key is not None and not allows(key, ("read",))  # a submit key lists its own jobs
    jobs = request.app[BROKER].store.recent(limit, owner=key.id if mine else None)
    return web.json_response({"jobs": [{**j, "links": _links(j["id"])} for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    job = _job_or_404(request, request.match_info["id"])
    return web.json_response(_job_view(job), dumps=lambda o: json.dumps(o, default=str))


async def cancel_job(request: web.Request) -> web.Response:
    broker, job_id = request.app[BROKER], request.match_info["id"]
    job = _job_or_404(request, job_id)
    key = _key(request)
    if key is not None and "admin" not in key.scopes and job.get("owner") != key.id:
        # a read key sees every job but cancels none; only admin cancels another key's job
        raise Invalid("Authorization", f"key {key.id} may not cancel job {job_id}: cancelling needs the submit "
                      "scope and the job's own key, or admin", status=403, reason="forbidden")
    try:
        cancelled = broker.cancel(job_id)
    except UnknownJob:
        raise Invalid("id", f"no job with id {show(job_id)}", status=404, reason="unknown_job") from None
    if not cancelled:
        state = (broker.job(job_id) or {}).get("state", "gone")
        raise Invalid("id", f"job is already {state}", status=409, reason="conflict")
    return web.json_response({"id": job_id, "state": "cancelled"}, status=202)


async def get_result(request: web.Request) -> web.StreamResponse:
    broker, job_id = request.app[BROKER], request.match_info["id"]
    job = _job_or_404(request, job_id)
    if job["state"] != "succeeded":
        raise Invalid("id", f"job is {job['state']}", status=409, reason="conflict")
    located = broker.result_location(job_id)
    if located is None:
        raise Invalid("id", "the job succeeded but its result file is gone", status=410, reason="gone")
    if located.url is not None:  # in an object store: a short-lived presigned URL serves it
        raise web.HTTPTemporaryRedirect(located.url)
    return web.FileResponse(located.path, headers={"Content-Type": "video/mp4",
                                                   "Content-Disposition": f'attachment; filename="{job_id}.mp4"'})


def _sse(event: dict) -> bytes:
    data = json.dumps(event, default=str, separators=(",", ":"))
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


async def job_events(request: web.Request) -> web.StreamResponse:
    broker, job_id = request.app[BROKER], request.match_info["id"]
    _job_or_404(request, job_id)
    raw = request.headers.get("Last-Event-ID", "").strip()
    try:
        last = int(raw) if raw else -1
    except ValueError:
        raise Invalid("Last-Event-ID", f"Last-Event-ID must be an event id (an integer), got {show(raw)}",
                      reason="invalid_last_event_id") from None
    key = _key(request)
    limits = request.app[LIMITS]
    refusal = limits.enter_stream(key.id if key else None)
    if refusal is not None:
        raise _refused(refusal, "streams")
    try:
        return await _stream(request, broker, job_id, last)
    finally:
        limits.leave_stream(key.id if key else None)


async def _stream(request: web.Request, broker: Broker, job_id: str, last: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    history, queue = broker.subscribe(job_id)
    streams = request.app[STREAMS]
    streams.add(queue)
    try:
        await resp.prepare(request)
        for event in history:
            if event["seq"] > last:
                await resp.write(_sse(event))
                last = event["seq"]
        heartbeat = request.app[HEARTBEAT]
        while True:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
                async with asyncio.timeout(heartbeat):
                    event = await queue.get()
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            if event is None:
                break
            if event["seq"] > last:  # a live event the history already held
                await resp.write(_sse(event))
                last = event["seq"]
        await resp.write_eof()
    except ConnectionError:  # the client went away; nothing more to tell it
        log.debug("events of %s: the client disconnected", job_id)
    finally:
        streams.discard(queue)
        broker.unsubscribe(job_id, queue)
    return resp


async def stages(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    workflows = {name: {"description": wf.description, "result": wf.result,
                        "stages": {s: spec.kind for s, spec in wf.stages.items()}}
                 for name, wf in broker.workflows.items()}
    body = {"stages": broker.stages(), "missing": broker.missing_stages(), "workflows": workflows}
    manager = broker.extensions.get("manager")
    if manager is not None:
        body.update(allocation=manager.allocation(), slots=manager.slots(), decisions=manager.decisions(50))
    return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))


def workflow_view(wf: Workflow, default: bool, detail: bool = False) -> dict:
    """A workflow as ``GET /v1/workflows`` shows it; ``detail`` adds what ``/v1/workflows/{name}`` shows.

    Each param is its declaration in the workflow file's words (``type``,
    ``required``, ``default``, bounds, ``description``), so a client can build
    the same checks (``onepiece submit`` does); the detail adds its JSON Schema.
    """
    view: dict[str, Any] = {"name": wf.name, "description": wf.description, "default": default,
                            "result": wf.result, "links": {"self": f"/v1/workflows/{wf.name}"},
                            "slo": None if wf.slo is None else {"p95_s": wf.slo.p95_s,
                                                                 "description": wf.slo.description}}
    if detail:
        view["stages"] = {s: {"kind": spec.kind, "model": spec.model, "after": list(spec.after),
                              "outputs": list(spec.outputs), "gpu": spec.gpu, "progress": spec.progress}
                          for s, spec in wf.stages.items()}
        view["models"] = wf.models()
        view["images"] = wf.images()
        view["params"] = {n: {**p.declaration(), "schema": p.schema()} for n, p in wf.params.items()}
    else:
        view["stages"] = list(wf.stages)
        view["params"] = {n: {k: v for k, v in p.declaration().items() if k in ("type", "required", "default")}
                          for n, p in wf.params.items()}
    return view


async def list_workflows(request: web.Request) -> web.Response:
    workflows = request.app[BROKER].workflows
    default = default_workflow(workflows)
    return web.json_response({"default": default, "workflows": [workflow_view(wf, name == default)
                                                                for name, wf in sorted(workflows.items())]})


async def get_workflow(request: web.Request) -> web.Response:
    workflows, name = request.app[BROKER].workflows, request.match_info["name"]
    if name not in workflows:
        raise Invalid("name", f"no workflow {show(name)} is served; served: {', '.join(sorted(workflows))}",
                      status=404, reason="unknown_workflow")
    return web.json_response(workflow_view(workflows[name], name == default_workflow(workflows), detail=True))


async def signals(request: web.Request) -> web.Response:
    """Cumulative per-stage counters for a node manager running in another process."""
    import time

    broker = request.app[BROKER]
    gpu = {s: spec.gpu for wf in broker.workflows.values() for s, spec in wf.stages.items()}
    return web.json_response({"now": time.time(), "signals": broker.core.stage_signals(time.time()),
                              "stages": broker.stages(), "gpu": gpu})


async def drain_worker(request: web.Request) -> web.Response:
    """Bind nothing new to a worker and tell it to finish its work and leave."""
    broker, worker_id = request.app[BROKER], request.match_info["id"]
    try:
        broker.drain(worker_id)
    except CoreError:
        raise Invalid("id", f"no registered worker {show(worker_id)}", status=404, reason="unknown_worker") from None
    return web.json_response({"id": worker_id, "state": "draining"}, status=202)


async def lost_worker(request: web.Request) -> web.Response:
    """A launcher saw the worker's process exit: its work is re-run now, not when heartbeats lapse."""
    broker, worker_id = request.app[BROKER], request.match_info["id"]
    try:
        broker.lost(worker_id, "its launcher saw its process exit")
    except CoreError:
        raise Invalid("id", f"no registered worker {show(worker_id)}", status=404, reason="unknown_worker") from None
    return web.json_response({"id": worker_id, "state": "lost"}, status=202)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    missing, reasons = request.app[BROKER].readiness()
    reasons = [f"no live worker serves stage {s}" for s in missing] + reasons
    if reasons:
        return web.json_response({"status": "not ready", "missing": missing, "reasons": reasons}, status=503)
    return web.json_response({"status": "ready", "missing": [], "reasons": []})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[BROKER].metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi_json(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    return web.json_response(openapi_document(broker.workflows, broker.settings.max_request_bytes,
                                              secured=request.app[KEYS] is not None))


def openapi_document(workflows: Mapping[str, Workflow], max_request_bytes: int, secured: bool = False) -> dict:
    """The OpenAPI document of this API serving ``workflows``, from the declarations the validator reads;
    ``secured``: the API has keys, and every route but the open ones requires one."""
    return openapi.document(
        {name: {"description": wf.description, "params": {n: p.schema() for n, p in wf.params.items()},
                "required": [n for n, p in wf.params.items() if p.required], "images": wf.images()}
         for name, wf in workflows.items()},
        default_workflow(workflows),
        max_request_bytes,
        {"max_side": IMAGE_MAX_SIDE, "min_side": IMAGE_MIN_SIDE, "formats": sorted(set(IMAGE_FORMATS.values()))},
        secured)


# -- the application ---------------------------------------------------------------------


def check_exposure(settings, host: str) -> None:
    """CoreError if the REST API may not be served on ``host`` with these settings."""
    why = exposure_error("the REST API", host, getattr(settings, "api_keys", None) is not None,
                         bool(getattr(settings, "insecure", False)))
    if why:
        raise CoreError(why)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """Every refusal becomes JSON; a bug becomes a logged 500, and the service keeps serving."""
    try:
        return await handler(request)
    except Invalid as exc:
        if request.method == "POST" and request.path == "/v1/jobs" and exc.status != 404:
            request.app[BROKER].metrics.rejected.labels(exc.reason).inc()
        resp = _error(exc.status, exc.field, exc.message)
        if exc.retry_after_s is not None:
            resp.headers["Retry-After"] = str(exc.retry_after_s)
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            request.app[BROKER].metrics.rejected.labels("too_large").inc()
            limit = request.app[BROKER].settings.max_request_bytes
            if "form fields" in (exc.text or ""):
                return _error(413, "body", exc.text)
            return _error(413, "body", f"body is larger than the limit of {limit} bytes")
        if exc.status == 404:
            return _error(404, "path", f"no route {request.method} {show(request.path, 80)}")
        if exc.status == 405:
            resp = _error(405, "method", f"{request.method} is not allowed on {show(request.path, 80)}")
            if "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        return _error(exc.status, None, exc.reason or exc.text or "bad request")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, None, "internal error")


def _unauthorized(message: str) -> web.Response:
    resp = _error(401, "Authorization", message)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="onepiece"'
    return resp


@web.middleware
async def _auth(request: web.Request, handler) -> web.StreamResponse:
    """With keys: every route but OPEN needs a valid bearer key (401) with one of the scopes
    ACCESS names for it (403, saying which). Without keys (loopback, or --insecure): open."""
    keys = request.app[KEYS]
    if keys is None:
        return await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    method = "GET" if request.method == "HEAD" else request.method
    if route is None or (method, route) in OPEN or (method, route) not in ACCESS:
        return await handler(request)  # open, or no such route: the router's 404/405 say so
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        return _unauthorized("this route needs an API key: send 'Authorization: Bearer <key>' "
                             "(onepiece keys create makes one)")
    if scheme.lower() != "bearer" or not token.strip():
        return _unauthorized("the Authorization header must be 'Bearer <key>'")
    key = keys.authenticate(token.strip())
    if key is None:
        request.app[BROKER].metrics.rejected.labels("unauthorized").inc()
        return _unauthorized("the API key is not valid (unknown, revoked or mistyped)")
    need = ACCESS[(method, route)]
    if not allows(key, need):
        return _error(403, "Authorization", f"key {key.id} ({', '.join(sorted(key.scopes))}) may not {method} "
                      f"{route}: it needs the scope {' or '.join(need)}{'' if 'admin' in need else ' (or admin)'}")
    request[API_KEY] = key
    return await handler(request)


async def _warn_open(app: web.Application) -> AsyncIterator[None]:
    """--insecure beyond loopback: say so every minute for as long as it serves."""
    async def loop():
        while True:
            log.warning("the REST API is served on %s without API keys (--insecure): anyone who can reach it "
                        "controls this service", app[EXPOSED])
            await asyncio.sleep(INSECURE_WARN_S)

    task = asyncio.get_running_loop().create_task(loop(), name="insecure-warning")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _end_streams(app: web.Application) -> None:
    # Open event streams would hold the shutdown for their whole life: end them.
    for queue in list(app[STREAMS]):
        queue.put_nowait(None)


def make_app(broker: Broker, heartbeat_s: float = HEARTBEAT_S, keys: KeyRing | None = None) -> web.Application:
    """The API of ``broker``; ``keys`` (default: the settings' ``api_keys`` file, if any) guards it."""
    app = web.Application(client_max_size=broker.settings.max_request_bytes, middlewares=[_errors, _auth])
    path = getattr(broker.settings, "api_keys", None)
    if keys is None and path is not None:
        keys = KeyRing(path)
    app[KEYS] = keys
    # the broker's, which bound control-socket SUBMIT too (a stand-in broker: from its settings)
    app[LIMITS] = getattr(broker, "limits", None) or Limits.from_settings(broker.settings)
    app[BROKER] = broker
    app[HEARTBEAT] = heartbeat_s
    app[STREAMS] = set()
    app.on_shutdown.append(_end_streams)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/jobs/{id}/events", job_events, allow_head=False)  # a stream has no HEAD
    app.router.add_get("/v1/jobs/{id}/result", get_result)
    app.router.add_get("/v1/stages", stages)
    app.router.add_get("/v1/signals", signals)
    app.router.add_get("/v1/workflows", list_workflows)
    app.router.add_get("/v1/workflows/{name}", get_workflow)
    app.router.add_post("/v1/workers/{id}/drain", drain_worker)
    app.router.add_post("/v1/workers/{id}/lost", lost_worker)
    app.router.add_get("/v1/openapi.json", openapi_json)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_api(broker: Broker, host: str, port: int, heartbeat_s: float = HEARTBEAT_S
                    ) -> tuple[web.AppRunner, int]:
    """Serve the API on ``host:port`` (0 picks a free port); returns the runner and the bound port.
    Stop it with ``await runner.cleanup()`` before stopping the broker. Beyond loopback it needs
    API keys or ``insecure`` (CoreError, saying how to make keys, before anything is bound)."""
    check_exposure(broker.settings, host)
    app = make_app(broker, heartbeat_s)
    if app[KEYS] is None and getattr(broker.settings, "insecure", False) and not is_loopback(host):
        app[EXPOSED] = host
        app.cleanup_ctx.append(_warn_open)
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CoreError(f"cannot serve the REST API on {host}:{port}: {exc}") from exc
    bound = runner.addresses[0][1]
    log.info("REST API on http://%s:%d", host, bound)
    return runner, bound
