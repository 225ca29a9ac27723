"""The scheduling core, driven back to back with a fake clock: no processes, no sleeps."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core import (
    JOB_TRANSITIONS,
    TASK_TRANSITIONS,
    Core,
    JobEvent,
    Stale,
    ToWorker,
)
from broker.errors import CoreError, IllegalTransition, UnknownJob, UnknownWorker
from stages.workflow import load_workflow, workflow_from_dict

WAN = load_workflow("wan_i2v")
ENCODERS = ("text_encode", "image_encode", "vae_encode")
WAN_STAGES = tuple(WAN.stages)
SHORT = {
    "text_encode": "te", "image_encode": "ie", "vae_encode": "ve",
    "denoise": "dn", "vae_decode": "vd", "video_encode": "vv",
}


def brief(cmds):
    """Commands as tuples that read well in an assertion."""
    out = []
    for c in cmds:
        if isinstance(c, ToWorker):
            b = c.body
            if c.kind == "SEND":
                out.append(("SEND", c.worker_id, b["job"], b["stage"], b["to"]))
            elif c.kind == "DRAIN":
                out.append(("DRAIN", c.worker_id))
            else:
                out.append((c.kind, c.worker_id, b["job"], b["stage"]))
        elif isinstance(c, JobEvent):
            out.append((c.type, c.job_id, c.data.get("stage")))
        else:
            out.append(("stale", c.reason))
    return out


def sends(cmds):
    return [c for c in cmds if isinstance(c, ToWorker) and c.kind == "SEND"]


def job_events(cmds, type_):
    return [c for c in cmds if isinstance(c, JobEvent) and c.type == type_]


def wan_core(per_stage=2, capacity=1, **kw):
    # a silent worker is never chosen, so tests that do not send heartbeats use
    # a long liveness; the expiry tests ask for the default 7.5 s
    kw.setdefault("heartbeat_liveness_s", 100.0)
    core = Core({"wan_i2v": WAN}, **kw)
    for stage in WAN_STAGES:
        for i in range(1, per_stage + 1):
            wid = f"{SHORT[stage]}{i}"
            assert core.register(wid, stage, capacity, {"addr": wid}, 0.0) == []
    return core


def finish(core, wid, job, stage, now, **kw):
    """STARTED then DONE from a worker; returns the commands of the DONE."""
    core.started(wid, job, stage, now)
    return core.done(wid, job, stage, now + 0.5, **kw)


# -- the happy path -----------------------------------------------------------------


def test_full_wan_job_two_workers_per_stage():
    core = wan_core()
    cmds = core.submit("j1", "wan_i2v", {"prompt": "a cat"}, {"image": b"png"}, 1.0)
    assert brief(cmds) == [
        ("queued", "j1", None),
        ("TASK", "te1", "j1", "text_encode"), ("stage_assigned", "j1", "text_encode"),
        ("TASK", "ie1", "j1", "image_encode"), ("stage_assigned", "j1", "image_encode"),
        ("TASK", "ve1", "j1", "vae_encode"), ("stage_assigned", "j1", "vae_encode"),
    ]
    task = cmds[1].body
    assert isinstance(task.pop("binding"), int)
    assert task == {
        "job": "j1", "workflow": "wan_i2v", "stage": "text_encode", "attempt": 1,
        "params": {"prompt": "a cat"}, "inputs": [], "payload": {"image": b"png"},
    }
    # a second job goes to the other (least-loaded) worker of each stage
    cmds = core.submit("j2", "wan_i2v", {"prompt": "a dog"}, None, 1.1)
    assert [c.worker_id for c in cmds if isinstance(c, ToWorker)] == ["te2", "ie2", "ve2"]
    assert "payload" not in cmds[1].body

    assert brief(core.started("te1", "j1", "text_encode", 2.0)) == [("stage_started", "j1", "text_encode")]
    cmds = core.done("te1", "j1", "text_encode", 3.0, timings={"run_s": 1.0})
    assert brief(cmds) == [
        ("stage_finished", "j1", "text_encode"),
        ("TASK", "dn1", "j1", "denoise"), ("stage_assigned", "j1", "denoise"),
        ("SEND", "te1", "j1", "text_encode", "dn1"),
    ]
    assert cmds[1].body["inputs"] == [
        {"stage": "text_encode", "names": ["prompt_embeds", "negative_prompt_embeds"]},
        {"stage": "image_encode", "names": ["image_embeds"]},
        {"stage": "vae_encode", "names": ["condition"]},
    ]
    assert sends(cmds)[0].body == {
        "job": "j1", "stage": "text_encode", "to": "dn1", "to_stage": "denoise",
        "descriptor": {"addr": "dn1"}, "names": ["prompt_embeds", "negative_prompt_embeds"],
        "binding": cmds[1].body["binding"],  # the consumer's: the data it sends carries it
    }
    assert brief(finish(core, "ie1", "j1", "image_encode", 3.0)) == [
        ("stage_finished", "j1", "image_encode"), ("SEND", "ie1", "j1", "image_encode", "dn1"),
    ]
    # j2's first encoder binds j2's denoise to the other, idle denoise worker
    cmds = finish(core, "ie2", "j2", "image_encode", 3.2)
    assert ("SEND", "ie2", "j2", "image_encode", "dn2") in brief(cmds)
    assert brief(finish(core, "ve1", "j1", "vae_encode", 4.0)) == [
        ("stage_finished", "j1", "vae_encode"), ("SEND", "ve1", "j1", "vae_encode", "dn1"),
    ]

    core.started("dn1", "j1", "denoise", 5.0)
    assert brief(core.progress("dn1", "j1", "denoise", 10, 40, 6.0)) == [("progress", "j1", "denoise")]
    assert brief(core.done("dn1", "j1", "denoise", 9.0)) == [
        ("stage_finished", "j1", "denoise"),
        ("RELEASE", "te1", "j1", "text_encode"),
        ("RELEASE", "ie1", "j1", "image_encode"),
        ("RELEASE", "ve1", "j1", "vae_encode"),
        ("TASK", "vd1", "j1", "vae_decode"), ("stage_assigned", "j1", "vae_decode"),
        ("SEND", "dn1", "j1", "denoise", "vd1"),
    ]
    assert brief(finish(core, "vd1", "j1", "vae_decode", 10.0)) == [
        ("stage_finished", "j1", "vae_decode"),
        ("RELEASE", "dn1", "j1", "denoise"),
        ("TASK", "vv1", "j1", "video_encode"), ("stage_assigned", "j1", "video_encode"),
        ("SEND", "vd1", "j1", "vae_decode", "vv1"),
    ]
    cmds = finish(core, "vv1", "j1", "video_encode", 11.0, result={"path": "/out/j1.mp4"})
    assert brief(cmds) == [
        ("stage_finished", "j1", "video_encode"),
        ("RELEASE", "vd1", "j1", "vae_decode"),
        ("succeeded", "j1", None),
    ]
    assert cmds[-1].data == {"result": {"path": "/out/j1.mp4"}}
    # the same DONE again, late, is ignored: the result is delivered once
    again = core.done("vv1", "j1", "video_encode", 12.0, result={"path": "other"})
    assert again == [Stale("DONE", "vv1", "j1", "video_encode", "job succeeded")]

    view = core.job("j1")
    assert view["state"] == "succeeded" and view["result"] == {"path": "/out/j1.mp4"}
    assert view["finished"] == 11.5 and view["reason"] is None
    te = view["stages"]["text_encode"]
    assert (te["state"], te["worker"], te["attempt"], te["started"], te["finished"]) == (
        "done", "te1", 1, 2.0, 3.0,
    )
    assert te["timings"] == {"run_s": 1.0}
    assert core.active_jobs() == ["j2"]
    assert all(w["holding"] == 0 for s in core.stages().values() for w in s["workers"] if w["id"][-1] == "1")
    core.check_invariants()


def test_fan_in_with_no_room_defers_sends_until_bound():
    core = Core({"wan_i2v": WAN})
    for stage in WAN_STAGES:
        core.register(SHORT[stage] + "1", stage, 2 if stage in ENCODERS else 1, {}, 0.0)
    core.submit("j1", "wan_i2v", {}, None, 1.0)
    core.submit("j2", "wan_i2v", {}, None, 1.0)
    for enc in ENCODERS:
        finish(core, SHORT[enc] + "1", "j1", enc, 2.0)
    # denoise (capacity 1) is busy with j1: j2's encoders finish but nothing is sent
    for enc in ENCODERS:
        cmds = finish(core, SHORT[enc] + "1", "j2", enc, 3.0)
        assert sends(cmds) == [] and brief(cmds) == [("stage_finished", "j2", enc)]
    assert core.stages()["denoise"]["queued"] == 1
    assert core.job("j2")["stages"]["denoise"]["state"] == "queued"
    cmds = finish(core, "dn1", "j1", "denoise", 4.0)
    assert brief(cmds) == [
        ("stage_finished", "j1", "denoise"),
        ("RELEASE", "te1", "j1", "text_encode"),
        ("RELEASE", "ie1", "j1", "image_encode"),
        ("RELEASE", "ve1", "j1", "vae_encode"),
        ("TASK", "dn1", "j2", "denoise"), ("stage_assigned", "j2", "denoise"),
        ("SEND", "te1", "j2", "text_encode", "dn1"),
        ("SEND", "ie1", "j2", "image_encode", "dn1"),
        ("SEND", "ve1", "j2", "vae_encode", "dn1"),
        ("TASK", "vd1", "j1", "vae_decode"), ("stage_assigned", "j1", "vae_decode"),
        ("SEND", "dn1", "j1", "denoise", "vd1"),
    ]
    core.check_invariants()


# -- failures -----------------------------------------------------------------------


def beat_all_but(core, dead, now):
    for s in core.stages().values():
        for w in s["workers"]:
            if w["id"] not in dead:
                core.heartbeat(w["id"], now)


def test_consumer_expires_mid_denoise_then_retries_with_fresh_sends():
    core = wan_core(heartbeat_liveness_s=7.5)
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    for enc in ENCODERS:
        finish(core, SHORT[enc] + "1", "j1", enc, 1.0)
    core.started("dn1", "j1", "denoise", 2.0)
    beat_all_but(core, {"dn1"}, 9.6)
    assert brief(core.expire(9.0)) == []  # 7.0 s of silence is within liveness
    cmds = core.expire(9.6)
    assert brief(cmds) == [
        ("stage_retry", "j1", "denoise"),
        ("TASK", "dn2", "j1", "denoise"), ("stage_assigned", "j1", "denoise"),
        ("SEND", "te1", "j1", "text_encode", "dn2"),
        ("SEND", "ie1", "j1", "image_encode", "dn2"),
        ("SEND", "ve1", "j1", "vae_encode", "dn2"),
    ]
    assert cmds[0].data == {
        "stage": "denoise", "attempt": 2, "reason": "worker dn1 lost (no heartbeat for 7.6 s)",
    }
    assert cmds[1].body["attempt"] == 2
    assert "dn1" not in [w["id"] for w in core.stages()["denoise"]["workers"]]
    # the dead worker's heartbeat is refused, its late DONE is stale
    with pytest.raises(UnknownWorker):
        core.heartbeat("dn1", 10.0)
    assert brief(core.done("dn1", "j1", "denoise", 10.0)) == [("stale", "unknown worker")]
    cmds = finish(core, "dn2", "j1", "denoise", 11.0)
    assert [b for b in brief(cmds) if b[0] == "RELEASE"] == [
        ("RELEASE", "te1", "j1", "text_encode"),
        ("RELEASE", "ie1", "j1", "image_encode"),
        ("RELEASE", "ve1", "j1", "vae_encode"),
    ]
    finish(core, "vd1", "j1", "vae_decode", 12.0)
    cmds = finish(core, "vv1", "j1", "video_encode", 13.0)
    assert len(job_events(cmds, "succeeded")) == 1
    assert core.job("j1")["stages"]["denoise"]["attempt"] == 2
    core.check_invariants()


def test_producer_lost_while_holding_reruns_upstream():
    core = wan_core()
    core.submit("j1", "wan_i2v", {"prompt": "p"}, {"image": b"x"}, 0.0)
    finish(core, "te1", "j1", "text_encode", 1.0)  # binds dn1, te1 sends and holds
    assert core.stages()["text_encode"]["workers"][0]["holding"] == 1
    cmds = core.register("te1", "text_encode", 1, {"addr": "te1-new"}, 2.0)  # restarted
    # the re-run goes to another worker where one has room
    assert brief(cmds) == [
        ("stage_retry", "j1", "text_encode"),
        ("TASK", "te2", "j1", "text_encode"), ("stage_assigned", "j1", "text_encode"),
    ]
    assert cmds[0].data["reason"] == (
        "worker te1 re-registered (previous incarnation lost); it held the outputs of text_encode"
    )
    # re-making outputs a lost holder had spends no attempt: the task itself did not fail
    assert cmds[1].body["attempt"] == 1 and cmds[1].body["payload"] == {"image": b"x"}
    # the consumer keeps its binding; the re-run sends to it when it finishes
    assert core.job("j1")["stages"]["denoise"] == {
        **core.job("j1")["stages"]["denoise"], "state": "assigned", "worker": "dn1", "attempt": 1,
    }
    cmds = finish(core, "te2", "j1", "text_encode", 3.0)
    assert brief(cmds) == [
        ("stage_finished", "j1", "text_encode"), ("SEND", "te2", "j1", "text_encode", "dn1"),
    ]
    finish(core, "ie1", "j1", "image_encode", 3.0)
    finish(core, "ve1", "j1", "vae_encode", 3.0)
    cmds = finish(core, "dn1", "j1", "denoise", 4.0)
    assert ("RELEASE", "te2", "j1", "text_encode") in brief(cmds)
    finish(core, "vd1", "j1", "vae_decode", 5.0)
    assert job_events(finish(core, "vv1", "j1", "video_encode", 6.0), "succeeded")
    core.check_invariants()


def test_rerun_is_dropped_when_the_consumer_finishes_first():
    """The consumer may already have had the lost producer's data: if it finishes,
    the re-run is cancelled instead of wasting a GPU."""
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    for enc in ENCODERS:
        finish(core, SHORT[enc] + "1", "j1", enc, 1.0)
    core.drain("te2", 1.5)  # so the re-run below finds no free worker and waits
    cmds = core.disconnect("te1", 2.0)
    assert brief(cmds) == [("stage_retry", "j1", "text_encode")]  # nobody free: queued
    assert cmds[0].data["attempt"] == 1  # a graceful leave counts no attempt
    cmds = finish(core, "dn1", "j1", "denoise", 3.0)
    assert ("RELEASE", "ie1", "j1", "image_encode") in brief(cmds)
    assert core.job("j1")["stages"]["text_encode"]["state"] == "done"
    assert core.stages()["text_encode"]["queued"] == 0
    # and when it was already bound, it gets a CANCEL
    core.submit("j2", "wan_i2v", {}, None, 4.0)
    core.register("te3", "text_encode", 1, {}, 4.0)
    for enc in ENCODERS:
        w = "te3" if enc == "text_encode" else SHORT[enc] + "1"
        finish(core, w, "j2", enc, 5.0)
    core.register("te4", "text_encode", 1, {}, 5.0)
    cmds = core.disconnect("te3", 6.0)
    assert brief(cmds)[1] == ("TASK", "te4", "j2", "text_encode")
    denoiser = core.job("j2")["stages"]["denoise"]["worker"]
    cmds = finish(core, denoiser, "j2", "denoise", 7.0)
    assert ("CANCEL", "te4", "j2", "text_encode") in brief(cmds)
    assert core.stages()["text_encode"]["workers"][-1]["load"] == 0
    core.check_invariants()


def test_retry_limit_fails_job_with_readable_reason():
    core = wan_core(per_stage=1, max_attempts=3, heartbeat_liveness_s=7.5)
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    for enc in ENCODERS:
        finish(core, SHORT[enc] + "1", "j1", enc, 1.0)
    now = 2.0
    for attempt in (1, 2):
        core.started("dn1", "j1", "denoise", now)
        cmds = core.failed("dn1", "j1", "denoise", "CUDA out of memory", True, now + 1)
        assert brief(cmds)[:2] == [("stage_retry", "j1", "denoise"), ("TASK", "dn1", "j1", "denoise")]
        assert cmds[1].body["attempt"] == attempt + 1
        assert len(sends(cmds)) == 3  # the holders send again to the re-bound worker
        now += 2
    # the third attempt is lost to a dead worker: that is the last one
    core.started("dn1", "j1", "denoise", now)
    beat_all_but(core, {"dn1"}, now + 8)
    cmds = core.expire(now + 8)
    assert brief(cmds) == [
        ("RELEASE", "te1", "j1", "text_encode"),
        ("RELEASE", "ie1", "j1", "image_encode"),
        ("RELEASE", "ve1", "j1", "vae_encode"),
        ("failed", "j1", "denoise"),
    ]
    reason = "stage denoise failed after 3 attempts: worker dn1 lost (no heartbeat for 8.0 s)"
    assert cmds[-1].data == {"reason": reason, "stage": "denoise"}
    view = core.job("j1")
    assert view["state"] == "failed" and view["reason"] == reason
    assert view["stages"]["denoise"]["state"] == "failed"
    assert view["stages"]["vae_decode"]["state"] == "cancelled"
    assert core.active_jobs() == []
    core.check_invariants()


def test_non_retryable_failure_fails_at_once_and_cleans_up_siblings():
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    finish(core, "ve1", "j1", "vae_encode", 1.0)  # binds dn1 and holds
    core.started("te1", "j1", "text_encode", 1.0)
    cmds = core.failed("ie1", "j1", "image_encode", "image is not decodable", False, 2.0)
    assert brief(cmds) == [
        ("CANCEL", "te1", "j1", "text_encode"),
        ("RELEASE", "ve1", "j1", "vae_encode"),
        ("CANCEL", "dn1", "j1", "denoise"),
        ("failed", "j1", "image_encode"),
    ]
    assert cmds[-1].data["reason"] == "stage image_encode failed on worker ie1: image is not decodable"
    assert all(w["load"] == 0 and w["holding"] == 0 for s in core.stages().values() for w in s["workers"])
    # everything the workers say about it afterwards is stale
    assert brief(core.done("te1", "j1", "text_encode", 3.0)) == [("stale", "job failed")]
    core.check_invariants()


def test_failed_delivery_of_held_outputs_reruns_producer():
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    finish(core, "te1", "j1", "text_encode", 1.0)
    cmds = core.failed("te1", "j1", "text_encode", "connection refused", True, 2.0)
    assert brief(cmds)[:3] == [
        ("RELEASE", "te1", "j1", "text_encode"),
        ("stage_retry", "j1", "text_encode"),
        ("TASK", "te2", "j1", "text_encode"),  # not the worker that failed to deliver
    ]
    core.check_invariants()


# -- cancellation and stale messages -----------------------------------------------------


def test_cancel_while_queued():
    core = Core({"wan_i2v": WAN})
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    assert core.stages()["text_encode"]["queued"] == 1
    cmds = core.cancel("j1", 1.0)
    assert brief(cmds) == [("cancelled", "j1", None)]
    assert cmds[0].data == {"reason": "cancelled by client"}
    assert core.stages()["text_encode"]["queued"] == 0
    assert core.register("te1", "text_encode", 1, {}, 2.0) == []  # nothing left to bind
    assert core.cancel("j1", 3.0) == []  # idempotent
    with pytest.raises(UnknownJob):
        core.cancel("nope", 3.0)
    assert core.job("j1")["stages"]["text_encode"]["state"] == "cancelled"
    core.check_invariants()


def test_cancel_while_running_then_late_done_is_stale():
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    finish(core, "te1", "j1", "text_encode", 1.0)
    finish(core, "ie1", "j1", "image_encode", 1.0)
    core.started("dn1", "j1", "denoise", 2.0)
    cmds = core.cancel("j1", 3.0, reason="user pressed stop")
    assert brief(cmds) == [
        ("RELEASE", "te1", "j1", "text_encode"),
        ("RELEASE", "ie1", "j1", "image_encode"),
        ("CANCEL", "ve1", "j1", "vae_encode"),
        ("CANCEL", "dn1", "j1", "denoise"),
        ("cancelled", "j1", None),
    ]
    assert cmds[-1].data == {"reason": "user pressed stop"}
    assert brief(core.done("dn1", "j1", "denoise", 4.0)) == [("stale", "job cancelled")]
    assert brief(core.started("ve1", "j1", "vae_encode", 4.0)) == [("stale", "job cancelled")]
    assert brief(core.progress("dn1", "j1", "denoise", 1, 2, 4.0)) == [("stale", "job cancelled")]
    assert core.job("j1")["state"] == "cancelled"
    core.check_invariants()


def test_duplicate_and_reassigned_done_are_stale():
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    cmds = finish(core, "te1", "j1", "text_encode", 1.0)
    assert brief(core.done("te1", "j1", "text_encode", 2.0)) == [("stale", "task is done on te1")]
    assert brief(core.started("te1", "j1", "text_encode", 2.0)) == [("stale", "task is done on te1")]
    # image_encode moves to ie2 after a retryable failure; ie1's late DONE is stale
    core.failed("ie1", "j1", "image_encode", "oops", True, 2.0)
    assert core.job("j1")["stages"]["image_encode"]["worker"] == "ie2"
    assert brief(core.done("ie1", "j1", "image_encode", 3.0)) == [("stale", "task is assigned on ie2")]
    assert brief(core.done("ie2", "nope", "image_encode", 3.0)) == [("stale", "unknown job")]
    assert brief(core.done("ie2", "j1", "nope", 3.0)) == [("stale", "no such stage in the job")]
    assert brief(core.started("ie2", "j1", "image_encode", 3.0)) == [("stage_started", "j1", "image_encode")]
    assert brief(core.started("ie2", "j1", "image_encode", 3.0)) == [("stale", "duplicate")]
    # a DONE without STARTED is accepted (service counted from assignment)
    assert len(job_events(core.done("ve1", "j1", "vae_encode", 4.0), "stage_finished")) == 1
    core.check_invariants()


# -- placement -------------------------------------------------------------------------


def test_drain_stops_new_bindings_but_lets_work_finish():
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    assert brief(core.drain("te1", 0.5)) == [("DRAIN", "te1")]
    assert core.drain("te1", 0.6) == []
    core.submit("j2", "wan_i2v", {}, None, 1.0)
    assert core.job("j2")["stages"]["text_encode"]["worker"] == "te2"
    core.submit("j3", "wan_i2v", {}, None, 1.0)
    assert core.job("j3")["stages"]["text_encode"]["state"] == "queued"  # te1 has room but drains
    cmds = finish(core, "te1", "j1", "text_encode", 2.0)  # in-flight work still completes
    assert job_events(cmds, "stage_finished")
    assert core.job("j3")["stages"]["text_encode"]["state"] == "queued"
    assert core.stages()["text_encode"]["workers"][0]["draining"] is True
    with pytest.raises(UnknownWorker):
        core.drain("ghost", 3.0)
    core.check_invariants()


def test_least_loaded_worker_wins_ties_go_to_first_registered():
    core = Core({"wan_i2v": WAN})
    core.register("a", "text_encode", 3, {}, 0.0)
    core.register("b", "text_encode", 3, {}, 0.0)
    placed = []
    for i in range(5):
        core.submit(f"j{i}", "wan_i2v", {}, None, 1.0)
        placed.append(core.job(f"j{i}")["stages"]["text_encode"]["worker"])
    assert placed == ["a", "b", "a", "b", "a"]
    core.done("a", "j0", "text_encode", 2.0)
    core.done("a", "j2", "text_encode", 2.0)  # a: 1, b: 2
    core.submit("j5", "wan_i2v", {}, None, 3.0)
    assert core.job("j5")["stages"]["text_encode"]["worker"] == "a"
    # a silent worker (not yet expired) is not chosen
    core.register("c", "text_encode", 3, {}, 3.0)
    core.heartbeat("a", 20.0)
    core.heartbeat("b", 20.0)
    core.submit("j6", "wan_i2v", {}, None, 20.0)
    assert core.job("j6")["stages"]["text_encode"]["worker"] == "a"


def test_fifo_across_jobs_when_capacity_frees():
    core = Core({"wan_i2v": WAN})
    for i in range(4):
        core.submit(f"j{i}", "wan_i2v", {}, None, float(i))
    cmds = core.register("te1", "text_encode", 1, {}, 10.0)
    assert [c.body["job"] for c in cmds if isinstance(c, ToWorker)] == ["j0"]
    order = ["j0"]
    for i in range(3):
        cmds = core.done("te1", order[-1], "text_encode", 11.0 + i)
        order += [c.body["job"] for c in cmds if isinstance(c, ToWorker) and c.kind == "TASK"]
    assert order == ["j0", "j1", "j2", "j3"]
    sig = core.stage_signals(20.0)["text_encode"]
    assert sig["arrivals"] == 4 and sig["completed"] == 3 and sig["queue_len"] == 0


def test_retried_task_keeps_its_place_ahead_of_younger_jobs():
    core = Core({"wan_i2v": WAN})
    core.register("te1", "text_encode", 1, {}, 0.0)
    for i in range(3):
        core.submit(f"j{i}", "wan_i2v", {}, None, 0.0)
    cmds = core.failed("te1", "j0", "text_encode", "transient", True, 1.0)
    assert [c.body["job"] for c in cmds if isinstance(c, ToWorker)] == ["j0"]


def test_disconnect():
    core = wan_core()
    assert core.disconnect("te2", 1.0) == []  # no tasks, nothing held: silent
    assert "te2" not in [w["id"] for w in core.stages()["text_encode"]["workers"]]
    assert brief(core.disconnect("te2", 1.0)) == [("stale", "unknown worker")]
    core.submit("j1", "wan_i2v", {}, None, 2.0)
    cmds = core.disconnect("te1", 3.0)  # assigned, not started: no attempt counted
    assert brief(cmds) == [("stage_retry", "j1", "text_encode")]
    assert cmds[0].data["attempt"] == 1
    core.register("te3", "text_encode", 1, {}, 4.0)
    core.started("te3", "j1", "text_encode", 4.0)
    cmds = core.disconnect("te3", 5.0)  # running: counts
    assert cmds[0].data["attempt"] == 2 and cmds[0].data["reason"] == "worker te3 disconnected"
    core.check_invariants()


def test_errors_for_bad_events():
    core = wan_core()
    with pytest.raises(UnknownWorker):
        core.heartbeat("ghost", 1.0)
    with pytest.raises(CoreError, match="unknown stage 'upscale'"):
        core.register("w", "upscale", 1, {}, 1.0)
    with pytest.raises(CoreError, match="capacity"):
        core.register("w", "denoise", 0, {}, 1.0)
    with pytest.raises(CoreError, match="unknown workflow 't2v'"):
        core.submit("j", "t2v", {}, None, 1.0)
    core.submit("j", "wan_i2v", {}, None, 1.0)
    with pytest.raises(CoreError, match="already exists"):
        core.submit("j", "wan_i2v", {}, None, 1.0)
    other = workflow_from_dict({
        "name": "x", "result": "denoise", "stages": {"denoise": {"kind": "something_else"}},
    })
    with pytest.raises(CoreError, match="stage 'denoise': its kind 'something_else' differs"):
        Core({"wan_i2v": WAN, "x": other})


def test_illegal_transition_raises():
    core = Core({"wan_i2v": WAN})
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    task = core._jobs["j1"].tasks["text_encode"]  # queued
    with pytest.raises(IllegalTransition, match="queued -> running"):
        core._set(task, "running")
    with pytest.raises(IllegalTransition, match="job j1: queued -> succeeded"):
        core._set_job(core._jobs["j1"], "succeeded")
    for table in (TASK_TRANSITIONS, JOB_TRANSITIONS):
        assert all(target in table for targets in table.values() for target in targets)
    for terminal in ("failed", "cancelled"):
        assert TASK_TRANSITIONS[terminal] == frozenset()


def test_introspection_shapes():
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    core.started("te1", "j1", "text_encode", 1.0)
    core.heartbeat("te1", 1.5, load=1)
    stages = core.stages()
    assert set(stages) == set(WAN_STAGES)
    te = stages["text_encode"]
    assert (te["queued"], te["busy"], te["running"]) == (0, 1, 1)
    assert te["workers"][0] == {
        "id": "te1", "load": 1, "capacity": 1, "draining": False, "last_seen": 1.5,
        "registered": 0.0, "holding": 0, "reported_load": 1, "info": {},
    }
    core.done("te1", "j1", "text_encode", 3.0)
    sig = core.stage_signals(4.0)
    assert sig["text_encode"] == {
        "arrivals": 1, "completed": 1, "retries": 0, "service_time_sum": 2.0, "queue_len": 0,
        "oldest_wait_s": 0.0, "busy": 0, "workers": 2, "draining": 0, "capacity": 2, "load": 0,
    }
    assert sig["denoise"]["arrivals"] == 1 and sig["denoise"]["busy"] == 1
    lonely = Core({"wan_i2v": WAN})
    lonely.submit("j", "wan_i2v", {}, None, 1.0)
    assert lonely.stage_signals(4.0)["image_encode"]["oldest_wait_s"] == 3.0
    assert core.job("missing") is None
    assert core.forget("j1") is False  # still active


# -- fan-out ---------------------------------------------------------------------------

FAN = workflow_from_dict({
    "name": "fan",
    "result": "r",
    "stages": {
        "x": {"outputs": ["o"]},
        "y": {"outputs": ["o"]},
        "z": {"after": ["x", "y"], "outputs": ["o"]},
        "v": {"after": ["x"], "outputs": ["o"]},
        "r": {"after": ["z", "v"]},
    },
})


def test_fan_out_producer_holds_until_every_consumer_is_done():
    core = Core({"fan": FAN})
    for s in FAN.stages:
        core.register(s + "1", s, 1, {}, 0.0)
    core.submit("j", "fan", {}, None, 0.0)
    cmds = core.done("x1", "j", "x", 1.0)
    assert FAN.downstream("x") == ["v", "z"]
    assert [b for b in brief(cmds) if b[0] == "SEND"] == [
        ("SEND", "x1", "j", "x", "v1"), ("SEND", "x1", "j", "x", "z1"),
    ]
    assert [b[0] for b in brief(core.done("v1", "j", "v", 2.0))].count("RELEASE") == 0
    core.done("y1", "j", "y", 2.0)
    cmds = core.done("z1", "j", "z", 3.0)
    assert [b for b in brief(cmds) if b[0] == "RELEASE"] == [
        ("RELEASE", "x1", "j", "x"), ("RELEASE", "y1", "j", "y"),
    ]
    cmds = core.done("r1", "j", "r", 4.0, result={"ok": True})
    assert brief(cmds)[-1] == ("succeeded", "j", None)
    core.check_invariants()


# -- random event sequences -----------------------------------------------------------


class Sim:
    """Workers as the core's commands describe them; checks every command is sane."""

    def __init__(self, core: Core, wf):
        self.core, self.wf, self.now = core, wf, 0.0
        self.tasks: dict[str, set] = {}
        self.holding: dict[str, set] = {}
        self.inputs: dict[tuple, set] = {}
        self.inflight: list[tuple] = []
        self.silent: set[str] = set()
        self.stalled: set[str] = set()  # alive, heartbeating, but it forgot a task
        self.failures: list[str] = []  # reasons of failed jobs
        self.jobs: list[str] = []
        self.terminal: dict[str, int] = {}
        self.next_id = 0

    def registered(self):
        return list(self.core._workers)

    def apply(self, cmds):
        for c in cmds:
            if isinstance(c, ToWorker):
                w = c.worker_id
                assert w in self.core._workers, f"{c.kind} to unregistered {w}"
                b = c.body
                if c.kind == "TASK":
                    key = (b["job"], b["stage"])
                    assert not self.core._workers[w].draining
                    assert key not in self.tasks[w]
                    self.tasks[w].add(key)
                    self.inputs[(w, *key)] = set()
                elif c.kind == "SEND":
                    assert (b["job"], b["stage"]) in self.holding[w]
                    assert b["to"] in self.core._workers
                    self.inflight.append((w, b["job"], b["stage"], b["to"], b["to_stage"]))
                elif c.kind == "RELEASE":
                    self.holding[w].remove((b["job"], b["stage"]))  # exactly once
                elif c.kind == "CANCEL":
                    key = (b["job"], b["stage"])
                    if w in self.stalled:
                        self.tasks[w].discard(key)
                    else:
                        self.tasks[w].remove(key)
            elif isinstance(c, JobEvent):
                assert c.job_id not in self.terminal, f"{c.type} after the end of {c.job_id}"
                if c.type in ("succeeded", "failed", "cancelled"):
                    self.terminal[c.job_id] = 1
                    if c.type == "failed":
                        assert c.data["reason"]
                        self.failures.append(c.data["reason"])

    def lost(self, w):
        self.tasks.pop(w, None)
        self.holding.pop(w, None)
        self.silent.discard(w)
        self.stalled.discard(w)
        self.inflight = [f for f in self.inflight if w not in (f[0], f[3])]
        for k in [k for k in self.inputs if k[0] == w]:
            del self.inputs[k]

    def check(self, strict=True):
        """``strict``: the core's view of every worker's tasks is the worker's own; else a
        stalled worker may have forgotten some."""
        self.core.check_invariants()
        for wid, w in self.core._workers.items():
            if strict or wid not in self.stalled:
                assert set(w.tasks) == self.tasks[wid], wid
            else:
                assert self.tasks[wid] <= set(w.tasks), wid
            assert set(w.holding) == self.holding[wid], wid
        assert set(self.tasks) == set(self.core._workers)

    # -- events
    def tick(self, dt):
        self.now += dt
        for w in self.registered():
            if w not in self.silent:
                self.apply(self.core.heartbeat(w, self.now))
        before = set(self.registered())
        cmds = self.core.expire(self.now)
        for w in before - set(self.registered()):
            assert w in self.silent
            self.lost(w)
        self.apply(cmds)

    def register(self, stage, capacity, wid=None):
        wid = wid or f"{stage}-{self.next_id}"
        self.next_id += 1
        self.lost(wid)
        self.tasks[wid], self.holding[wid] = set(), set()
        self.apply(self.core.register(wid, stage, capacity, {"w": wid}, self.now))

    def ready(self, w):
        """Tasks of w whose inputs have all arrived."""
        out = []
        for job, stage in sorted(self.tasks[w]):
            got = self.inputs.get((w, job, stage), set())
            if set(self.wf.upstream(stage)) <= got:
                out.append((job, stage))
        return out

    def done(self, w, key):
        job, stage = key
        cmds = self.core.done(w, job, stage, self.now, result={"job": job})
        assert not any(isinstance(c, Stale) for c in cmds), cmds
        self.tasks[w].discard(key)
        if self.wf.downstream(stage):
            self.holding[w].add(key)
        self.apply(cmds)

    def deliver(self, i):
        src, job, stage, to, to_stage = self.inflight.pop(i % len(self.inflight))
        if (job, stage) in self.holding.get(src, ()) and to in self.tasks:
            self.inputs.setdefault((to, job, to_stage), set()).add(stage)


# weighted by repetition: mostly normal work, with deaths, restarts and cancels mixed in
OPS = ("submit", "submit", "register", "reregister", "start", "done", "done", "done", "fail",
       "deliver", "deliver", "deliver", "silence", "tick", "disconnect", "drain", "cancel",
       "stale", "progress")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 63), st.integers(0, 63), st.booleans()),
                min_size=10, max_size=150))
def test_random_event_sequences_keep_invariants(ops):
    core = Core({"fan": FAN}, heartbeat_liveness_s=7.5, max_attempts=3)
    sim = Sim(core, FAN)
    stages = list(FAN.stages)
    for s in stages:
        sim.register(s, 1)
    for op, a, b, flag in ops:
        sim.now += 0.01
        workers = [w for w in sim.registered() if w not in sim.silent]
        if op == "submit":
            jid = f"j{len(sim.jobs)}"
            sim.jobs.append(jid)
            sim.apply(core.submit(jid, "fan", {"n": a}, {"p": b} if flag else None, sim.now))
        elif op == "register":
            sim.register(stages[a % len(stages)], 1 + b % 2)
        elif op == "reregister" and workers:
            w = workers[a % len(workers)]
            sim.register(core._workers[w].stage, 1 + b % 2, wid=w)
        elif op in ("start", "progress", "fail") and workers:
            w = workers[a % len(workers)]
            # a worker says STARTED or PROGRESS only once the task's inputs have all arrived
            mine = sorted(sim.tasks[w]) if op == "fail" else sim.ready(w)
            if mine:
                job, stage = mine[b % len(mine)]
                if op == "start":
                    cmds = core.started(w, job, stage, sim.now)
                elif op == "progress":
                    cmds = core.progress(w, job, stage, 1, 2, sim.now)
                else:
                    sim.tasks[w].discard((job, stage))
                    cmds = core.failed(w, job, stage, "boom", flag, sim.now)
                sim.apply(cmds)
        elif op == "done" and workers:
            w = workers[a % len(workers)]
            ready = sim.ready(w)
            if ready:
                sim.done(w, ready[b % len(ready)])
        elif op == "deliver" and sim.inflight:
            sim.deliver(a)
        elif op == "silence" and workers:
            sim.silent.add(workers[a % len(workers)])
        elif op == "tick":
            sim.tick(1.0 + a % 9)
        elif op == "disconnect" and workers:
            w = workers[a % len(workers)]
            cmds = core.disconnect(w, sim.now)
            sim.lost(w)
            sim.apply(cmds)
        elif op == "drain" and workers:
            sim.apply(core.drain(workers[a % len(workers)], sim.now))
        elif op == "cancel" and sim.jobs:
            sim.apply(core.cancel(sim.jobs[a % len(sim.jobs)], sim.now))
        elif op == "stale" and workers and sim.jobs:
            w, job, stage = workers[a % len(workers)], sim.jobs[b % len(sim.jobs)], stages[a % 5]
            if (job, stage) not in sim.tasks[w]:
                cmds = core.done(w, job, stage, sim.now)
                assert len(cmds) == 1 and isinstance(cmds[0], Stale)
        sim.check()

    # from here on every worker behaves: the dead are noticed, fresh workers join,
    # and every job must reach exactly one terminal state
    sim.tick(8.0)
    assert not sim.silent
    for s in stages:
        sim.register(s, 2)
    for _ in range(200):
        if not core.active_jobs():
            break
        while sim.inflight:
            sim.deliver(0)
        progressed = False
        for w in sim.registered():
            for key in sim.ready(w):
                if key in sim.tasks[w]:
                    sim.done(w, key)
                    progressed = True
        sim.check()
        assert progressed, {
            j: {s: t["state"] for s, t in core.job(j)["stages"].items()} for j in core.active_jobs()
        }
    assert core.active_jobs() == []
    assert sorted(sim.terminal) == sorted(sim.jobs)
    assert all(not h for h in sim.holding.values()), sim.holding
    assert all(not t for t in sim.tasks.values())
    assert all(s["load"] == 0 for s in core.stage_signals(sim.now).values())
