"""Lineage recovery with real processes: a worker SIGKILLed while it holds the finished
outputs of its stage, before the consumer has them, at every position of the Wan2.1
graph (a root, the fan-in, the stage before the result, the result stage itself).

The workflow has Wan2.1 image-to-video's shape (three encoders fan in at denoise, then
vae_decode, then video_encode) with synthetic stages, so the stack starts in seconds;
real broker, REST API, worker processes and shm data plane. To make "before the
consumer has the tensors" certain rather than a race, the victim's consumer stage is
kept busy with earlier jobs, so the victim's outputs wait, held, for a binding.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest
import pytest_asyncio

from onepiece import client
from onepiece.stack import Stack

from .helpers import SYNTHETIC_PARAMS
from .test_e2e import events_until_end, handle_of, settings_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
os.environ.setdefault("ONEPIECE_LOG_LEVEL", "WARNING")

WAN_SHAPED = """
name = "wanlike"
result = "v_encode"
[stages.t_encode]
kind = "synthetic"
outputs = ["emb"]
[stages.t_encode.synthetic]
service_time = 0.05
output_bytes = 65536
[stages.i_encode]
kind = "synthetic"
outputs = ["img"]
[stages.i_encode.synthetic]
service_time = 0.05
output_bytes = 65536
[stages.l_encode]
kind = "synthetic"
outputs = ["cond"]
[stages.l_encode.synthetic]
service_time = 0.05
output_bytes = 65536
[stages.dn]
kind = "synthetic"
after = ["t_encode", "i_encode", "l_encode"]
outputs = ["latents"]
progress = true
[stages.dn.synthetic]
service_time = { dist = "constant", mean = 0.3 }
output_bytes = 262144
[stages.v_decode]
kind = "synthetic"
after = ["dn"]
outputs = ["video"]
[stages.v_decode.synthetic]
service_time = 0.3
output_bytes = 1048576
[stages.v_encode]
kind = "synthetic"
after = ["v_decode"]
[stages.v_encode.synthetic]
service_time = 0.3
""" + SYNTHETIC_PARAMS

CONSUMER = {"t_encode": "dn", "dn": "v_decode", "v_decode": "v_encode"}
BUSY_S = 6.0  # how long the earlier jobs keep the consumer stage busy


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def wanlike(tmp_path_factory):
    """One stack, two workers per stage; each test replaces the worker it kills."""
    tmp = tmp_path_factory.mktemp("wanlike")
    wf = tmp / "wanlike.toml"
    wf.write_text(WAN_SHAPED)
    settings = settings_for(tmp / "data", "shm", [str(wf)], progress_floor_s=20.0, progress_cap_s=60.0,
                            job_deadline_s=120.0)
    async with Stack(settings, workers_per_stage=2) as stack, aiohttp.ClientSession() as session:
        yield stack, session, wf


pytestmark.append(pytest.mark.asyncio(loop_scope="module"))


@pytest.mark.parametrize("victim", ["t_encode", "dn", "v_decode", "v_encode"])
async def test_worker_killed_holding_finished_outputs_the_job_still_succeeds(wanlike, victim):
    stack, session, wf = wanlike
    while stack.broker.missing_stages():  # the previous test's replacement is still starting
        await asyncio.sleep(0.1)
    busy = []
    consumer = CONSUMER.get(victim)
    if consumer is not None:
        # two earlier jobs hold both consumer workers for BUSY_S: work = a per-stage time factor
        work = {consumer: BUSY_S / 0.3}
        busy = [stack.broker.submit("wanlike", {"prompt": f"busy {i}", "steps": 4, "work": work})
                for i in range(2)]
        while stack.broker.stages()[consumer]["busy"] < 2:
            await asyncio.sleep(0.05)
    job = await client.submit(session, stack.url, None, prompt="victim", workflow="wanlike")
    killed: list[str] = []
    trigger = "stage_started" if victim == "v_encode" else "stage_finished"

    async def kill(e):
        if e["type"] == trigger and e["data"]["stage"] == victim and not killed:
            if consumer is not None:  # the outputs are held, their consumer not bound yet
                assert stack.broker.core.job(job)["stages"][consumer]["state"] == "queued"
            handle = handle_of(stack, e["data"]["worker"])
            handle.process.send_signal(signal.SIGKILL)
            killed.append(handle.id)
            await stack.launcher.start(str(wf), victim)  # a supervisor brings one back

    seen = await asyncio.wait_for(events_until_end(session, stack.url, job, kill), 90)
    assert killed, f"{victim} never reached {trigger}"
    assert seen[-1]["type"] == "succeeded", seen[-1]
    retried = [e["data"]["stage"] for e in seen if e["type"] == "stage_retry"]
    assert victim in retried
    if victim == "dn":  # the fan-in re-runs, so the encoders it had released are made again
        assert {"t_encode", "i_encode", "l_encode"} <= set(retried)
    for b in busy:
        await asyncio.wait_for(client.wait(session, stack.url, b), 60)  # JobFailed unless it succeeded
    async with session.get(f"{stack.url}/readyz") as resp:
        assert resp.status == 200, await resp.text()
