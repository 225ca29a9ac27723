"""The REST API against a real Broker and a real aiohttp server (no stage workers:
jobs stay queued until cancelled)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from broker.api import STREAMS, Invalid, check_image, decode_base64, make_app, start_api, validate_job
from broker.service import Broker
from onepiece.config import Settings
from stages.workflow import Image as ImageParam
from stages.workflow import load_workflow

LIMIT = 1 << 20  # a small body limit keeps the over-limit cases quick
SHIPPED = ["wan_i2v", "wan_t2v", "wan22_i2v", "wan22_t2v", "synthetic3"]


def image_bytes(w: int = 64, h: int = 48, fmt: str = "PNG", noise: bool = False) -> bytes:
    if noise:  # incompressible, so cutting the file short cuts into pixel data
        im = Image.frombytes("RGB", (w, h), random.Random(0).randbytes(w * h * 3))
    else:
        im = Image.new("RGB", (w, h), (200, 80, 30))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


PNG = image_bytes()
PNG_B64 = base64.b64encode(PNG).decode()


def valid(**changes) -> dict:
    body = {"prompt": "a cat surfing a wave", "image": PNG_B64, "height": 480, "width": 832, "num_frames": 81,
            "steps": 40, "guidance_scale": 5.0, "seed": 7}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def form(**fields) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in fields.items():
        if isinstance(value, bytes):
            data.add_field(name, io.BytesIO(value), filename=f"{name}.bin", content_type="application/octet-stream")
        else:
            data.add_field(name, str(value))
    return data


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(control="tcp://127.0.0.1:*", data_dir=tmp_path, workflows=SHIPPED, max_request_bytes=LIMIT)


@pytest.fixture
async def broker(settings):
    b = Broker(settings)
    await b.start()
    yield b
    await b.stop()


@pytest.fixture
async def client(broker):
    async with TestClient(TestServer(make_app(broker, heartbeat_s=0.05))) as c:
        yield c


async def submit(client, body=None, **kw) -> str:
    resp = await client.post("/v1/jobs", json=valid() if body is None else body, **kw)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


async def read_events(resp) -> list[tuple[str, dict]]:
    """The (type, data) of every event in a whole event-stream body."""
    text = await resp.text()
    out = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if lines:
            assert lines["id"] == str(json.loads(lines["data"])["seq"])
            out.append((lines["event"], json.loads(lines["data"])))
    return out


# -- bad input: each case is a request and the 4xx it must get -----------------------------

BAD = [
    # id, request kwargs, status, field, words in the message
    ("malformed_json", dict(data=b'{"prompt": "x",', headers={"Content-Type": "application/json"}),
     400, "body", "not valid JSON"),
    ("json_not_object", dict(json=["prompt"]), 400, "body", "JSON object"),
    ("wrong_content_type", dict(data=b"prompt=x", headers={"Content-Type": "text/plain"}),
     415, "Content-Type", "text/plain"),
    ("no_content_type", dict(data=b"{}", headers={"Content-Type": ""}), 415, "Content-Type", "not accepted"),
    ("missing_prompt", dict(json=valid(prompt=...)), 400, "prompt", "prompt is required"),
    ("blank_prompt", dict(json=valid(prompt="   ")), 400, "prompt", "prompt must not be empty"),
    ("prompt_too_long", dict(json=valid(prompt="x" * 2001)), 400, "prompt", "2000"),
    ("prompt_not_string", dict(json=valid(prompt=12)), 400, "prompt", "must be a string"),
    ("negative_too_long", dict(json=valid(negative_prompt="x" * 2001)), 400, "negative_prompt", "2000"),
    ("missing_image", dict(json=valid(image=...)), 400, "image", "image is required"),
    ("image_not_string", dict(json=valid(image=[1, 2])), 400, "image", "base64 string"),
    ("bad_base64", dict(json=valid(image="!!!not base64!!!")), 400, "image", "not valid base64"),
    ("base64_not_image", dict(json=valid(image=base64.b64encode(b"hello, not an image" * 4).decode())),
     400, "image", "could not be decoded"),
    ("truncated_png", dict(json=valid(image=base64.b64encode(image_bytes(64, 64, noise=True)[:6000]).decode())),
     400, "image", "could not be decoded"),
    ("gif_image", dict(json=valid(image=base64.b64encode(image_bytes(32, 32, "GIF")).decode())),
     400, "image", "use PNG, JPEG or WEBP"),
    ("image_too_many_pixels", dict(json=valid(image=base64.b64encode(image_bytes(4097, 16)).decode())),
     400, "image", "4097x16"),
    ("image_too_small", dict(json=valid(image=base64.b64encode(image_bytes(8, 8)).decode())),
     400, "image", "8x8"),
    ("body_over_limit", dict(data=lambda: io.BytesIO(json.dumps(valid(image="A" * (LIMIT + 4))).encode()),
                             headers={"Content-Type": "application/json"}), 413, "body", "limit"),
    ("height_not_multiple_of_16", dict(json=valid(height=500)), 400, "height", "multiple of 16"),
    ("height_too_small", dict(json=valid(height=48)), 400, "height", "between 64 and 1280"),
    ("width_too_large", dict(json=valid(width=1296)), 400, "width", "between 64 and 1280"),
    ("num_frames_not_4k_plus_1", dict(json=valid(num_frames=80)), 400, "num_frames", "4k+1"),
    ("num_frames_too_many", dict(json=valid(num_frames=165)), 400, "num_frames", "between 1 and 161"),
    ("steps_zero", dict(json=valid(steps=0)), 400, "steps", "between 1 and 100"),
    ("steps_1000", dict(json=valid(steps=1000)), 400, "steps", "between 1 and 100"),
    ("steps_float", dict(json=valid(steps=4.5)), 400, "steps", "must be an integer"),
    ("guidance_string", dict(json=valid(guidance_scale="5")), 400, "guidance_scale", "must be a number"),
    ("guidance_too_big", dict(json=valid(guidance_scale=20.5)), 400, "guidance_scale", "between 0 and 20"),
    ("seed_negative", dict(json=valid(seed=-1)), 400, "seed", "between 0 and"),
    ("seed_too_big", dict(json=valid(seed=2**63)), 400, "seed", "between 0 and"),
    ("bool_for_int", dict(json=valid(steps=True)), 400, "steps", "not a boolean"),
    ("bool_for_number", dict(json=valid(guidance_scale=False)), 400, "guidance_scale", "not a boolean"),
    ("unknown_field", dict(json=valid(strength=0.5)), 400, "strength",
     "unknown field 'strength' for workflow 'wan_i2v'; accepted: prompt, negative_prompt, height"),
    ("unknown_workflow", dict(json=valid(workflow="t2v_huge")), 400, "workflow", "unknown workflow 't2v_huge'"),
    # each workflow checks its own declaration
    ("t2v_with_image", dict(json=valid(workflow="wan_t2v")), 400, "image", "workflow 'wan_t2v' takes no image"),
    ("t2v_unknown_field", dict(json={"workflow": "wan_t2v", "prompt": "p", "foo": 1}), 400, "foo",
     "unknown field 'foo' for workflow 'wan_t2v'; accepted: prompt,"),
    ("t2v_steps_too_many", dict(json={"workflow": "wan_t2v", "prompt": "p", "steps": 101}), 400, "steps",
     "steps must be between 1 and 100, got 101 (workflow 'wan_t2v')"),
    ("wan22_no_image", dict(json=valid(workflow="wan22_i2v", image=...)), 400, "image",
     "image is required by workflow 'wan22_i2v'"),
    ("i2v_no_image_named", dict(json=valid(image=None)), 400, "image", "image is required by workflow 'wan_i2v'"),
    ("wan22_guidance_2_wrong_type", dict(json={"workflow": "wan22_t2v", "prompt": "p", "guidance_scale_2": "4"}),
     400, "guidance_scale_2", "guidance_scale_2 must be a number, not a string (workflow 'wan22_t2v')"),
    ("i2v_guidance_2_unknown", dict(json=valid(guidance_scale_2=4.0)), 400, "guidance_scale_2",
     "unknown field 'guidance_scale_2' for workflow 'wan_i2v'"),
    ("synthetic_steps_too_many", dict(json={"workflow": "synthetic3", "steps": 1001}), 400, "steps",
     "steps must be between 1 and 1000, got 1001 (workflow 'synthetic3')"),
    ("synthetic_work_negative", dict(json={"workflow": "synthetic3", "work": {"b": -1}}), 400, "work",
     "work['b'] must be between 0 and 1000, got -1"),
    ("synthetic_work_not_map", dict(json={"workflow": "synthetic3", "work": 2}), 400, "work",
     "work must be an object of numbers, not an integer"),
    ("synthetic_with_image", dict(json={"workflow": "synthetic3", "image": PNG_B64}), 400, "image",
     "workflow 'synthetic3' takes no image"),
    ("form_synthetic_work_not_json", dict(data=lambda: form(workflow="synthetic3", work=b"{b: 2}")), 400, "work",
     "work must be a JSON object"),
    ("workflow_not_string", dict(json=valid(workflow=3)), 400, "workflow", "must be a string"),
    ("form_steps_not_int", dict(data=lambda: form(prompt="p", image=PNG, steps="ten")),
     400, "steps", "must be an integer"),
    ("form_image_not_image", dict(data=lambda: form(prompt="p", image=b"\x00" * 100)),
     400, "image", "could not be decoded"),
    ("form_missing_prompt", dict(data=lambda: form(image=PNG)), 400, "prompt", "prompt is required"),
    ("form_duplicate_field", dict(data=lambda: _duplicate_form()), 400, "prompt", "2 times"),
    ("form_unknown_field", dict(data=lambda: form(prompt="p", image=PNG, mask=PNG)), 400, "mask", "unknown field"),
    ("form_over_limit", dict(data=lambda: form(prompt="p", image=b"\0" * (LIMIT + 1))), 413, "body", "limit"),
    ("form_malformed", dict(data=b"--nope\r\n\r\n", headers={"Content-Type": "multipart/form-data"}),
     400, "body", "multipart"),
]


def _duplicate_form() -> aiohttp.FormData:
    data = form(prompt="p", image=PNG)
    data.add_field("prompt", "q")
    return data


async def send_bad(client, kwargs) -> aiohttp.ClientResponse:
    if callable(kwargs.get("data")):  # a FormData can be sent only once: build a fresh one
        kwargs = {**kwargs, "data": kwargs["data"]()}
    return await client.post("/v1/jobs", **kwargs)


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
async def test_bad_submission_gets_its_4xx(client, broker, case):
    _, kwargs, status, field, words = case
    resp = await send_bad(client, kwargs)
    body = await resp.json()
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    assert body["field"] == field, body
    assert words in body["error"], body
    if field not in ("body", "Content-Type"):
        assert field in body["error"]
    assert broker.store.counts() == {}


async def test_service_survives_every_bad_request_then_accepts_json_and_multipart(client, broker):
    for _, kwargs, status, _, _ in BAD:
        resp = await send_bad(client, kwargs)
        assert resp.status == status
    job = await submit(client)
    resp = await client.post("/v1/jobs", data=form(prompt="a dog", image=PNG, height="256", width="256",
                                                   num_frames="17", steps="4", guidance_scale="3.5", seed="11"))
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert resp.headers["Location"] == created["links"]["self"] == f"/v1/jobs/{created['id']}"
    assert created["state"] == "queued"
    for job_id in (job, created["id"]):
        resp = await client.get(f"/v1/jobs/{job_id}")
        assert resp.status == 200
        assert (await resp.json())["state"] == "queued"
    view = await (await client.get(f"/v1/jobs/{created['id']}")).json()
    assert view["params"] == {"prompt": "a dog", "negative_prompt": "", "height": 256, "width": 256,
                              "num_frames": 17, "steps": 4, "guidance_scale": 3.5, "seed": 11, "fps": 16}
    assert broker.store.counts() == {"queued": 2}
    text = (await (await client.get("/metrics")).read()).decode()
    assert 'onepiece_rejected_requests_total{reason="invalid_image"}' in text
    too_large = sum(1 for case in BAD if case[2] == 413)
    assert f'onepiece_rejected_requests_total{{reason="too_large"}} {too_large:.1f}' in text


# -- accepted submissions --------------------------------------------------------------------


async def test_defaults_and_what_reaches_the_broker(client, broker, monkeypatch):
    seen = []
    real = broker.submit
    monkeypatch.setattr(broker, "submit", lambda wf, params, payload=None: seen.append((wf, params, payload))
                        or real(wf, params, payload))
    jpeg = image_bytes(40, 40, "JPEG")
    await submit(client, {"prompt": "p", "image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()})
    (wf, params, payload), = seen
    assert wf == "wan_i2v"
    assert payload == {"image": jpeg}  # the bytes as uploaded, not re-encoded
    seed = params.pop("seed")
    assert isinstance(seed, int) and 0 <= seed < 2**63
    assert params == {"prompt": "p", "negative_prompt": "", "height": 480, "width": 832, "num_frames": 81,
                      "steps": 40, "guidance_scale": 5.0, "fps": 16}


def minimal(name: str) -> dict:
    """A body with only what ``name``'s declaration requires, built from the declaration."""
    wf = load_workflow(name)
    made = {"string": "a prompt", "image": PNG_B64, "integer": 1, "number": 1.0, "boolean": True, "map": {}}
    return {"workflow": name, **{n: made[p.TYPE] for n, p in wf.params.items() if p.required}}


@pytest.mark.parametrize("name", SHIPPED)
async def test_each_shipped_workflow_is_validated_from_its_declaration(client, broker, monkeypatch, name):
    """A minimal body is accepted and the broker receives every declared value, defaults filled in;
    leaving out any required field is refused, naming the field and the workflow."""
    wf = load_workflow(name)
    seen = []
    real = broker.submit
    monkeypatch.setattr(broker, "submit", lambda w, params, payload=None: seen.append((w, params, payload))
                        or real(w, params, payload))
    body = minimal(name)
    await submit(client, body)
    (got, params, payload), = seen
    assert got == name
    images = [n for n, p in wf.params.items() if isinstance(p, ImageParam)]
    assert (payload or {}).keys() == set(images)
    defaulted = {n for n, p in wf.params.items() if p.required or p.has_default} - set(images)
    assert set(params) == defaulted
    for n in defaulted - set(body):
        assert params[n] == wf.params[n].default or wf.params[n].default == "random", n
    assert wf.resolve_params(params) == params  # what the broker resolves again is unchanged
    for field in set(body) - {"workflow"}:
        resp = await client.post("/v1/jobs", json={k: v for k, v in body.items() if k != field})
        error = await resp.json()
        assert resp.status == 400 and error["field"] == field, error
        assert f"{field} is required by workflow {name!r}" in error["error"]
    assert len(seen) == 1


async def test_wan22_second_guidance_is_absent_unless_given(client, broker):
    job = await submit(client, {"workflow": "wan22_t2v", "prompt": "p"})
    params = (await (await client.get(f"/v1/jobs/{job}")).json())["params"]
    assert "guidance_scale_2" not in params and params["guidance_scale"] == 4.0 and params["steps"] == 40
    job = await submit(client, {"workflow": "wan22_t2v", "prompt": "p", "guidance_scale_2": 3})
    assert (await (await client.get(f"/v1/jobs/{job}")).json())["params"]["guidance_scale_2"] == 3.0
    job = await submit(client, {"workflow": "wan_t2v", "prompt": "p"})
    assert (await (await client.get(f"/v1/jobs/{job}")).json())["params"]["steps"] == 50  # wan_t2v's own default


async def test_synthetic3_is_submittable_over_rest(client, broker):
    job = await submit(client, {"workflow": "synthetic3", "steps": 3, "work": {"b": 0.5}})
    view = await (await client.get(f"/v1/jobs/{job}")).json()
    assert view["workflow"] == "synthetic3"
    assert view["params"] == {"steps": 3, "work": {"b": 0.5}}
    assert set(view["stages"]) == {"a", "b", "c"}
    assert view["stages"]["a"]["state"] == "queued"
    job = await submit(client, {"workflow": "synthetic3"})
    assert (await (await client.get(f"/v1/jobs/{job}")).json())["params"] == {"steps": 1}
    data = aiohttp.FormData()
    data.add_field("workflow", "synthetic3")
    data.add_field("steps", "7")
    data.add_field("work", '{"a": 2, "c": 0}', content_type="application/json")  # a JSON part, as OpenAPI encodes it
    resp = await client.post("/v1/jobs", data=data)
    assert resp.status == 201, await resp.text()
    view = await (await client.get(f"/v1/jobs/{(await resp.json())['id']}")).json()
    assert view["params"] == {"steps": 7, "work": {"a": 2.0, "c": 0.0}}


async def test_webp_and_multipart_raw_image_part(client):
    await submit(client, valid(image=base64.b64encode(image_bytes(16, 16, "WEBP")).decode()))
    data = aiohttp.FormData()
    data.add_field("prompt", "p")
    data.add_field("image", image_bytes(64, 64, "JPEG"), filename="frame.jpg", content_type="image/jpeg")
    resp = await client.post("/v1/jobs", data=data)
    assert resp.status == 201


# -- reading, cancelling, results ----------------------------------------------------------------


async def test_cancel_then_cancel_again(client):
    job = await submit(client)
    resp = await client.get(f"/v1/jobs/{job}/result")
    assert resp.status == 409
    assert await resp.json() == {"error": "job is queued", "field": "id"}
    resp = await client.delete(f"/v1/jobs/{job}")
    assert resp.status == 202
    assert await resp.json() == {"id": job, "state": "cancelled"}
    resp = await client.delete(f"/v1/jobs/{job}")
    assert resp.status == 409
    assert "cancelled" in (await resp.json())["error"]
    view = await (await client.get(f"/v1/jobs/{job}")).json()
    assert view["state"] == "cancelled"
    assert view["reason"] == "cancelled by client"
    assert view["finished"] >= view["created"]
    assert all(s["state"] == "cancelled" for s in view["stages"].values())
    resp = await client.get(f"/v1/jobs/{job}/result")
    assert resp.status == 409
    assert (await resp.json())["error"] == "job is cancelled"


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/jobs/{}"), ("DELETE", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/events"), ("GET", "/v1/jobs/{}/result"),
])
async def test_unknown_job_is_404_everywhere(client, broker, method, path):
    resp = await client.request(method, path.format("0123456789abcdef"))
    assert resp.status == 404
    body = await resp.json()
    assert body["field"] == "id" and "0123456789abcdef" in body["error"]
    assert not broker._subscribers  # no subscription left behind for a job that does not exist


async def test_unknown_route_and_method_are_json(client):
    resp = await client.get("/v2/nothing")
    assert resp.status == 404 and (await resp.json())["field"] == "path"
    resp = await client.put("/v1/jobs")
    assert resp.status == 405 and (await resp.json())["field"] == "method"
    assert "POST" in resp.headers["Allow"]


async def test_list_recent_jobs(client):
    ids = [await submit(client) for _ in range(3)]
    body = await (await client.get("/v1/jobs?limit=2")).json()
    assert [j["id"] for j in body["jobs"]] == ids[::-1][:2]
    assert body["jobs"][0]["links"]["self"] == f"/v1/jobs/{ids[2]}"
    resp = await client.get("/v1/jobs?limit=zero")
    assert resp.status == 400 and (await resp.json())["field"] == "limit"


# -- events ------------------------------------------------------------------------------------------


async def test_events_of_a_cancelled_job_replay_and_end(client):
    job = await submit(client)
    assert (await client.delete(f"/v1/jobs/{job}")).status == 202
    resp = await client.get(f"/v1/jobs/{job}/events")
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = await asyncio.wait_for(read_events(resp), 5)
    assert [t for t, _ in events] == ["queued", "cancelled"]
    assert events[1][1]["data"]["reason"] == "cancelled by client"
    resp = await client.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": str(events[0][1]["seq"])})
    assert [t for t, _ in await asyncio.wait_for(read_events(resp), 5)] == ["cancelled"]
    resp = await client.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": "soon"})
    assert resp.status == 400 and (await resp.json())["field"] == "Last-Event-ID"


async def test_live_events_heartbeat_and_end_when_the_job_ends(client, broker):
    job = await submit(client)
    resp = await client.get(f"/v1/jobs/{job}/events")
    seen = b""
    while b": keep-alive\n\n" not in seen:  # the job is idle: heartbeats every 0.05 s
        seen += await asyncio.wait_for(resp.content.readany(), 5)
    assert b"event: queued\n" in seen
    assert (await client.delete(f"/v1/jobs/{job}")).status == 202
    rest = await asyncio.wait_for(resp.content.read(), 5)  # returns at the end of the stream
    assert b"event: cancelled\n" in rest
    assert not broker._subscribers and not client.server.app[STREAMS]


async def test_disconnect_unsubscribes(client, broker):
    job = await submit(client)
    resp = await client.get(f"/v1/jobs/{job}/events")
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert job in broker._subscribers
    resp.close()
    for _ in range(200):  # the next heartbeat write finds the connection gone
        if job not in broker._subscribers and not client.server.app[STREAMS]:
            break
        await asyncio.sleep(0.01)
    assert job not in broker._subscribers
    assert not client.server.app[STREAMS]


# -- service endpoints ----------------------------------------------------------------------------


async def test_health_ready_metrics(client, broker):
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "not ready"
    assert body["missing"] == sorted({s for name in SHIPPED for s in load_workflow(name).stages})
    await submit(client)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    assert 'onepiece_jobs{state="queued"} 1.0' in text
    assert 'onepiece_stage_queue_length{stage="text_encode"} 1.0' in text


async def test_ready_when_every_stage_has_a_worker(client, broker):
    now = time.time()
    for stage in broker.missing_stages():
        assert broker.core.register(f"w-{stage}", stage, 2, {"transport": "shm"}, now) == []
    resp = await client.get("/readyz")
    assert resp.status == 200 and await resp.json() == {"status": "ready", "missing": [], "reasons": []}
    body = await (await client.get("/v1/stages")).json()
    (worker,) = body["stages"]["denoise"]["workers"]
    assert (worker["id"], worker["load"], worker["capacity"], worker["draining"]) == ("w-denoise", 0, 2, False)
    assert body["missing"] == []


async def test_not_ready_while_a_job_is_past_its_deadline_and_stuck_tasks_show(tmp_path):
    # no tick in this test (heartbeat 1000 s), so what readiness says is not raced by the core failing the job
    settings = Settings(control="tcp://127.0.0.1:*", data_dir=tmp_path, workflows=["synthetic3"],
                        heartbeat_s=1000.0, job_deadline_s=0.01, progress_floor_s=0.01, progress_cap_s=0.01)
    broker = Broker(settings)
    await broker.start()
    try:
        async with TestClient(TestServer(make_app(broker))) as client:
            for stage in ("a", "b", "c"):
                broker.core.register(f"w-{stage}", stage, 1, {}, time.time())
            assert (await client.get("/readyz")).status == 200
            job = broker.submit("synthetic3", {"prompt": "p"})
            await asyncio.sleep(0.05)  # past the 10 ms deadline and progress bound
            resp = await client.get("/readyz")
            body = await resp.json()
            assert resp.status == 503 and body["missing"] == []
            assert any(f"job {job} is past its deadline: stage a was assigned to worker w-a" in r
                       for r in body["reasons"]), body
            stuck = (await (await client.get("/v1/stages")).json())["stages"]["a"]["stuck"]
            assert [(t["job"], t["state"], t["worker"]) for t in stuck] == [(job, "assigned", "w-a")]
    finally:
        await broker.stop()


async def test_not_ready_while_queued_work_has_no_worker(client, broker):
    now = time.time()
    for stage in broker.missing_stages():
        broker.core.register(f"w-{stage}", stage, 1, {}, now)
    broker.drain("w-a")  # still registered, but it takes nothing new
    job = broker.submit("synthetic3", {"prompt": "p"})
    body = await (await client.get("/readyz")).json()
    assert body["missing"] == ["a"]
    assert any("task(s) of a queued" in r and "no worker can take them" in r for r in body["reasons"]), body
    stuck = (await (await client.get("/v1/stages")).json())["stages"]["a"]["stuck"]
    assert stuck[0]["job"] == job and stuck[0]["reason"] == "no live worker serves it"


async def test_a_worker_reported_lost_has_its_work_redone_at_once(client, broker):
    now = time.time()
    for stage in ("a", "b", "c"):
        broker.core.register(f"w-{stage}", stage, 1, {}, now)
    job = broker.submit("synthetic3", {"prompt": "p"})
    assert broker.core.job(job)["stages"]["a"]["worker"] == "w-a"
    resp = await client.post("/v1/workers/w-a/lost")
    assert resp.status == 202 and await resp.json() == {"id": "w-a", "state": "lost"}
    stage_a = broker.core.job(job)["stages"]["a"]
    assert stage_a["state"] == "queued" and "w-a lost (its launcher saw its process exit)" in stage_a["error"]
    resp = await client.post("/v1/workers/w-a/lost")
    assert resp.status == 404 and "no registered worker" in (await resp.json())["error"]


async def test_stages(client):
    body = await (await client.get("/v1/stages")).json()
    assert {"text_encode", "denoise", "video_encode", "a", "b", "c"} <= set(body["stages"])
    assert body["stages"]["denoise"] == {"workers": [], "queued": 0, "busy": 0, "running": 0,
                                         "progress_bound_s": 900.0, "stuck": []}
    assert "denoise" in body["missing"]
    assert body["workflows"]["wan_i2v"]["stages"]["image_encode"] == "image_encode"


async def test_openapi_document(client):
    doc = await (await client.get("/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/events", "/v1/jobs/{id}/result", "/v1/stages",
            "/v1/workflows", "/v1/workflows/{name}", "/healthz", "/readyz", "/metrics",
            "/v1/openapi.json"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert [r["$ref"].rsplit("_", 1)[-1] for r in schemas["JobRequest"]["oneOf"]][-2:] == ["i2v", "t2v"]
    for name in SHIPPED:
        request = schemas[f"JobRequest_{name}"]
        assert set(request["properties"]) == set(load_workflow(name).params) | {"workflow"}
        assert request["additionalProperties"] is False
    assert schemas["JobRequest_wan_i2v"]["required"] == ["prompt", "image"]
    assert schemas["JobRequest_wan_t2v"]["required"] == ["prompt", "workflow"]
    assert schemas["JobRequest_wan_t2v"]["properties"]["height"] == {
        **schemas["JobRequest_wan_t2v"]["properties"]["height"], "minimum": 64, "maximum": 1280, "multipleOf": 16}
    assert schemas["JobRequest_wan_t2v"]["properties"]["steps"]["default"] == 50
    # every $ref resolves
    refs = [m for m in json.dumps(doc).split('"$ref": "#/components/schemas/')[1:]]
    assert all(r.split('"')[0] in schemas for r in refs)


# -- workflows -------------------------------------------------------------------------------------


async def test_workflows_list_and_detail(client):
    body = await (await client.get("/v1/workflows")).json()
    assert body["default"] == "wan_i2v"
    assert [w["name"] for w in body["workflows"]] == sorted(SHIPPED)
    listed = {w["name"]: w for w in body["workflows"]}
    assert listed["wan_i2v"]["default"] is True and listed["wan_t2v"]["default"] is False
    assert listed["wan_t2v"]["stages"] == ["text_encode", "denoise_t2v", "vae_decode", "video_encode"]
    assert listed["wan_t2v"]["params"]["prompt"] == {"type": "string", "required": True}
    assert listed["wan_t2v"]["params"]["steps"] == {"type": "integer", "required": False, "default": 50}
    assert listed["synthetic3"]["params"]["work"] == {"type": "map", "required": False}
    assert listed["wan_i2v"]["links"]["self"] == "/v1/workflows/wan_i2v"

    wf = await (await client.get("/v1/workflows/wan22_i2v")).json()
    assert wf["result"] == "video_encode" and wf["images"] == ["image"]
    assert wf["stages"]["denoise_low"] == {"kind": "denoise", "model": "wan2.2-i2v-a14b-low", "gpu": True,
                                           "after": ["denoise_high", "text_encode", "vae_encode"],
                                           "outputs": ["latents"], "progress": True}
    assert wf["stages"]["video_encode"]["model"] == ""
    assert wf["models"] == ["umt5-xxl", "wan2.1-vae", "wan2.2-i2v-a14b-high", "wan2.2-i2v-a14b-low"]
    num_frames = wf["params"]["num_frames"]
    assert {k: num_frames[k] for k in ("type", "default", "minimum", "maximum", "congruent")} == {
        "type": "integer", "default": 81, "minimum": 1, "maximum": 161, "congruent": [4, 1]}
    assert num_frames["schema"]["enum"][:3] == [1, 5, 9]
    assert wf["params"]["seed"]["default"] == "random" and "default" not in wf["params"]["seed"]["schema"]
    assert "default" not in wf["params"]["guidance_scale_2"]

    resp = await client.get("/v1/workflows/t2v_huge")
    assert resp.status == 404
    error = await resp.json()
    assert error["field"] == "name" and "'t2v_huge'" in error["error"] and "wan_t2v" in error["error"]


# -- persistence ------------------------------------------------------------------------------------


async def test_jobs_survive_a_broker_restart(settings):
    first = Broker(settings)
    await first.start()
    async with TestClient(TestServer(make_app(first))) as client:
        waiting = await submit(client)
        cancelled = await submit(client)
        assert (await client.delete(f"/v1/jobs/{cancelled}")).status == 202
    await first.stop()

    second = Broker(settings)
    await second.start()
    try:
        async with TestClient(TestServer(make_app(second))) as client:
            view = await (await client.get(f"/v1/jobs/{waiting}")).json()
            assert view["state"] == "queued"  # re-queued at start-up
            assert view["params"]["seed"] == 7
            view = await (await client.get(f"/v1/jobs/{cancelled}")).json()
            assert view["state"] == "cancelled"
            assert view["reason"] == "cancelled by client"
            assert (await client.delete(f"/v1/jobs/{cancelled}")).status == 409
            events = await asyncio.wait_for(read_events(await client.get(f"/v1/jobs/{cancelled}/events")), 5)
            assert [t for t, _ in events] == ["queued", "cancelled"]
    finally:
        await second.stop()


async def test_start_api_on_port_zero(broker):
    runner, port = await start_api(broker, "127.0.0.1", 0)
    try:
        assert port > 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            async with session.post(f"http://127.0.0.1:{port}/v1/jobs", json=valid()) as resp:
                assert resp.status == 201
                job = (await resp.json())["id"]
            async with session.get(f"http://127.0.0.1:{port}/v1/jobs/{job}/events") as resp:
                await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                # shutting down ends open event streams instead of waiting on them
                await asyncio.wait_for(runner.cleanup(), 3)
                assert job not in broker._subscribers
    finally:
        await runner.cleanup()


# -- the command line and the client ----------------------------------------------------------


async def test_submit_command_takes_its_options_from_the_servers_declaration(broker):
    from onepiece import cli, client

    runner, port = await start_api(broker, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        declared = await asyncio.to_thread(cli.fetch_declaration, url, "wan22_t2v")
        assert declared.workflow == "wan22_t2v" and declared.source == f"the broker at {url}"
        assert declared.params == dict(load_workflow("wan22_t2v").params)
        default = await asyncio.to_thread(cli.fetch_declaration, url, None)
        assert default.workflow == "wan_i2v"
        with pytest.raises(SystemExit, match="no workflow 'nope' is served"):
            await asyncio.to_thread(cli.fetch_declaration, url, "nope")
        offline = await asyncio.to_thread(cli.fetch_declaration, "http://127.0.0.1:9", "wan_t2v", 1.0)
        assert offline.params == dict(load_workflow("wan_t2v").params) and "did not answer" in offline.source

        parser = cli.build_parser(declared)
        args = parser.parse_args(["submit", "--workflow", "wan22_t2v", "--prompt", "a boat", "--frames", "17",
                                  "--guidance-scale-2", "2.5", "--url", url])
        sent = {n: getattr(args, cli._dest(n)) for n in args.value_params if getattr(args, cli._dest(n)) is not None}
        assert sent == {"prompt": "a boat", "num_frames": 17, "guidance_scale_2": 2.5}  # only what was given
        assert args.image_params == [] and args.submit_workflow == "wan22_t2v"
        with pytest.raises(SystemExit):
            parser.parse_args(["submit", "--prompt", "p", "--steps", "101"])  # the declared bounds, client-side
        async with aiohttp.ClientSession() as session:
            job = await client.submit(session, url, None, workflow=args.submit_workflow, **sent)
            params = (await (await session.get(f"{url}/v1/jobs/{job}")).json())["params"]
            assert params["num_frames"] == 17 and params["steps"] == 40 and params["guidance_scale_2"] == 2.5
            job = await client.submit(session, url, PNG, prompt="p", steps=None)  # the default workflow
            assert (await (await session.get(f"{url}/v1/jobs/{job}")).json())["workflow"] == "wan_i2v"
            job = await client.submit(session, url, None, workflow="synthetic3", work={"b": 2})
            assert (await (await session.get(f"{url}/v1/jobs/{job}")).json())["params"]["work"] == {"b": 2.0}
            with pytest.raises(client.JobFailed, match="takes no image"):
                await client.submit(session, url, PNG, workflow="wan_t2v", prompt="p")
    finally:
        await runner.cleanup()


# -- the validator alone ---------------------------------------------------------------------------


def test_validate_job_without_a_server():
    workflows = {"wan_i2v": load_workflow("wan_i2v"), "synthetic3": load_workflow("synthetic3")}
    name, params, images = validate_job({"prompt": "p", "image": "QUJD", "seed": "5"}, workflows, form=True)
    assert (name, params["seed"], images) == ("wan_i2v", 5, {"image": "QUJD"})
    with pytest.raises(Invalid) as err:
        validate_job({"prompt": "p", "seed": "5"}, workflows, form=False)
    assert err.value.field == "seed"
    with pytest.raises(Invalid) as err:
        validate_job({"prompt": "p", "a": 1, "b": 2}, workflows)
    assert err.value.field == "a" and "'a', 'b'" in err.value.message and err.value.reason == "unknown_field"
    assert decode_base64("data:image/png;base64," + PNG_B64.rstrip("=")) == PNG
    assert decode_base64(base64.urlsafe_b64encode(PNG).decode()) == PNG
    check_image(PNG, LIMIT)
    with pytest.raises(Invalid, match="limit"):
        check_image(PNG, 10)


def test_which_workflow_a_body_without_one_gets():
    t2v, synthetic = load_workflow("wan_t2v"), load_workflow("synthetic3")
    # the only served workflow is the default
    assert validate_job({"prompt": "p"}, {"wan_t2v": t2v})[0] == "wan_t2v"
    assert validate_job({"workflow": None}, {"synthetic3": synthetic})[0] == "synthetic3"
    # several, none of them wan_i2v: the body must say
    for body in ({"prompt": "p"}, {"prompt": "p", "workflow": ""}, {"workflow": None}):
        with pytest.raises(Invalid) as err:
            validate_job(body, {"wan_t2v": t2v, "synthetic3": synthetic})
        assert err.value.field == "workflow"
        assert err.value.message == "workflow is required; served: synthetic3, wan_t2v"
