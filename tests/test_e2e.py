"""End to end: a real broker, REST API and stage worker processes, over shm and tcp.

Nothing is mocked: workers are separate processes running the tiny Wan2.1
model (or synthetic stages), tensors move over the chosen transport, jobs
go in and videos come out over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import imageio
import numpy as np
import msgpack
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from broker import protocol
from onepiece import client
from onepiece.config import load_settings
from onepiece.demo import SAMPLE
from onepiece.stack import Stack

from .helpers import chain3, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
os.environ.setdefault("ONEPIECE_LOG_LEVEL", "WARNING")  # worker processes inherit it

SMALL = dict(height=64, width=96, num_frames=9, steps=4, guidance_scale=5.0, negative_prompt="blur")


def settings_for(tmp: Path, transport: str, workflows: list[str], **kw):
    return load_settings(env={}, data_dir=tmp, control="tcp://127.0.0.1:*", rest_port=free_port(),
                         transport=transport, workflows=workflows, heartbeat_s=0.5, liveness=3, **kw)


async def events_until_end(session, url: str, job: str, on_event=None) -> list[dict]:
    seen = []
    async for e in client.events(session, url, job):
        seen.append(e)
        if on_event is not None:
            await on_event(e)
        if e["type"] in ("succeeded", "failed", "cancelled"):
            break
    return seen


def read_mp4(path: Path) -> np.ndarray:
    with imageio.v2.get_reader(str(path), "ffmpeg") as reader:
        return np.stack([frame for frame in reader.iter_data()])


def handle_of(stack: Stack, worker_id: str):
    return next(h for h in stack.launcher.workers() if h.id == worker_id)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["shm", "tcp"])
async def wan(request, tmp_path_factory):
    """One Wan2.1 stack per transport, with two denoise workers."""
    settings = settings_for(tmp_path_factory.mktemp(f"wan-{request.param}"), request.param, ["wan_i2v"])
    stack = Stack(settings)
    await stack.start(ready_timeout=300)
    try:
        await stack.launcher.start("wan_i2v", "denoise")
        while len(stack.broker.stages()["denoise"]["workers"]) < 2:
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            yield stack, session
    finally:
        await stack.stop()


pytestmark.append(pytest.mark.asyncio(loop_scope="module"))


async def test_a_job_succeeds_and_its_mp4_decodes(wan, tmp_path):
    stack, session = wan
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), prompt="a boat", seed=1, **SMALL)
    seen = await events_until_end(session, stack.url, job)
    assert seen[-1]["type"] == "succeeded", seen[-1]
    types = [e["type"] for e in seen]
    assert types[0] == "queued" and "progress" in types
    finished = {e["data"]["stage"] for e in seen if e["type"] == "stage_finished"}
    assert finished == {"text_encode", "image_encode", "vae_encode", "denoise", "vae_decode", "video_encode"}
    out = tmp_path / "v.mp4"
    await client.download(session, stack.url, job, out)
    frames = read_mp4(out)
    assert frames.shape[:3] == (SMALL["num_frames"], SMALL["height"], SMALL["width"])
    async with session.get(f"{stack.url}/v1/jobs/{job}") as resp:
        view = await resp.json()
    assert view["state"] == "succeeded"
    assert all(view["stages"][s]["timings"].get("run_s") is not None for s in finished)


async def test_five_concurrent_jobs_all_succeed(wan, tmp_path):
    stack, session = wan
    jobs = await asyncio.gather(*(client.submit(session, stack.url, SAMPLE.read_bytes(), prompt=f"scene {i}",
                                                seed=i, **SMALL) for i in range(5)))
    results = await asyncio.gather(*(client.wait(session, stack.url, j) for j in jobs))
    assert len(results) == 5 and len(set(jobs)) == 5
    for j in jobs:
        assert await client.download(session, stack.url, j, tmp_path / f"{j}.mp4") > 0
        assert read_mp4(tmp_path / f"{j}.mp4").shape[0] == SMALL["num_frames"]


async def test_cancel_stops_a_running_denoise(wan):
    stack, session = wan
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), prompt="long one",
                              **{**SMALL, "steps": 100})

    async def cancel_on_progress(e):
        if e["type"] == "progress" and e["data"]["step"] == 2:
            async with session.delete(f"{stack.url}/v1/jobs/{job}") as resp:
                assert resp.status == 202

    seen = await events_until_end(session, stack.url, job, cancel_on_progress)
    assert seen[-1]["type"] == "cancelled"
    steps = [e["data"]["step"] for e in seen if e["type"] == "progress"]
    assert max(steps) < 100
    # The denoise worker stops at its next step and is free again.
    deadline = time.monotonic() + 30
    while stack.broker.stages()["denoise"]["busy"]:
        assert time.monotonic() < deadline, "denoise worker still busy after cancel"
        await asyncio.sleep(0.1)
    job2 = await client.submit(session, stack.url, SAMPLE.read_bytes(), prompt="after cancel", **SMALL)
    await client.wait(session, stack.url, job2)


async def test_garbage_on_the_router_socket_does_not_disturb_it(wan):
    stack, session = wan
    host, port = stack.broker.endpoint.removeprefix("tcp://").rsplit(":", 1)
    # Raw bytes that are not ZMTP at all.
    for blob in (os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 10 + os.urandom(64)):
        _, w = await asyncio.open_connection(host, int(port))
        w.write(blob)
        await w.drain()
        w.close()
    # Valid ZMTP, invalid bodies.
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(stack.broker.endpoint)
    bad = [[os.urandom(100)], [msgpack.packb([1, 2, 3])], [msgpack.packb({"v": 99, "k": "REGISTER"})],
           [msgpack.packb({"v": protocol.VERSION, "k": "NOPE"})],
           [msgpack.packb({"v": protocol.VERSION, "k": "DONE", "job": 5})], [b"a", b"b", b"c"],
           [msgpack.packb([{"v": protocol.VERSION, "k": "DONE", "job": 5}, "not a map"])],
           [msgpack.packb({"v": protocol.VERSION, "k": "DONE", "job": "nope", "stage": "denoise"})]]
    for frames in bad:
        await dealer.send_multipart(frames)
    await asyncio.sleep(0.5)
    dealer.close()
    ctx.term()
    assert stack.broker.metrics.bad_messages._value.get() >= 5
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), prompt="still serving", **SMALL)
    await client.wait(session, stack.url, job)
    async with session.get(f"{stack.url}/healthz") as resp:
        assert resp.status == 200


async def test_denoise_worker_killed_right_after_finishing_the_job_still_succeeds(wan):
    """Issue 10's hang: the denoise worker is SIGKILLed as soon as it reports its stage finished,
    holding the latents, maybe before vae_decode has them. If vae_decode had not started, denoise
    runs again, and its inputs (released when it first finished) are made again by re-running the
    encoders (lineage); if it had, nothing is re-made. Either way the job succeeds, and in time."""
    stack, session = wan
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), prompt="lineage", seed=3, **SMALL)
    killed = []

    async def kill_after_finish(e):
        if e["type"] == "stage_finished" and e["data"]["stage"] == "denoise" and not killed:
            victim = handle_of(stack, e["data"]["worker"])
            victim.process.send_signal(signal.SIGKILL)
            killed.append(victim.id)

    seen = await asyncio.wait_for(events_until_end(session, stack.url, job, kill_after_finish), 240)
    assert killed and seen[-1]["type"] == "succeeded", seen[-1]
    retried = [e["data"]["stage"] for e in seen if e["type"] == "stage_retry"]
    if "denoise" in retried:  # vae_decode had not started: the encoders' outputs were made again
        assert {"text_encode", "image_encode", "vae_encode"} <= set(retried), retried
    await stack.launcher.start("wan_i2v", "denoise")  # two again, for the test after this one
    while len([w for w in stack.broker.stages()["denoise"]["workers"] if w["id"] != killed[0]]) < 2:
        await asyncio.sleep(0.1)


async def test_denoise_worker_killed_mid_job_the_job_still_succeeds(wan):
    """Runs last for its stack: it leaves one denoise worker."""
    stack, session = wan
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), prompt="survive",
                              **{**SMALL, "steps": 60})
    killed = []

    async def kill_denoise(e):
        if e["type"] == "stage_started" and e["data"]["stage"] == "denoise" and not killed:
            victim = handle_of(stack, e["data"]["worker"])
            victim.process.send_signal(signal.SIGKILL)
            killed.append(victim.id)

    seen = await events_until_end(session, stack.url, job, kill_denoise)
    assert killed, "denoise never started"
    assert seen[-1]["type"] == "succeeded", seen[-1]
    retries = [e for e in seen if e["type"] == "stage_retry"]
    assert retries and retries[0]["data"]["stage"] == "denoise"
    started = [e["data"]["worker"] for e in seen if e["type"] == "stage_started" and e["data"]["stage"] == "denoise"]
    assert started[0] == killed[0] and started[-1] != killed[0]
    # Exactly one result, and the job's final state never changes again.
    assert sum(e["type"] == "succeeded" for e in seen) == 1


SLOW_B = chain3("slow3", b_service=60)


async def test_a_stage_whose_only_worker_keeps_dying_fails_the_job_after_the_retry_limit(tmp_path):
    wf = tmp_path / "slow3.toml"
    wf.write_text(SLOW_B)
    settings = settings_for(tmp_path / "data", "shm", [str(wf)], max_attempts=3)
    async with Stack(settings) as stack, aiohttp.ClientSession() as session:
        job = await client.submit(session, stack.url, None, prompt="doomed", workflow="slow3")
        kills = []

        async def kill_b(e):
            if e["type"] == "stage_started" and e["data"]["stage"] == "b":
                victim = handle_of(stack, e["data"]["worker"])
                victim.process.send_signal(signal.SIGKILL)
                kills.append(victim.id)
                if len(kills) < 3:
                    await stack.launcher.start(str(wf), "b")  # a supervisor brings one back

        seen = await events_until_end(session, stack.url, job, kill_b)
        assert seen[-1]["type"] == "failed"
        reason = seen[-1]["data"]["reason"]
        assert "stage b" in reason and "3 attempts" in reason and "lost" in reason, reason
        assert len(kills) == 3
        async with session.get(f"{stack.url}/v1/jobs/{job}") as resp:
            view = await resp.json()
        assert view["state"] == "failed" and "3 attempts" in view["reason"]
