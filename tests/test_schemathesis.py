"""Schema-driven fuzzing of the REST API of a real running stack.

Schemathesis reads ``/v1/openapi.json`` from a stack with real worker
processes and sends what the document allows, and what it does not, to
every operation: a few hundred requests, derandomized with a fixed seed.
Every response must not be a 5xx, must have a documented status code,
content type and headers, and must match its documented schema; a request
the document allows must be accepted and one it forbids refused, which is
how the document and the validator are held to agree. A second stack serves
with API keys and is fuzzed with an admin key, plus schemathesis'
``ignored_auth``: every operation the document secures must refuse the same
request without a key and with a made-up one. Afterwards, a valid
job still runs through the workers to ``succeeded``, and the operations on
real jobs (which random ids never reach) are checked the same way.

The stack serves ``synthetic3`` with workers and three Wan workflows without
any (their stages are on demand but never started): one request schema per
workflow, each with its own parameters, defaults and image rule (wan_i2v and
wan22_i2v take one, wan_t2v none), so the fuzzer puts every branch of the
request's ``oneOf`` to the validator; Wan jobs stay queued until they are
cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
import time

import pytest
import requests
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from broker import auth  # noqa: E402
from manager.policy import StaticPolicy  # noqa: E402
from onepiece.config import load_settings  # noqa: E402
from onepiece.stack import Stack  # noqa: E402

pytestmark = pytest.mark.timeout(300)
os.environ.setdefault("ONEPIECE_LOG_LEVEL", "WARNING")  # worker processes inherit it

SYNTHETIC = ("a", "b", "c")
WORKFLOWS = ["synthetic3", "wan_i2v", "wan_t2v", "wan22_i2v"]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, positive_data_acceptance, negative_data_rejection, unsupported_method]
FUZZ = {
    "seed": 20240610,
    "generation": {"mode": "all", "max-examples": 25, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "request-timeout": 10,  # the event stream of a live job would not end: fail, never hang
}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class SyntheticOnly(StaticPolicy):
    """One worker for each synthetic3 stage; the other stages stay at zero and do not count as missing."""

    def __init__(self):
        super().__init__({s: 1 for s in SYNTHETIC})

    def on_demand(self, stage: str) -> bool:
        return stage not in self.targets


class StackThread:
    """A stack on its own event loop in a thread, so that blocking HTTP clients can talk to it."""

    def __init__(self, settings):
        self.stack = Stack(settings, workers_per_stage=0, policy=SyntheticOnly())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stack", daemon=True)

    def run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> str:
        self.thread.start()
        self.run(self.stack.start(ready_timeout=60), 90)
        return self.stack.url

    def stop(self) -> None:
        try:
            self.run(self.stack.stop(drain_timeout=10), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="module")
def stack_url(tmp_path_factory):
    settings = load_settings(env={}, data_dir=tmp_path_factory.mktemp("fuzz"), control="tcp://127.0.0.1:*",
                             rest_port=0, workflows=WORKFLOWS, heartbeat_s=0.5, liveness=3,
                             max_request_bytes=1 << 20)
    running = StackThread(settings)
    try:
        yield running.start()
    finally:
        running.stop()


@pytest.fixture(scope="module")
def api_schema(stack_url):
    return schemathesis.openapi.from_url(f"{stack_url}/v1/openapi.json", config=SchemathesisConfig.from_dict(FUZZ))


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    # schemathesis 4.32's from_fixture renames its test through Node._nodeid, which pytest 9 no longer has
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def live_workers(url: str, headers: dict | None = None) -> set[str]:
    stages = requests.get(f"{url}/v1/stages", headers=headers, timeout=10).json()["stages"]
    return {w["id"] for s in stages.values() for w in s["workers"]}


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_every_operation_keeps_its_documented_contract(case, stack_url):
    if case.path == "/v1/workers/{id}/drain" and (case.path_parameters or {}).get("id") in live_workers(stack_url):
        return  # draining would take a worker away mid-test; the fuzzer's ids are random, but never let one hit
    if case.meta.generation.mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and case.body.get("image"):
        # JSON Schema says "a base64 string", not "a PNG that decodes": give a schema-valid request a real image,
        # so that being refused is a disagreement between the document and the validator, not a bad image.
        case.body["image"] = PNG if case.media_type == "multipart/form-data" else base64.b64encode(PNG).decode()
    case.call_and_validate(base_url=stack_url, checks=CHECKS)


# -- the same with keys: every secured operation refuses a request without a valid key ----------


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory):
    """A stack that serves REST with keys (one admin key: every operation is open to it)."""
    folder = tmp_path_factory.mktemp("keyed")
    admin = auth.add_key(folder / "keys.json", ["admin"], "fuzz")[1]
    settings = load_settings(env={}, data_dir=folder / "data", control="tcp://127.0.0.1:*", rest_port=0,
                             workflows=WORKFLOWS, heartbeat_s=0.5, liveness=3, max_request_bytes=1 << 20,
                             api_keys=folder / "keys.json")
    running = StackThread(settings)
    try:
        yield running.start(), {"Authorization": f"Bearer {admin}"}
    finally:
        running.stop()


@pytest.fixture(scope="module")
def keyed_schema(keyed_stack):
    url, _ = keyed_stack
    return schemathesis.openapi.from_url(f"{url}/v1/openapi.json", config=SchemathesisConfig.from_dict(
        {**FUZZ, "generation": {**FUZZ["generation"], "max-examples": 10}}))


keyed = schemathesis.pytest.from_fixture("keyed_schema")


@keyed.parametrize()
def test_with_keys_every_operation_keeps_its_contract_and_refuses_a_request_without_a_valid_key(case, keyed_stack):
    """``ignored_auth``: for each operation the document secures, the same request without a
    key and with a made-up one must be refused (401); with the admin key it keeps its contract."""
    url, headers = keyed_stack
    if case.path == "/v1/workers/{id}/drain" and (case.path_parameters or {}).get("id") in live_workers(url, headers):
        return  # as above: never drain a live worker mid-test
    if case.meta.generation.mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and case.body.get("image"):
        case.body["image"] = PNG if case.media_type == "multipart/form-data" else base64.b64encode(PNG).decode()
    case.call_and_validate(base_url=url, headers=headers, checks=[*CHECKS, ignored_auth])


def wait_until_ended(session: requests.Session, url: str, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (state := session.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["state"]) in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout:.0f} s"
        time.sleep(0.1)
    return state


def test_a_valid_job_succeeds_after_the_fuzzing_and_real_jobs_keep_the_contract(api_schema, stack_url):
    session = requests.Session()
    # What the fuzzer submitted would only delay the next job: cancel whatever has not ended.
    for job in session.get(f"{stack_url}/v1/jobs", params={"limit": 1000}, timeout=10).json()["jobs"]:
        if job["state"] in ("queued", "running"):
            assert session.delete(f"{stack_url}/v1/jobs/{job['id']}", timeout=10).status_code in (202, 409)
    jobs, job = api_schema["/v1/jobs"]["POST"], api_schema["/v1/jobs/{id}"]
    done = jobs.Case(body={"workflow": "synthetic3", "steps": 3, "work": {"b": 0.5}}, media_type="application/json")
    done_id = done.call_and_validate(base_url=stack_url, checks=CHECKS).json()["id"]
    assert wait_until_ended(session, stack_url, done_id) == "succeeded"
    assert live_workers(stack_url), "the fuzzer drained a worker"

    waiting = jobs.Case(body={"prompt": "no workers for this one", "image": base64.b64encode(PNG).decode()},
                        media_type="application/json")
    waiting_id = waiting.call_and_validate(base_url=stack_url, checks=CHECKS).json()["id"]
    # every served workflow is validated from its own declaration, over the documented contract
    text = jobs.Case(body={"workflow": "wan_t2v", "prompt": "no image here", "steps": 2},
                     media_type="application/json")
    text_id = text.call_and_validate(base_url=stack_url, checks=CHECKS).json()["id"]
    assert session.get(f"{stack_url}/v1/jobs/{text_id}", timeout=10).json()["params"]["steps"] == 2
    refused = jobs.Case(body={"workflow": "wan_t2v", "prompt": "p", "image": base64.b64encode(PNG).decode()},
                        media_type="application/json").call_and_validate(base_url=stack_url, checks=CHECKS)
    assert refused.status_code == 400 and refused.json()["field"] == "image"
    assert session.delete(f"{stack_url}/v1/jobs/{text_id}", timeout=10).status_code == 202
    workflows = api_schema["/v1/workflows/{name}"]["GET"]
    for name in WORKFLOWS:
        resp = workflows.Case(path_parameters={"name": name}).call_and_validate(base_url=stack_url, checks=CHECKS)
        assert resp.json()["name"] == name
    # The documented shapes of real jobs: views, event streams as sent, cancel, and results not there.
    events, result = api_schema["/v1/jobs/{id}/events"]["GET"], api_schema["/v1/jobs/{id}/result"]["GET"]
    calls = [(job["GET"], done_id, 200), (job["GET"], waiting_id, 200), (job["DELETE"], done_id, 409),
             (events, done_id, 200), (result, waiting_id, 409),
             (result, done_id, 410),  # synthetic3 makes no file
             (job["DELETE"], waiting_id, 202), (events, waiting_id, 200)]
    for operation, job_id, status in calls:
        resp = operation.Case(path_parameters={"id": job_id}).call_and_validate(base_url=stack_url, checks=CHECKS)
        assert resp.status_code == status, (operation.label, resp.text)
    stream = session.get(f"{stack_url}/v1/jobs/{done_id}/events", timeout=10).text
    assert "event: succeeded\n" in stream and "id: 0\n" in stream
