"""A small REST client: submit a job, follow its events, save its result."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp


API_KEY_ENV = "ONEPIECE_API_KEY"


def api_key(given: str | None = None) -> str | None:
    """The API key to send: ``given`` (a --api-key flag), else ``ONEPIECE_API_KEY``, else none."""
    key = given if given else os.environ.get(API_KEY_ENV, "")
    return key.strip() or None


def auth_headers(key: str | None = None) -> dict[str, str]:
    """The Authorization header of ``api_key(key)`` (empty without a key)."""
    key = api_key(key)
    return {"Authorization": f"Bearer {key}"} if key else {}


def session(key: str | None = None, **kwargs) -> aiohttp.ClientSession:
    """A client session that sends the API key (``key``, else ``ONEPIECE_API_KEY``) on every request."""
    headers = {**kwargs.pop("headers", {}), **auth_headers(key)}
    return aiohttp.ClientSession(headers=headers, **kwargs)


class JobFailed(Exception):
    """The job ended failed or cancelled; the message is the broker's reason."""


async def error_text(resp: aiohttp.ClientResponse) -> str:
    try:
        body = await resp.json()
        return body.get("error", str(body))
    except (aiohttp.ContentTypeError, json.JSONDecodeError):
        return (await resp.text())[:200]


async def submit(session: aiohttp.ClientSession, url: str, image: bytes | None, workflow: str | None = None,
                 **params) -> str:
    """Submit a job of ``workflow`` (None: the broker's default) and return its id.

    ``image`` is the input image (None for a workflow that takes none, e.g.
    text-to-video); ``params`` are the workflow's parameters as its
    declaration names them, None meaning left out (the broker fills in the
    defaults). A ``bytes`` value is another image parameter, sent as base64.
    """
    body = {k: base64.b64encode(v).decode() if isinstance(v, (bytes, bytearray)) else v
            for k, v in params.items() if v is not None}
    if workflow is not None:
        body["workflow"] = workflow
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    async with session.post(f"{url}/v1/jobs", json=body) as resp:
        if resp.status != 201:
            raise JobFailed(f"submission refused ({resp.status}): {await error_text(resp)}")
        return (await resp.json())["id"]


async def events(session: aiohttp.ClientSession, url: str, job_id: str) -> AsyncIterator[dict]:
    """Server-sent events of a job until it ends."""
    async with session.get(f"{url}/v1/jobs/{job_id}/events", timeout=aiohttp.ClientTimeout(total=None)) as resp:
        if resp.status != 200:
            raise JobFailed(f"events unavailable ({resp.status}): {await error_text(resp)}")
        event: dict = {}
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if "data" in event:
                    # The data line is the stored event: {seq, ts, type, data}.
                    body = json.loads(event["data"])
                    yield {"type": event.get("event", body.get("type", "message")), "data": body.get("data", {}),
                           "seq": body.get("seq"), "ts": body.get("ts")}
                event = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                event[key] = value.lstrip(" ")


async def wait(session, url: str, job_id: str, on_event: Callable[[dict], None] = lambda e: None) -> dict:
    async for e in events(session, url, job_id):
        on_event(e)
        if e["type"] in ("succeeded", "failed", "cancelled"):
            if e["type"] != "succeeded":
                raise JobFailed(f"job {job_id} {e['type']}: {e['data'].get('reason', 'no reason given')}")
            return e["data"]
    raise JobFailed(f"event stream of job {job_id} ended before the job did")


async def download(session, url: str, job_id: str, out: Path) -> int:
    async with session.get(f"{url}/v1/jobs/{job_id}/result") as resp:
        if resp.status != 200:
            raise JobFailed(f"result unavailable ({resp.status}): {await error_text(resp)}")
        data = await resp.read()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return len(data)


class ProgressBar:
    """One status line on stderr fed by job events (stages, then denoising steps)."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self.stage = "queued"

    def __call__(self, e: dict) -> None:
        t, d = e["type"], e["data"]
        if t == "stage_started":
            self.stage = d.get("stage", "?")
            self._line(f"{self.stage}: running")
        elif t == "progress":
            step, total = d.get("step", 0), max(1, d.get("total", 1))
            filled = int(self.width * step / total)
            self._line(f"{d.get('stage', self.stage)} [{'#' * filled}{'.' * (self.width - filled)}] {step}/{total}")
        elif t == "stage_finished":
            run_s = (d.get("timings") or {}).get("run_s")
            self._line(f"{d.get('stage')}: done" + (f" in {run_s:.2f} s" if run_s is not None else ""), end=True)
        elif t == "stage_retry":
            self._line(f"{d.get('stage')}: retrying ({d.get('reason')})", end=True)
        elif t in ("succeeded", "failed", "cancelled"):
            self._line(t, end=True)

    def _line(self, text: str, end: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if end else ""))
        elif end or "[" not in text:
            self.stream.write(text + "\n")
        self.stream.flush()
