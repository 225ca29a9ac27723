"""A denoise worker group (``sp=2``: the worker and one follower process, stages/wan/group.py)
in a real stack serving wan_i2v with the tiny model: it makes the video an ``sp=1`` worker
makes, frame for frame; a follower SIGKILLed mid-denoise costs the worker (it exits non-zero,
no rank left) but not the job, which resumes elsewhere; a drained group hands its job off at a
step boundary like any worker, and all its ranks exit.

The broker gives a task to the earliest registered idle worker, so each test first starts a
fresh pair, the group then an ``sp=1`` backup, and the job goes to the group. The tiny model's
steps take milliseconds, so jobs run the workflow's most steps (100) for a kill or a drain to
land mid-denoise. Figures (timings) print with ``pytest -s``.
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

from manager.launcher import LocalLauncher
from onepiece import client
from onepiece.stack import Stack
from stages.wan.group import EXIT_GROUP_LOST, LOST_EXIT_DELAY_S

from .helpers import until
from .test_e2e import SAMPLE, events_until_end, read_mp4, settings_for
from .test_handoff import at_step, started

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]
os.environ.setdefault("ONEPIECE_LOG_LEVEL", "WARNING")

EVERY = 10  # checkpoint_steps of the stack
JOB = dict(prompt="a lighthouse at dusk", negative_prompt="blur", height=64, width=64, num_frames=9,
           steps=100, guidance_scale=4.0, seed=11)
LOST_EXIT_BOUND_S = 15.0  # a follower's death to the group's worker exiting (its collective fails at once)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def registered(stack: Stack, worker: str) -> dict:
    """The broker's view of ``worker`` once it registered."""
    while True:
        view = next((w for w in stack.broker.stages()["denoise"]["workers"] if w["id"] == worker), None)
        if view is not None:
            return view
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def wan(tmp_path_factory):
    """A stack (every worker sp=1), the reference video made by its own denoise worker,
    which then leaves, and a launcher of sp=2 workers."""
    tmp = tmp_path_factory.mktemp("sp-group")
    settings = settings_for(tmp, "shm", ["wan_i2v"], checkpoint_steps=EVERY, checkpoint_s=0.0)
    # GPU slots (CPU ones here) for every stage and a group of 2 beside a width-1 denoise worker
    async with Stack(settings, gpu_slots=8) as stack, aiohttp.ClientSession() as session:
        job = await client.submit(session, stack.url, SAMPLE.read_bytes(), **JOB)
        seen = await asyncio.wait_for(events_until_end(session, stack.url, job), 120)
        assert seen[-1]["type"] == "succeeded", seen[-1]
        reference = await frames_of(stack, session, job, tmp)
        for handle in [h for h in stack.launcher.workers() if h.stage == "denoise"]:
            assert await stack.launcher.drain(handle, timeout=30) == 0
        groups = LocalLauncher(stack.launcher.settings.replace(sp=2))
        try:
            yield stack, session, reference, tmp, groups
        finally:
            await groups.aclose()


async def frames_of(stack, session, job, tmp) -> np.ndarray:
    path = tmp / f"{job}.mp4"
    await client.download(session, stack.url, job, path)
    return read_mp4(path)


async def fresh_pair(stack: Stack, groups: LocalLauncher) -> tuple:
    """Drain the denoise workers left from before; start an sp=2 group, then an sp=1 backup
    (registered in that order: the group gets the next job). Returns the group's handle and
    broker view."""
    for launcher in (stack.launcher, groups):
        for handle in [h for h in launcher.workers() if h.stage == "denoise"]:
            assert await launcher.drain(handle, timeout=30) == 0
    group = await groups.start("wan_i2v", "denoise")
    view = await asyncio.wait_for(registered(stack, group.id), 120)
    backup = await stack.launcher.start("wan_i2v", "denoise")
    await asyncio.wait_for(registered(stack, backup.id), 120)
    return group, view


async def test_an_sp2_group_makes_the_same_video_as_an_sp1_worker(wan):
    stack, session, reference, tmp, groups = wan
    group, view = await fresh_pair(stack, groups)
    assert view["info"]["sp"] == 2 and len(view["info"]["ranks"]) == 1
    assert all(alive(pid) for pid in view["info"]["ranks"])
    start = time.monotonic()
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), **JOB)
    seen = await asyncio.wait_for(events_until_end(session, stack.url, job), 120)
    assert seen[-1]["type"] == "succeeded", seen[-1]
    assert [s["worker"] for s in started(seen, "denoise")] == [group.id]
    print(f"sp=2 job: {time.monotonic() - start:.2f} s")
    assert np.array_equal(await frames_of(stack, session, job, tmp), reference)
    other = [w for w in stack.broker.stages()["denoise"]["workers"] if w["id"] != group.id]
    assert [w["info"]["sp"] for w in other] == [1]
    encoder = stack.broker.stages()["vae_encode"]["workers"][0]["info"]
    assert "sp" not in encoder  # other kinds ignore it


async def test_a_follower_killed_mid_denoise_ends_its_worker_not_the_job(wan):
    stack, session, reference, tmp, groups = wan
    group, view = await fresh_pair(stack, groups)
    follower = view["info"]["ranks"][0]
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), **JOB)
    killed: list = []

    async def kill_follower(worker):
        assert worker == group.id
        os.kill(follower, signal.SIGKILL)
        killed.append(time.monotonic())

    seen = await asyncio.wait_for(
        events_until_end(session, stack.url, job, at_step(stack, job, "denoise", 15, kill_follower, [])), 120)
    assert killed and seen[-1]["type"] == "succeeded", seen[-1]
    first, again = started(seen, "denoise")
    assert first["worker"] == group.id and again["worker"] != group.id
    assert again.get("resumed_from_step", 0) >= 10  # from the group's checkpoint, not from the start
    retry = [e["data"] for e in seen if e["type"] == "stage_retry" and e["data"]["stage"] == "denoise"]
    assert retry and "GroupLost" in retry[0]["reason"], retry
    code = await asyncio.wait_for(group.process.wait(), LOST_EXIT_BOUND_S)
    print(f"group worker exited {code} {time.monotonic() - killed[0]:.2f} s after its follower's kill "
          f"(exit delay {LOST_EXIT_DELAY_S} s)")
    assert code == EXIT_GROUP_LOST
    assert not alive(follower) and not alive(group.process.pid)
    assert np.array_equal(await frames_of(stack, session, job, tmp), reference)


async def test_a_drained_group_hands_off_at_a_step_boundary_and_all_ranks_exit(wan):
    stack, session, reference, tmp, groups = wan
    group, view = await fresh_pair(stack, groups)
    follower = view["info"]["ranks"][0]
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), **JOB)
    drained: list = []

    async def drain(worker):  # SIGTERM, as a node manager's move; returns once the worker exited
        assert await groups.drain(handle_of_group(groups, worker), timeout=60) == 0

    seen = await asyncio.wait_for(
        events_until_end(session, stack.url, job, at_step(stack, job, "denoise", 15, drain, drained)), 120)
    assert drained and seen[-1]["type"] == "succeeded", seen[-1]
    worker, step = drained[0]
    again = started(seen, "denoise")[-1]
    assert worker == group.id and again["worker"] != worker
    assert step <= again["resumed_from_step"] <= step + 10, (drained, again)  # the next boundary or so
    retry = [e["data"] for e in seen if e["type"] == "stage_retry" and e["data"]["stage"] == "denoise"]
    assert "handed denoise off" in retry[0]["reason"], retry
    assert not alive(follower) and not alive(group.process.pid)
    assert np.array_equal(await frames_of(stack, session, job, tmp), reference)


def handle_of_group(groups: LocalLauncher, worker: str):
    return next(h for h in groups.workers() if h.id == worker)


async def test_the_node_manager_re_forms_denoise_into_a_group_and_the_video_is_the_same(wan):
    """The node manager, not the test, starts the group: a width-2 change launches `onepiece worker
    --sp 2` on two of its GPU slots (CPU slots here, no GPU: the accounting is the one on CUDA)
    and drains the stage's width-1 worker once the group has registered."""
    stack, session, reference, tmp, groups = wan
    for launcher in (stack.launcher, groups):
        for handle in [h for h in launcher.workers() if h.stage == "denoise"]:
            assert await launcher.drain(handle, timeout=30) == 0
    manager = stack.manager
    manager.scale("denoise", 1, "test: a width-1 worker")
    (old,) = await until(lambda: [w["id"] for w in stack.broker.stages()["denoise"]["workers"]
                                  if not w["draining"]], 120, "a width-1 denoise worker")
    used = manager.slots()["gpu"]["used"]
    manager.scale("denoise", 1, "test: re-form to a group of 2", width=2)

    def reformed():
        live = [w for w in stack.broker.stages()["denoise"]["workers"] if not w["draining"]]
        a = manager.allocation()["denoise"]
        return live if (len(live) == 1 and live[0]["id"] != old and a["draining"] == 0
                        and old in manager.exits()) else None

    (group,) = await until(reformed, 120, "the group to register and the width-1 worker to leave")
    assert group["info"]["sp"] == 2 and all(alive(pid) for pid in group["info"]["ranks"])
    a = manager.allocation()["denoise"]
    assert (a["workers"], a["width"], a["slots"]) == (1, 2, 2)
    assert manager.slots()["gpu"]["used"] == used + 1  # the group's two slots for the worker's one
    assert manager.exits()[old]["how"] == "drained" and manager.exits()[old]["code"] == 0
    job = await client.submit(session, stack.url, SAMPLE.read_bytes(), **JOB)
    seen = await asyncio.wait_for(events_until_end(session, stack.url, job), 120)
    assert seen[-1]["type"] == "succeeded", seen[-1]
    assert [s["worker"] for s in started(seen, "denoise")] == [group["id"]]
    assert np.array_equal(await frames_of(stack, session, job, tmp), reference)
