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
    POST   /v1/workers/{id}/drain   bind nothing new to a worker; it finishes its work and leaves
    POST   /v1/workers/{id}/lost    a launcher saw the worker's process exit: its work is re-made now
    GET    /v1/openapi.json         OpenAPI 3.1 description of all of this
    GET    /healthz                 the process is up
    GET    /readyz                  every served stage has a live worker and no work is stuck
    GET    /metrics                 Prometheus text format

Every error is JSON ``{"error": "<message naming the field>", "field": "<name>"}``
with a 4xx status; bad input never reaches the broker and never costs a 500.
The request fields, their defaults and bounds are one table (``FIELDS``), and
what each workflow requires is one function (``required_fields``): the
validator and the OpenAPI document (``openapi_document``) both read them, so
they cannot disagree.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from . import openapi
from .errors import CoreError, UnknownJob
from .service import Broker

log = logging.getLogger("onepiece.broker.api")

__all__ = ["FIELDS", "Invalid", "make_app", "openapi_document", "required_fields", "start_api", "validate_job"]

DEFAULT_WORKFLOW = "wan_i2v"
IMAGE_KINDS = frozenset({"image_encode", "vae_encode"})  # stage kinds that read the input image
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WEBP"}  # MPO: multi-picture camera JPEG
IMAGE_MAX_SIDE = 4096
IMAGE_MIN_SIDE = 16
HEARTBEAT_S = 15.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_LIST = 1000

BROKER: web.AppKey[Broker] = web.AppKey("broker", Broker)
HEARTBEAT: web.AppKey[float] = web.AppKey("heartbeat_s", float)
STREAMS: web.AppKey[set] = web.AppKey("streams", set)


class Invalid(Exception):
    """A refused request: becomes ``{"error", "field"}`` with ``status``; ``reason`` labels the metric."""

    def __init__(self, field: str | None, message: str, status: int = 400, reason: str | None = None):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status
        self.reason = reason or (f"invalid_{field}" if field else "invalid")


def _show(value: Any, limit: int = 40) -> str:
    """A value for an error message, cut short: a client's input is never echoed at length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


# -- the request fields ----------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    name: str
    max_length: int
    required: bool = False
    default: str = ""
    description: str = ""

    def parse(self, raw: Any, form: bool) -> str:
        if not isinstance(raw, str):
            raise Invalid(self.name, f"{self.name} must be a string, not {_type_name(raw)}")
        if self.required and not raw.strip():
            raise Invalid(self.name, f"{self.name} must not be empty")
        if len(raw) > self.max_length:
            raise Invalid(self.name, f"{self.name} is {len(raw)} characters long; the limit is {self.max_length}")
        return raw

    def make_default(self) -> str:
        return self.default

    def schema(self) -> dict:
        s: dict[str, Any] = {"type": "string", "maxLength": self.max_length, "description": self.description}
        if self.required:
            s.update(minLength=1, pattern=r"\S")  # not blank: parse() strips before it checks
        else:
            s["default"] = self.default
        return s


_INT_RE = re.compile(r"[+-]?\d{1,25}")


@dataclass(frozen=True)
class Integer:
    name: str
    minimum: int
    maximum: int
    default: int | None = None
    default_factory: Callable[[], int] | None = None
    multiple_of: int | None = None
    congruent: tuple[int, int] | None = None  # (m, r): value % m == r, as for 4k+1 frames
    description: str = ""
    required: bool = False

    def parse(self, raw: Any, form: bool) -> int:
        if form and isinstance(raw, str):
            if not _INT_RE.fullmatch(raw.strip()):
                raise Invalid(self.name, f"{self.name} must be an integer, got {_show(raw)}")
            raw = int(raw)
        if isinstance(raw, float) and raw.is_integer():  # JSON Schema's "integer" admits 480.0
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise Invalid(self.name, f"{self.name} must be an integer, not {_type_name(raw)}")
        if not self.minimum <= raw <= self.maximum:
            raise Invalid(self.name, f"{self.name} must be between {self.minimum} and {self.maximum},"
                                     f" got {_show(raw)}")
        if self.multiple_of and raw % self.multiple_of:
            raise Invalid(self.name, f"{self.name} must be a multiple of {self.multiple_of}, got {raw}")
        if self.congruent and raw % self.congruent[0] != self.congruent[1]:
            m, r = self.congruent
            examples = ", ".join(str(m * k + r) for k in range(1, 4))
            raise Invalid(self.name, f"{self.name} must be {m}k+{r} ({examples}, ...), got {raw}")
        return raw

    def make_default(self) -> int | None:
        return self.default_factory() if self.default_factory else self.default

    def schema(self) -> dict:
        s: dict[str, Any] = {"type": "integer", "minimum": self.minimum, "maximum": self.maximum,
                             "description": self.description}
        if self.default is not None:
            s["default"] = self.default
        if self.multiple_of:
            s["multipleOf"] = self.multiple_of
        if self.congruent:
            m, r = self.congruent
            s["x-congruent"] = {"modulus": m, "remainder": r}
            # JSON Schema has no "x % m == r"; a bounded range can list its values instead
            first = self.minimum + (r - self.minimum) % m
            if (self.maximum - first) // m < 256:
                s["enum"] = list(range(first, self.maximum + 1, m))
        return s


@dataclass(frozen=True)
class Number:
    name: str
    minimum: float
    maximum: float
    default: float
    description: str = ""
    required: bool = False

    def parse(self, raw: Any, form: bool) -> float:
        if form and isinstance(raw, str):
            try:
                raw = float(raw)
            except ValueError:
                raise Invalid(self.name, f"{self.name} must be a number, got {_show(raw)}") from None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise Invalid(self.name, f"{self.name} must be a number, not {_type_name(raw)}")
        raw = float(raw)
        if not math.isfinite(raw) or not self.minimum <= raw <= self.maximum:
            raise Invalid(self.name, f"{self.name} must be between {self.minimum:g} and {self.maximum:g},"
                                     f" got {_show(raw)}")
        return raw

    def make_default(self) -> float:
        return self.default

    def schema(self) -> dict:
        return {"type": "number", "minimum": self.minimum, "maximum": self.maximum, "default": self.default,
                "description": self.description}


FIELDS: dict[str, Text | Integer | Number] = {f.name: f for f in (
    Text("prompt", 2000, required=True, description="What the video shows."),
    Text("negative_prompt", 2000, description="What it must not show."),
    Integer("height", 64, 1280, default=480, multiple_of=16, description="Frame height in pixels."),
    Integer("width", 64, 1280, default=832, multiple_of=16, description="Frame width in pixels."),
    Integer("num_frames", 1, 161, default=81, congruent=(4, 1),
            description="Frames in the video; (num_frames - 1) must be a multiple of 4."),
    Integer("steps", 1, 100, default=40, description="Denoising steps."),
    Number("guidance_scale", 0.0, 20.0, default=5.0, description="Classifier-free guidance scale."),
    Integer("seed", 0, 2**63 - 1, default_factory=lambda: secrets.randbelow(2**63),
            description="Random seed; a random one when left out."),
)}
OTHER_FIELDS = ("image", "workflow")


# -- validation ----------------------------------------------------------------------


def needs_image(workflow) -> bool:
    return any(spec.kind in IMAGE_KINDS for spec in workflow.stages.values())


def required_fields(workflow) -> list[str]:
    """The fields a submission for ``workflow`` must carry. The validator refuses a request
    without one of them and the OpenAPI document lists them per workflow: one rule for both."""
    return [f.name for f in FIELDS.values() if f.required] + (["image"] if needs_image(workflow) else [])


_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, whitespace and a ``data:`` URL prefix allowed."""
    if text[:5].lower() == "data:":
        m = _DATA_URL.match(text)
        if m is None:
            raise Invalid("image", "image is a data: URL but not a base64 one (expected data:<type>;base64,...)")
        text = text[m.end():]
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4) if len(text) % 4 != 1 else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Invalid("image", f"image is not valid base64: {exc}") from None


def check_image(data: bytes, max_bytes: int) -> None:
    """Refuse anything that is not a whole PNG/JPEG/WEBP of sane size. CPU-bound: run it in a thread."""
    if not data:
        raise Invalid("image", "image is empty")
    if len(data) > max_bytes:
        raise Invalid("image", f"image is {len(data)} bytes; the limit is {max_bytes}", reason="image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in IMAGE_FORMATS:
                raise Invalid("image", f"image is {fmt or 'of an unknown format'}; use PNG, JPEG or WEBP")
            w, h = im.size
            if w > IMAGE_MAX_SIDE or h > IMAGE_MAX_SIDE:
                raise Invalid("image", f"image is {w}x{h}; the largest accepted is {IMAGE_MAX_SIDE}x{IMAGE_MAX_SIDE}",
                              reason="image_too_large")
            if w < IMAGE_MIN_SIDE or h < IMAGE_MIN_SIDE:
                raise Invalid("image", f"image is {w}x{h}; the smallest accepted is {IMAGE_MIN_SIDE}x{IMAGE_MIN_SIDE}")
            im.verify()
        # verify() leaves the image unusable and misses truncated pixel data: decode it for real
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Invalid:
        raise
    except Image.DecompressionBombError:
        raise Invalid("image", "image has too many pixels", reason="image_too_large") from None
    except UnidentifiedImageError:
        raise Invalid("image", "image could not be decoded: not a PNG, JPEG or WEBP file") from None
    except Exception as exc:  # Pillow raises many kinds of error on hostile input
        raise Invalid("image", f"image could not be decoded ({type(exc).__name__}: {_show(str(exc), 80)})") from None


def validate_job(body: Mapping[str, Any], workflows: Mapping[str, Any], form: bool = False
                 ) -> tuple[str, dict, Any]:
    """Check a submission without touching the image bytes' contents.

    Returns ``(workflow name, params, image)`` where ``image`` is None, a base64
    ``str`` or raw ``bytes``, still to go through :func:`decode_base64` and
    :func:`check_image`. ``form`` allows numbers written as strings.
    """
    unknown = sorted(set(body) - set(FIELDS) - set(OTHER_FIELDS))
    if unknown:
        named = ", ".join(map(_show, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise Invalid(unknown[0][:100], f"unknown field{'s' if len(unknown) > 1 else ''}: {named};"
                      f" accepted: {', '.join([*FIELDS, *OTHER_FIELDS])}", reason="unknown_field")
    name = body.get("workflow")
    if name is None or name == "":
        name = DEFAULT_WORKFLOW
    if not isinstance(name, str):
        raise Invalid("workflow", f"workflow must be a string, not {_type_name(name)}")
    if name not in workflows:
        raise Invalid("workflow", f"unknown workflow {_show(name)}; served: {', '.join(sorted(workflows))}")
    params: dict[str, Any] = {}
    for field in FIELDS.values():
        raw = body.get(field.name)
        if raw is None:
            if field.required:
                raise Invalid(field.name, f"{field.name} is required")
            params[field.name] = field.make_default()
        else:
            params[field.name] = field.parse(raw, form)
    image = body.get("image")
    if image is None or (isinstance(image, (str, bytes, bytearray)) and not image):
        if "image" in required_fields(workflows[name]):
            raise Invalid("image", f"image is required by workflow {name!r}")
        image = None
    elif not isinstance(image, (str, bytes, bytearray)):
        raise Invalid("image", f"image must be a base64 string, not {_type_name(image)}")
    return name, params, image


def _image_bytes(image: str | bytes, max_bytes: int) -> bytes:
    data = decode_base64(image) if isinstance(image, str) else bytes(image)
    check_image(data, max_bytes)
    return data


# -- request bodies ----------------------------------------------------------------------


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Invalid("body", "body is not valid JSON", reason="malformed_body") from None
    if not isinstance(body, dict):
        raise Invalid("body", f"body must be a JSON object, not {_type_name(body)}", reason="malformed_body")
    return body


async def _form_body(request: web.Request) -> dict:
    try:
        form = await request.post()
    except web.HTTPException:
        raise
    except Exception as exc:  # aiohttp's multipart reader raises ValueError, AssertionError, ...
        raise Invalid("body", f"body is not valid multipart/form-data: {_show(str(exc), 80)}",
                      reason="malformed_body") from None
    body: dict[str, Any] = {}
    for name in form:
        values = form.getall(name)
        if len(values) > 1:
            raise Invalid(name, f"{_show(name)} is given {len(values)} times", reason="duplicate_field")
        value = values[0]
        if isinstance(value, web.FileField):
            with value.file:
                value = await asyncio.to_thread(value.file.read)
        if isinstance(value, (bytes, bytearray)) and (name in FIELDS or name == "workflow"):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise Invalid(name, f"{_show(name)} is not UTF-8 text") from None
        if name == "image" and isinstance(value, str) and not value:
            value = None
        body[name] = value
    return body


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


def _job_or_404(broker: Broker, job_id: str) -> dict:
    job = broker.job(job_id)
    if job is None:
        raise Invalid("id", f"no job with id {_show(job_id)}", status=404, reason="unknown_job")
    return job


async def submit(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    ctype = request.content_type
    if ctype == "application/json":
        body, form = await _json_body(request), False
    elif ctype == "multipart/form-data":
        body, form = await _form_body(request), True
    else:
        raise Invalid("Content-Type", f"Content-Type {ctype!r} is not accepted; send application/json"
                      " or multipart/form-data", status=415, reason="unsupported_media_type")
    workflow, params, image = validate_job(body, broker.workflows, form)
    payload = None
    if image is not None:
        payload = {"image": await asyncio.to_thread(_image_bytes, image, broker.settings.max_request_bytes)}
    try:
        job_id = broker.submit(workflow, params, payload)
    except CoreError as exc:
        raise Invalid("workflow", str(exc), reason="refused") from None
    links = _links(job_id)
    log.info("job %s accepted: %s, %dx%d, %d frames, %d steps", job_id, workflow, params["width"],
             params["height"], params["num_frames"], params["steps"])
    return web.json_response({"id": job_id, "state": "queued", "links": links}, status=201,
                             headers={"Location": links["self"]})


async def list_jobs(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "20")
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIST:
        raise Invalid("limit", f"limit must be an integer between 1 and {MAX_LIST}, got {_show(raw)}")
    jobs = request.app[BROKER].store.recent(limit)
    return web.json_response({"jobs": [{**j, "links": _links(j["id"])} for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    job = _job_or_404(request.app[BROKER], request.match_info["id"])
    return web.json_response(_job_view(job), dumps=lambda o: json.dumps(o, default=str))


async def cancel_job(request: web.Request) -> web.Response:
    broker, job_id = request.app[BROKER], request.match_info["id"]
    _job_or_404(broker, job_id)
    try:
        cancelled = broker.cancel(job_id)
    except UnknownJob:
        raise Invalid("id", f"no job with id {_show(job_id)}", status=404, reason="unknown_job") from None
    if not cancelled:
        state = (broker.job(job_id) or {}).get("state", "gone")
        raise Invalid("id", f"job is already {state}", status=409, reason="conflict")
    return web.json_response({"id": job_id, "state": "cancelled"}, status=202)


async def get_result(request: web.Request) -> web.StreamResponse:
    broker, job_id = request.app[BROKER], request.match_info["id"]
    job = _job_or_404(broker, job_id)
    if job["state"] != "succeeded":
        raise Invalid("id", f"job is {job['state']}", status=409, reason="conflict")
    path = broker.result_path(job_id)
    if path is None:
        raise Invalid("id", "the job succeeded but its result file is gone", status=410, reason="gone")
    return web.FileResponse(path, headers={"Content-Type": "video/mp4",
                                           "Content-Disposition": f'attachment; filename="{job_id}.mp4"'})


def _sse(event: dict) -> bytes:
    data = json.dumps(event, default=str, separators=(",", ":"))
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


async def job_events(request: web.Request) -> web.StreamResponse:
    broker, job_id = request.app[BROKER], request.match_info["id"]
    _job_or_404(broker, job_id)
    raw = request.headers.get("Last-Event-ID", "").strip()
    try:
        last = int(raw) if raw else -1
    except ValueError:
        raise Invalid("Last-Event-ID", f"Last-Event-ID must be an event id (an integer), got {_show(raw)}",
                      reason="invalid_last_event_id") from None
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
        raise Invalid("id", f"no registered worker {_show(worker_id)}", status=404, reason="unknown_worker") from None
    return web.json_response({"id": worker_id, "state": "draining"}, status=202)


async def lost_worker(request: web.Request) -> web.Response:
    """A launcher saw the worker's process exit: its work is re-run now, not when heartbeats lapse."""
    broker, worker_id = request.app[BROKER], request.match_info["id"]
    try:
        broker.lost(worker_id, "its launcher saw its process exit")
    except CoreError:
        raise Invalid("id", f"no registered worker {_show(worker_id)}", status=404, reason="unknown_worker") from None
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
    return web.json_response(openapi_document(broker.workflows, broker.settings.max_request_bytes))


def openapi_document(workflows: Mapping[str, Any], max_request_bytes: int) -> dict:
    """The OpenAPI document of this API serving ``workflows``, from the declarations the validator reads."""
    return openapi.document(
        {f.name: f.schema() for f in FIELDS.values()},
        {name: required_fields(wf) for name, wf in workflows.items()},
        DEFAULT_WORKFLOW if DEFAULT_WORKFLOW in workflows else None,
        max_request_bytes,
        {"max_side": IMAGE_MAX_SIDE, "min_side": IMAGE_MIN_SIDE, "formats": sorted(set(IMAGE_FORMATS.values()))})


# -- the application ---------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """Every refusal becomes JSON; a bug becomes a logged 500, and the service keeps serving."""
    try:
        return await handler(request)
    except Invalid as exc:
        if request.method == "POST" and request.path == "/v1/jobs" and exc.status != 404:
            request.app[BROKER].metrics.rejected.labels(exc.reason).inc()
        return _error(exc.status, exc.field, exc.message)
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
            return _error(404, "path", f"no route {request.method} {_show(request.path, 80)}")
        if exc.status == 405:
            resp = _error(405, "method", f"{request.method} is not allowed on {_show(request.path, 80)}")
            if "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        return _error(exc.status, None, exc.reason or exc.text or "bad request")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, None, "internal error")


async def _end_streams(app: web.Application) -> None:
    # Open event streams would hold the shutdown for their whole life: end them.
    for queue in list(app[STREAMS]):
        queue.put_nowait(None)


def make_app(broker: Broker, heartbeat_s: float = HEARTBEAT_S) -> web.Application:
    app = web.Application(client_max_size=broker.settings.max_request_bytes, middlewares=[_errors])
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
    Stop it with ``await runner.cleanup()`` before stopping the broker."""
    runner = web.AppRunner(make_app(broker, heartbeat_s), shutdown_timeout=5.0)
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
