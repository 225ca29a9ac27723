"""The worker's side of step-boundary state (broker/core.py, invariant 11; stages/worker.py):
as a holder it keeps other tasks' checkpoints only for jobs whose outputs it holds, within
``checkpoint_bytes``, ships one with its outputs when a SEND asks, and drops them with those
outputs; as a consumer it resumes only from a checkpoint its stage accepts, and says so.

Real ``stages.worker.Worker`` objects with synthetic stages (a step-wise stage's state is its
step count) and real shm endpoints; a raw ZeroMQ ROUTER plays the broker.
"""

from __future__ import annotations

import pytest
import torch

from broker import protocol
from stages.workflow import loads_workflow

from ..helpers import chain3
from .test_worker_dataplane import (  # noqa: F401 - fixtures
    endpoints,
    fake_broker,
    new_job,
    shm_is_left_clean,
    start_worker,
    until,
    workers,
)

pytestmark = pytest.mark.timeout(120)

STEPS = 4


def stepped():
    """a -> b -> c where b is step-wise (STEPS progress steps)."""
    text = chain3("wd", 0.2).replace('after = ["a"]\noutputs = ["y"]', 'after = ["a"]\noutputs = ["y"]\nprogress = true')
    wf = loads_workflow(text)
    assert wf.stages["b"].progress
    return wf


def task(job: str, stage: str, inputs: list[str], **extra) -> bytes:
    return protocol.pack("TASK", job=job, workflow="wd", stage=stage, attempt=1, params={"steps": STEPS},
                         inputs=[{"stage": up, "names": ["x"]} for up in inputs], **extra)


def state(step: int) -> dict[str, torch.Tensor]:
    return {"state.step": torch.tensor(step, dtype=torch.int64)}


def resume(step: int, claimed: int | None = None) -> dict[str, torch.Tensor]:
    """What a holder ships: the state as ``resume.*`` and the step it says it is of."""
    return {"x": torch.ones(8), "resume.state.step": torch.tensor(step, dtype=torch.int64),
            "resume.step": torch.tensor(step if claimed is None else claimed, dtype=torch.int64)}


@pytest.mark.parametrize("step, expected", [(2, 2), (999, None), (0, None)],
                         ids=["usable", "a step past the schedule", "step zero"])
async def test_a_consumer_resumes_only_from_a_checkpoint_its_stage_accepts(
        tmp_path, workers, fake_broker, endpoints, step, expected):
    b = await start_worker(workers, fake_broker, tmp_path, "b", wf=stepped())
    job = new_job()
    await fake_broker.tell(task(job, "b", ["a"]))
    sender = await (await endpoints()).connect(b.transport.descriptor)
    await sender.send({"job": job, "stage": "b", "from": "a"}, resume(step))
    await until(lambda: fake_broker.of("DONE", job), "b's DONE")
    (started,) = fake_broker.of("STARTED", job)
    assert started.get("resumed_from_step") == expected
    steps = [m["step"] for m in fake_broker.of("PROGRESS", job)]
    assert steps == list(range((expected or 0) + 1, STEPS + 1))
    await sender.aclose()


async def test_a_holder_keeps_checkpoints_for_jobs_it_holds_and_ships_one_with_its_outputs(
        tmp_path, workers, fake_broker, endpoints):
    a = await start_worker(workers, fake_broker, tmp_path, "a", wf=stepped(), checkpoint_bytes=1 << 20)
    job, stranger = new_job(), new_job()
    await fake_broker.tell(task(job, "a", []))
    await until(lambda: (job, "a") in a.held, "a's outputs held")
    peer = await endpoints()
    to_a = await peer.connect(a.transport.descriptor)
    # a checkpoint of b's task for a job whose outputs a holds is kept; the newest wins
    for step in (2, 3, 1):
        await to_a.send({"job": job, "stage": "a", "from": "b", "checkpoint": step}, state(step))
    # one for a job a holds nothing of is dropped (a stranger cannot park data here)
    before = a.orphans_dropped
    await to_a.send({"job": stranger, "stage": "a", "from": "b", "checkpoint": 5}, state(5))
    await until(lambda: a.orphans_dropped == before + 2, "the stale and the stranger's checkpoints dropped")
    assert list(a.checkpoints) == [(job, "b")] and a.checkpoints[(job, "b")].step == 3
    # a SEND to b's next worker ships the outputs and the checkpoint together
    await fake_broker.tell(protocol.pack("SEND", job=job, stage="a", to="p", to_stage="b",
                                         descriptor=peer.descriptor, names=["x"], resume_step=3))
    msg = await peer.recv(timeout=10)
    assert msg.header["from"] == "a" and msg.header["stage"] == "b"
    assert int(msg.tensors["resume.step"]) == 3 and int(msg.tensors["resume.state.step"]) == 3
    assert "x" in msg.tensors
    msg.release()
    # RELEASE of a's outputs drops the checkpoints that came with them
    await fake_broker.tell(protocol.pack("RELEASE", job=job, stage="a"))
    await until(lambda: not a.checkpoints and not a.held, "the release")
    assert a._checkpoint_bytes == 0
    await to_a.aclose()


async def test_checkpoints_are_kept_within_checkpoint_bytes_oldest_dropped_first(
        tmp_path, workers, fake_broker, endpoints):
    a = await start_worker(workers, fake_broker, tmp_path, "a", wf=stepped(), checkpoint_bytes=3000)
    jobs = [new_job() for _ in range(3)]
    for job in jobs:
        await fake_broker.tell(task(job, "a", []))
    await until(lambda: all((job, "a") in a.held for job in jobs), "a's outputs held")
    to_a = await (await endpoints()).connect(a.transport.descriptor)
    big = {"state.step": torch.tensor(1), "state.latents": torch.zeros(250)}  # 1,008 bytes
    for job in jobs:
        await to_a.send({"job": job, "stage": "a", "from": "b", "checkpoint": 1}, big)
    await until(lambda: (jobs[2], "b") in a.checkpoints, "the newest checkpoint")
    assert list(a.checkpoints) == [(jobs[1], "b"), (jobs[2], "b")]  # the oldest went first
    assert a._checkpoint_bytes <= 3000
    await to_a.aclose()
