"""Many workflows on one stack, end to end, with real processes and the tiny model.

One broker serves Wan2.1 image-to-video, Wan2.1 text-to-video and Wan2.2 A14B
image-to-video. The stages that share a model (the UMT5 text encoder, the Wan
VAE, the video encoder) have one worker each, serving every workflow; each
Wan2.2 expert is a worker of its own that holds only its expert, and the
high-noise one hands its state to the low-noise one over the data plane.

A served video must be the very video the same stages make in this process
(frame for frame: the data plane and the handoff change nothing); that the
stages equal diffusers' own pipelines is tests/stages/test_wan_workflows.py's
part.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from onepiece import client
from onepiece.stack import Stack
from stages.wan import (
    WanParams,
    decode_image,
    denoise,
    load_components,
    text_encode,
    vae_decode,
    vae_encode,
    video_encode,
)

from .test_e2e import SAMPLE, events_until_end, read_mp4, settings_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.asyncio(loop_scope="module")]
os.environ.setdefault("ONEPIECE_LOG_LEVEL", "WARNING")

WORKFLOWS = ["wan_i2v", "wan_t2v", "wan22_i2v"]
JOB = dict(prompt="a red kite over the dunes", negative_prompt="blur", height=64, width=80, num_frames=9,
           steps=6, guidance_scale=4.5, seed=5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    settings = settings_for(tmp_path_factory.mktemp("workflows"), "shm", WORKFLOWS)
    async with Stack(settings) as st, aiohttp.ClientSession() as session:
        yield st, session


async def run_job(st, session, workflow: str, image: bytes | None, **params) -> tuple[str, list[dict]]:
    job = await client.submit(session, st.url, image, workflow=workflow, **params)
    seen = await asyncio.wait_for(events_until_end(session, st.url, job), 300)
    assert seen[-1]["type"] == "succeeded", seen[-1]
    return job, seen


def workers_of(seen: list[dict]) -> dict[str, str]:
    return {e["data"]["stage"]: e["data"]["worker"] for e in seen if e["type"] == "stage_finished"}


async def served_frames(st, session, job: str, tmp: Path) -> np.ndarray:
    path = tmp / f"{job}.mp4"
    await client.download(session, st.url, job, path)
    return read_mp4(path)


def local_frames(p: WanParams, image: bytes | None, denoisers: list[str], fps: int) -> np.ndarray:
    """The workflow's stages run one after the other in this process, each with only its parts."""
    text = load_components("tiny", identity="umt5-xxl", device="cpu")
    vae = load_components("tiny", identity="wan2.1-vae", device="cpu")
    inputs = dict(text_encode(text, p))
    if image is not None:
        inputs.update(vae_encode(vae, decode_image(image), p))
    out = None
    for identity in denoisers:
        out = denoise(load_components("tiny", identity=identity, device="cpu"), inputs, p, state=out)
    data = video_encode(vae_decode(vae, out, p)["video"], fps=fps)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "local.mp4"
        path.write_bytes(data)
        return read_mp4(path)


async def test_one_text_encoder_serves_image_and_text_to_video(stack, tmp_path):
    st, session = stack
    _, i2v = await run_job(st, session, "wan_i2v", SAMPLE.read_bytes(), **JOB)
    t2v_job, t2v = await run_job(st, session, "wan_t2v", None, **JOB)
    assert workers_of(i2v)["text_encode"] == workers_of(t2v)["text_encode"]
    assert workers_of(i2v)["vae_decode"] == workers_of(t2v)["vae_decode"]
    assert len(st.broker.stages()["text_encode"]["workers"]) == 1
    assert set(workers_of(t2v)) == {"text_encode", "denoise_t2v", "vae_decode", "video_encode"}
    frames = await served_frames(st, session, t2v_job, tmp_path)
    assert frames.shape[:3] == (JOB["num_frames"], JOB["height"], JOB["width"])
    p = WanParams.from_dict(JOB)
    expected = await asyncio.to_thread(local_frames, p, None, ["wan2.1-t2v-14b"], 16)
    assert np.array_equal(frames, expected)


async def test_wan22_experts_hand_off_at_the_boundary(stack, tmp_path):
    st, session = stack
    job, seen = await run_job(st, session, "wan22_i2v", SAMPLE.read_bytes(), **JOB, guidance_scale_2=3.0)
    workers = workers_of(seen)
    assert set(workers) == {"text_encode", "vae_encode", "denoise_high", "denoise_low", "vae_decode", "video_encode"}
    assert workers["denoise_high"] != workers["denoise_low"]
    # each expert reported only its own steps, together the whole schedule once
    steps = {s: [e["data"]["step"] for e in seen if e["type"] == "progress" and e["data"]["stage"] == s]
             for s in ("denoise_high", "denoise_low")}
    assert steps["denoise_high"] and steps["denoise_low"]
    assert sorted(steps["denoise_high"] + steps["denoise_low"]) == list(range(1, JOB["steps"] + 1))
    frames = await served_frames(st, session, job, tmp_path)
    p = WanParams.from_dict({**JOB, "guidance_scale_2": 3.0})
    expected = await asyncio.to_thread(local_frames, p, SAMPLE.read_bytes(),
                                       ["wan2.2-i2v-a14b-high", "wan2.2-i2v-a14b-low"], 16)
    assert np.array_equal(frames, expected)
