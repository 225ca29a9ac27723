"""A workflow's latency objective (``[slo] p95_s``): declared in its file, shown by
``GET /v1/workflows/{name}``, and each succeeded job counted in ``/metrics`` as within or
past it, so its attainment can be read (met="true" over all).

Real broker, REST app and in-process workers (synthetic stages, shm data plane).
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.api import make_app
from broker.service import Broker
from stages.workflow import WorkflowError, loads_workflow

from ..helpers import chain3
from ..stages.test_worker_dataplane import Workers, settings_for

pytestmark = pytest.mark.timeout(120)


def with_slo(name: str, p95_s: float) -> str:
    text = chain3(name, 0.05)
    return text.replace('result = "c"', f'result = "c"\n[slo]\np95_s = {p95_s}\ndescription = "test"', 1)


def test_an_slo_is_declared_with_seconds_and_nothing_else():
    assert loads_workflow(with_slo("w", 2.5)).slo.p95_s == 2.5
    assert loads_workflow(chain3("w", 0.1)).slo is None
    for bad, why in (("p95_s = 0", "p95_s"), ("p95_s = \"fast\"", "p95_s"), ("p95_s = 1\np99_s = 2", "p99_s"),
                     ("p95_s = inf", "p95_s")):
        text = chain3("w", 0.1).replace('result = "c"', f'result = "c"\n[slo]\n{bad}', 1)
        with pytest.raises(WorkflowError, match=why):
            loads_workflow(text)


async def test_succeeded_jobs_are_counted_against_their_workflows_objective(tmp_path):
    met, missed = tmp_path / "met.toml", tmp_path / "missed.toml"
    met.write_text(with_slo("met", 3600))
    missed.write_text(with_slo("missed", 0.001))  # no job of three stages ends within a millisecond
    settings = settings_for(tmp_path / "data", workflows=[str(met), str(missed)])
    broker = Broker(settings)
    await broker.start()
    workers = Workers()
    try:
        settings = settings.replace(control=broker.endpoint)
        for wf in broker.workflows.values():
            for stage in ("a", "b", "c"):
                if not any(w for w in workers.running if w[0].stage == stage):  # one worker serves both
                    workers.start(settings, wf, stage)
        async with TestClient(TestServer(make_app(broker))) as client:
            view = await (await client.get("/v1/workflows/met")).json()
            assert view["slo"] == {"p95_s": 3600.0, "description": "test"}
            for name in ("met", "missed", "met"):
                resp = await client.post("/v1/jobs", json={"workflow": name})
                assert resp.status == 201, await resp.text()
                job = (await resp.json())["id"]
                async with asyncio.timeout(60):
                    while broker.job(job)["state"] != "succeeded":
                        await asyncio.sleep(0.02)
            text = (await (await client.get("/metrics")).read()).decode()
        assert 'onepiece_slo_jobs_total{met="true",workflow="met"} 2.0' in text
        assert 'onepiece_slo_jobs_total{met="false",workflow="missed"} 1.0' in text
        assert 'onepiece_job_latency_seconds_count{workflow="met"} 2.0' in text
    finally:
        await workers.stop()
        await broker.stop()
