"""Step-boundary state in the scheduling core (broker/core.py, invariant 11): checkpoints,
resumes and handoffs, driven back to back with a fake clock.

The bytes of a checkpoint never pass through the core: it only learns (holder, step)
from CHECKPOINT, names the holder in the TASK (``checkpoint_to``) and asks it, in the
SEND of a re-bound task's inputs, to ship the state along (``resume_step``).
"""

from __future__ import annotations

import pytest

from broker.core import Core, JobEvent, Stale, ToWorker
from broker.errors import CoreError
from stages.workflow import load_workflow

from .test_core import finish, job_events, sends, wan_core

WAN22 = load_workflow("wan22_i2v")


def tasks(cmds, stage=None):
    return [c for c in cmds if isinstance(c, ToWorker) and c.kind == "TASK" and stage in (None, c.body["stage"])]


def to_denoise(core, job="j1", now=1.0):
    """Run the three encoders of a wan_i2v job; returns the commands that bound denoise."""
    core.submit(job, "wan_i2v", {}, None, 0.0)
    out = []
    for stage, wid in (("text_encode", "te1"), ("image_encode", "ie1"), ("vae_encode", "ve1")):
        out += finish(core, wid, job, stage, now)
    return out


def test_a_step_wise_task_is_told_where_to_leave_checkpoints():
    core = wan_core()
    cmds = to_denoise(core)
    (task,) = tasks(cmds, "denoise")
    # late binding: denoise is bound when text_encode finishes; its holder keeps checkpoints
    assert task.body["checkpoint_to"] == {"worker": "te1", "stage": "text_encode", "descriptor": {"addr": "te1"}}
    assert "resume_step" not in task.body
    # a stage without steps gets no checkpoint_to
    core.started("dn1", "j1", "denoise", 2.0)
    done = finish(core, "dn1", "j1", "denoise", 3.0)
    (decode,) = tasks(done, "vae_decode")
    assert "checkpoint_to" not in decode.body


def test_a_rerun_after_a_death_resumes_from_the_last_checkpoint():
    core = wan_core()
    to_denoise(core)
    core.started("dn1", "j1", "denoise", 2.0)
    assert core.checkpointed("dn1", "j1", "denoise", 10, "te1", 3.0) == []
    assert core.checkpointed("dn1", "j1", "denoise", 20, "te1", 4.0) == []
    cmds = core.lost("dn1", "killed", 5.0)
    (task,) = tasks(cmds, "denoise")
    assert task.worker_id == "dn2" and task.body["resume_step"] == 20
    resumed = {s.worker_id: s.body.get("resume_step") for s in sends(cmds)}
    # only the holder of the checkpoint ships it; the other holders send their outputs only
    assert resumed == {"te1": 20, "ie1": None, "ve1": None}
    assigned = job_events(cmds, "stage_assigned")
    assert assigned[-1].data["resume_from_step"] == 20
    started = core.started("dn2", "j1", "denoise", 6.0, resumed_from_step=20)
    assert job_events(started, "stage_started")[0].data["resumed_from_step"] == 20
    core.check_invariants()


def test_a_checkpoint_whose_holder_is_lost_is_forgotten():
    core = wan_core()
    to_denoise(core)
    core.started("dn1", "j1", "denoise", 2.0)
    core.checkpointed("dn1", "j1", "denoise", 12, "te1", 3.0)
    core.lost("te1", "killed", 4.0)  # denoise is running: nothing is re-made yet
    cmds = core.lost("dn1", "killed", 5.0)  # now it must re-run, and text_encode with it
    (task,) = tasks(cmds, "denoise")
    assert "resume_step" not in task.body  # the state went with te1: it starts over
    assert task.body["checkpoint_to"]["worker"] == "ie1"  # the first holder still there keeps the next ones
    (retext,) = tasks(cmds, "text_encode")
    remade = finish(core, retext.worker_id, "j1", "text_encode", 6.0)
    assert all("resume_step" not in s.body for s in sends(cmds) + sends(remade))
    core.check_invariants()


def test_checkpoints_from_strangers_or_for_no_input_are_stale():
    core = wan_core()
    to_denoise(core)
    core.started("dn1", "j1", "denoise", 2.0)
    (stale,) = core.checkpointed("dn2", "j1", "denoise", 5, "te1", 3.0)
    assert isinstance(stale, Stale)
    (stale,) = core.checkpointed("dn1", "j1", "denoise", 5, "vd1", 3.0)  # holds nothing denoise reads
    assert isinstance(stale, Stale) and "holds no input" in stale.reason
    cmds = core.lost("dn1", "killed", 4.0)
    assert "resume_step" not in tasks(cmds, "denoise")[0].body


def test_a_handoff_requeues_without_spending_an_attempt():
    core = wan_core()
    to_denoise(core)
    core.started("dn1", "j1", "denoise", 2.0)
    core.drain("dn1", 2.5)
    core.checkpointed("dn1", "j1", "denoise", 7, "te1", 3.0)
    cmds = core.handoff("dn1", "j1", "denoise", 7, 3.1)
    (task,) = tasks(cmds, "denoise")
    assert task.worker_id == "dn2" and task.body["attempt"] == 1 and task.body["resume_step"] == 7
    assert [e.data["reason"] for e in job_events(cmds, "stage_retry")][0].startswith("worker dn1 is draining")
    assert core.job("j1")["stages"]["denoise"]["attempt"] == 1
    core.check_invariants()


def test_a_handoff_without_a_state_starts_over_elsewhere():
    core = wan_core()
    to_denoise(core)
    core.started("dn1", "j1", "denoise", 2.0)
    core.drain("dn1", 2.5)
    cmds = core.handoff("dn1", "j1", "denoise", 0, 3.0)
    (task,) = tasks(cmds, "denoise")
    assert task.worker_id == "dn2" and "resume_step" not in task.body


def test_a_handoff_from_a_worker_that_does_not_run_the_task_is_stale():
    core = wan_core()
    to_denoise(core)
    (stale,) = core.handoff("dn2", "j1", "denoise", 3, 3.0)
    assert isinstance(stale, Stale)


def test_the_expert_split_hands_state_along_the_dag():
    """Wan2.2: denoise_high's outputs (its state) are denoise_low's input; denoise_low's own
    checkpoints go to the holder of its first upstream, denoise_high's worker."""
    core = Core({"wan22_i2v": WAN22}, heartbeat_liveness_s=100.0)
    for stage in WAN22.stages:
        for i in (1, 2):
            core.register(f"{stage}{i}", stage, 1, {"id": f"{stage}{i}"}, 0.0)
    core.submit("j", "wan22_i2v", {}, None, 0.0)
    finish(core, "text_encode1", "j", "text_encode", 1.0)
    finish(core, "vae_encode1", "j", "vae_encode", 1.0)
    cmds = finish(core, "denoise_high1", "j", "denoise_high", 2.0)
    (low,) = tasks(cmds, "denoise_low")
    assert low.body["checkpoint_to"]["worker"] == "denoise_high1"
    assert {i["stage"] for i in low.body["inputs"]} == {"denoise_high", "text_encode", "vae_encode"}
    assert {s.worker_id for s in sends(cmds)} == {"denoise_high1", "text_encode1", "vae_encode1"}
    core.started("denoise_low1", "j", "denoise_low", 2.5)
    core.checkpointed("denoise_low1", "j", "denoise_low", 30, "denoise_high1", 3.0)
    cmds = core.lost("denoise_low1", "killed", 4.0)
    (low,) = tasks(cmds, "denoise_low")
    assert low.worker_id == "denoise_low2" and low.body["resume_step"] == 30
    core.check_invariants()


def test_a_worker_that_runs_another_model_is_refused():
    core = Core({"wan22_i2v": WAN22})
    with pytest.raises(CoreError, match="runs model 'wan2.2-i2v-a14b-high', not 'wan2.2-i2v-a14b-low'"):
        core.register("w", "denoise_high", 1, {}, 0.0, kind="denoise", model="wan2.2-i2v-a14b-low")
    with pytest.raises(CoreError, match="runs kind 'denoise', not 'vae_decode'"):
        core.register("w", "denoise_high", 1, {}, 0.0, kind="vae_decode", model="wan2.2-i2v-a14b-high")
    assert core.register("w", "denoise_high", 1, {}, 0.0, kind="denoise", model="wan2.2-i2v-a14b-high") == []


def test_one_text_encoder_serves_every_workflow_that_shares_it():
    wfs = {n: load_workflow(n) for n in ("wan_i2v", "wan_t2v", "wan22_i2v")}
    core = Core(wfs, heartbeat_liveness_s=100.0)
    core.register("te", "text_encode", 3, {}, 0.0, kind="text_encode", model="umt5-xxl")
    out = []
    for i, wf in enumerate(wfs):
        out += core.submit(f"j{i}", wf, {}, None, 0.0)
    bound = {(c.body["workflow"], c.worker_id) for c in tasks(out, "text_encode")}
    assert bound == {("wan_i2v", "te"), ("wan_t2v", "te"), ("wan22_i2v", "te")}
    assert not any(isinstance(c, JobEvent) and c.type == "failed" for c in out)
