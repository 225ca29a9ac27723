"""Denoise state crossing workers at step boundaries, with real processes (broker/core.py,
invariant 11; stages/worker.py): a worker SIGKILLed mid-denoise resumes on another from its
last checkpoint, a drained worker hands its job off at the next step boundary and leaves, and
either way the video is the one an uninterrupted run makes, frame for frame.

The first tests use a step-wise synthetic stage (its state is its step count), so the timing
of a kill is certain; the Wan tests use the tiny model (built in code, no download) and
compare the decoded frames of the served mp4 with an uninterrupted job's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from onepiece import client
from onepiece.stack import Stack

from .test_e2e import SAMPLE, events_until_end, handle_of, read_mp4, settings_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.asyncio(loop_scope="module")]
os.environ.setdefault("ONEPIECE_LOG_LEVEL", "WARNING")

EVERY = 2  # checkpoint_steps of these stacks

STEPPED = """
name = "stepped"
result = "sink"
[params.steps]
type = "integer"
default = 20
minimum = 1
maximum = 1000
[stages.source]
kind = "synthetic"
outputs = ["x"]
[stages.source.synthetic]
service_time = 0.01
output_bytes = 4096
[stages.walk]
kind = "synthetic"
after = ["source"]
outputs = ["y"]
progress = true
[stages.walk.synthetic]
service_time = 3.0
output_bytes = 4096
[stages.sink]
kind = "synthetic"
after = ["walk"]
[stages.sink.synthetic]
service_time = 0.01
"""


def steps_of(seen: list[dict]) -> list[int]:
    return [e["data"]["step"] for e in seen if e["type"] == "progress"]


def started(seen: list[dict], stage: str) -> list[dict]:
    return [e["data"] for e in seen if e["type"] == "stage_started" and e["data"]["stage"] == stage]


async def two_workers(stack: Stack, workflow: str, stage: str) -> None:
    await stack.launcher.start(workflow, stage)
    while len([w for w in stack.broker.stages()[stage]["workers"] if not w["draining"]]) < 2:
        await asyncio.sleep(0.05)


def at_step(stack, job: str, stage: str, step: int, act, log: list):
    """An event hook: once ``stage`` of ``job`` reports ``step``, ``act(worker)`` once, and
    log ``(worker, step)``."""
    async def hook(e):
        if e["type"] == "progress" and e["data"]["stage"] == stage and e["data"]["step"] >= step and not log:
            worker = stack.broker.core.job(job)["stages"][stage]["worker"]
            log.append((worker, e["data"]["step"]))
            await act(worker)
    return hook


def kill(stack):
    async def act(worker):
        handle_of(stack, worker).process.send_signal(signal.SIGKILL)
    return act


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stepped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stepped")
    wf = tmp / "stepped.toml"
    wf.write_text(STEPPED)
    settings = settings_for(tmp / "data", "shm", [str(wf)], checkpoint_steps=EVERY, checkpoint_s=0.0)
    async with Stack(settings) as stack, aiohttp.ClientSession() as session:
        yield stack, session, str(wf)


async def test_a_killed_step_wise_task_resumes_from_its_last_checkpoint(stepped):
    stack, session, wf = stepped
    await two_workers(stack, wf, "walk")
    job = await client.submit(session, stack.url, None, workflow="stepped")
    killed: list = []
    seen = await asyncio.wait_for(
        events_until_end(session, stack.url, job, at_step(stack, job, "walk", 9, kill(stack), killed)), 120)
    assert killed and seen[-1]["type"] == "succeeded", seen[-1]
    first, again = started(seen, "walk")
    assert "resumed_from_step" not in first
    # the kill came at step k: the state of step k - EVERY or later had been left with source's worker
    assert killed[0][1] - EVERY <= again["resumed_from_step"] < 20, (killed, again)
    second = [i for i, e in enumerate(seen) if e["type"] == "stage_started" and e["data"]["stage"] == "walk"][1]
    assert steps_of(seen[second:])[0] == again["resumed_from_step"] + 1  # not from step 1 again
    retry = [e["data"] for e in seen if e["type"] == "stage_retry" and e["data"]["stage"] == "walk"]
    assert retry and retry[0]["attempt"] == 2  # a death costs an attempt; the resume costs none


async def test_a_drained_worker_hands_its_step_wise_task_off_and_leaves(stepped):
    stack, session, wf = stepped
    await two_workers(stack, wf, "walk")
    job = await client.submit(session, stack.url, None, workflow="stepped")
    drained: list = []

    async def drain(worker):  # as an operator would: the broker tells the worker to drain
        async with session.post(f"{stack.url}/v1/workers/{worker}/drain") as resp:
            assert resp.status == 202

    seen = await asyncio.wait_for(
        events_until_end(session, stack.url, job, at_step(stack, job, "walk", 5, drain, drained)), 120)
    assert drained and seen[-1]["type"] == "succeeded", seen[-1]
    worker, step = drained[0]
    first, again = started(seen, "walk")
    assert first["worker"] == worker and again["worker"] != worker
    # handed off at the next step boundary or so, not after the remaining steps
    assert step <= again["resumed_from_step"] <= step + 2, (step, again)
    retry = [e["data"] for e in seen if e["type"] == "stage_retry" and e["data"]["stage"] == "walk"]
    assert retry[0]["attempt"] == 1 and "handed walk off" in retry[0]["reason"]
    handle = next((h for h in stack.launcher.workers() if h.id == worker), None)
    deadline = time.monotonic() + 10
    while handle is not None and handle.alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert handle is None or handle.process.returncode == 0  # it left, cleanly


# -- the tiny Wan model: the frames of a resumed or handed-off job are an uninterrupted job's --------

WAN_JOB = dict(prompt="a lighthouse at dusk", negative_prompt="blur", height=128, width=128, num_frames=9,
               steps=16, guidance_scale=4.0, seed=11)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def wan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan-handoff")
    settings = settings_for(tmp, "shm", ["wan_i2v"], checkpoint_steps=EVERY, checkpoint_s=0.0)
    async with Stack(settings) as stack, aiohttp.ClientSession() as session:
        await two_workers(stack, "wan_i2v", "denoise")
        reference = await client.submit(session, stack.url, SAMPLE.read_bytes(), **WAN_JOB)
        seen = await asyncio.wait_for(events_until_end(session, stack.url, reference), 300)
        assert seen[-1]["type"] == "succeeded", seen[-1]
        path = tmp / "reference.mp4"
        await client.download(session, stack.url, reference, path)
        yield stack, session, read_mp4(path), tmp


async def frames_of(stack, session, job, tmp) -> np.ndarray:
    path = tmp / f"{job}.mp4"
    await client.download(session, stack.url, job, path)
    return read_mp4(path)


async def test_wan_denoise_killed_mid_job_resumes_and_makes_the_same_video(wan):
    stack, session, reference, tmp = wan
    await two_workers(stack, "wan_i2v", "denoise")
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), **WAN_JOB)
    killed: list = []
    seen = await asyncio.wait_for(
        events_until_end(session, stack.url, job, at_step(stack, job, "denoise", 7, kill(stack), killed)), 300)
    assert killed and seen[-1]["type"] == "succeeded", seen[-1]
    again = started(seen, "denoise")[-1]
    assert again["resumed_from_step"] >= killed[0][1] - EVERY, (killed, again)
    assert np.array_equal(await frames_of(stack, session, job, tmp), reference)


async def test_wan_denoise_drained_mid_job_hands_off_and_makes_the_same_video(wan):
    stack, session, reference, tmp = wan
    await two_workers(stack, "wan_i2v", "denoise")
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), **WAN_JOB)
    drained: list = []

    async def drain(worker):  # SIGTERM, as a node manager's move; it returns once the worker exited
        assert await stack.launcher.drain(handle_of(stack, worker), timeout=60) == 0

    seen = await asyncio.wait_for(
        events_until_end(session, stack.url, job, at_step(stack, job, "denoise", 4, drain, drained)), 300)
    assert drained and seen[-1]["type"] == "succeeded", seen[-1]
    worker, step = drained[0]
    again = started(seen, "denoise")[-1]
    # it stopped at the next step boundary or so, not after finishing the job
    assert again["worker"] != worker and step <= again["resumed_from_step"] <= step + 2, (drained, again)
    assert np.array_equal(await frames_of(stack, session, job, tmp), reference)
