"""Lineage recovery and deadlines in the scheduling core (invariants 6, 7 and 9),
back to back with a fake clock: every position of a death, stalls, jobs past
their deadline, and random schedules in which workers die, stall and lose
messages, after which every job must still end."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core import Core, Stale, ToWorker
from broker.errors import CoreError
from stages.workflow import load_workflow, workflow_from_dict

from .test_core import ENCODERS, FAN, SHORT, Sim, brief, finish, job_events, wan_core

WAN = load_workflow("wan_i2v")


def retried(cmds):
    return [c.data["stage"] for c in job_events(cmds, "stage_retry")]


def run_encoders(core, job, now=1.0, worker=1):
    for enc in ENCODERS:
        finish(core, f"{SHORT[enc]}{worker}", job, enc, now)


def tasks_to(cmds, worker):
    return [(c.body["job"], c.body["stage"]) for c in cmds if isinstance(c, ToWorker) and c.kind == "TASK"
            and c.worker_id == worker]


# -- finding 1: a holder dies after its consumer finished reading its own inputs ------------------


def test_denoise_holder_lost_before_vae_decode_has_the_latents_remakes_the_encoders():
    """The reported hang: denoise finished (so the encoders' outputs were released), its
    worker dies before vae_decode has the latents; the re-run denoise needs the encoders'
    outputs again, so they are made again, and vae_decode (still bound) gets the new latents."""
    core = wan_core()
    core.submit("j1", "wan_i2v", {"prompt": "p"}, {"image": b"png"}, 0.0)
    run_encoders(core, "j1")
    cmds = finish(core, "dn1", "j1", "denoise", 2.0)
    assert [b for b in brief(cmds) if b[0] == "RELEASE"] == [
        ("RELEASE", "te1", "j1", "text_encode"), ("RELEASE", "ie1", "j1", "image_encode"),
        ("RELEASE", "ve1", "j1", "vae_encode"),
    ]
    assert core.job("j1")["stages"]["vae_decode"]["state"] == "assigned"  # bound to vd1, waiting
    cmds = core.register("dn1", "denoise", 1, {"addr": "dn1-new"}, 3.0)  # killed and restarted
    assert sorted(retried(cmds)) == sorted(["denoise", *ENCODERS])
    # the roots get the job's parameters and payload again
    roots = {c.body["stage"]: c.body for c in cmds if isinstance(c, ToWorker) and c.kind == "TASK"
             and c.body["stage"] in ENCODERS}
    assert set(roots) == set(ENCODERS)
    assert all(b["payload"] == {"image": b"png"} and b["params"] == {"prompt": "p"} for b in roots.values())
    core.check_invariants()
    denoiser = core.job("j1")["stages"]["denoise"]["worker"]
    assert denoiser is not None  # bound again, waiting for the re-made encoders
    for enc in ENCODERS:
        w = core.job("j1")["stages"][enc]["worker"]
        cmds = finish(core, w, "j1", enc, 4.0)
        assert ("SEND", w, "j1", enc, denoiser) in brief(cmds)
        core.check_invariants()
    cmds = finish(core, denoiser, "j1", "denoise", 5.0)
    assert ("SEND", denoiser, "j1", "denoise", "vd1") in brief(cmds)  # vae_decode kept its binding
    finish(core, "vd1", "j1", "vae_decode", 6.0)
    assert job_events(finish(core, "vv1", "j1", "video_encode", 7.0, result={"path": "x"}), "succeeded")
    core.check_invariants()
    assert core.stage_signals(8.0)["text_encode"]["load"] == 0


def test_remaking_lost_outputs_spends_no_attempt():
    """Holders dying repeatedly never fail a job that the tasks themselves never failed."""
    core = wan_core(max_attempts=2)
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    now = 1.0
    for round_ in range(5):
        for enc in ENCODERS:
            t = core.job("j1")["stages"][enc]
            if t["state"] != "done":
                finish(core, t["worker"], "j1", enc, now)
        dn = core.job("j1")["stages"]["denoise"]["worker"]
        finish(core, dn, "j1", "denoise", now + 0.1)
        core.register(dn, "denoise", 1, {}, now + 0.2)  # the holder restarts: its outputs are gone
        core.check_invariants()
        now += 1
    assert core.job("j1")["state"] == "running"
    assert core.job("j1")["stages"]["denoise"]["attempt"] == 1


@pytest.mark.parametrize("victim", ["text_encode", "denoise", "vae_decode"])
def test_holder_lost_while_its_consumer_is_queued(victim):
    """Every position: a root (fan-in input), the fan-in stage itself, and the stage before
    the result stage die holding outputs whose consumer has no worker free yet."""
    core = wan_core(per_stage=2)
    consumer = {"text_encode": "denoise", "denoise": "vae_decode", "vae_decode": "video_encode"}[victim]
    for i in (1, 2):  # no consumer worker takes work, so the victim's outputs wait, held, for a binding
        core.drain(f"{SHORT[consumer]}{i}", 0.0)
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    now = 1.0
    order = list(WAN.stages)
    for stage in order[: order.index(victim) + 1]:
        w = core.job("j1")["stages"][stage]["worker"]
        if core.job("j1")["stages"][stage]["state"] != "done":
            finish(core, w, "j1", stage, now)
        now += 1
    assert core.job("j1")["stages"][consumer]["state"] == "queued"
    holder = core.job("j1")["stages"][victim]["worker"]
    cmds = core.register(holder, victim, 1, {}, now)  # SIGKILLed and restarted: its outputs are gone
    assert victim in retried(cmds)
    core.check_invariants()
    core.register(f"{SHORT[consumer]}9", consumer, 1, {}, now)  # a consumer worker appears
    # drive the job to its end as well-behaved workers would
    for _ in range(20):
        if core.job("j1")["state"] != "running":
            break
        now += 1
        for stage, t in core.job("j1")["stages"].items():
            if t["state"] in ("assigned", "running"):
                finish(core, t["worker"], "j1", stage, now, result={"path": "x"})
                core.check_invariants()
    assert core.job("j1")["state"] == "succeeded"


def test_result_stage_worker_lost_while_running_is_retried():
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    run_encoders(core, "j1")
    finish(core, "dn1", "j1", "denoise", 2.0)
    finish(core, "vd1", "j1", "vae_decode", 3.0)
    core.started("vv1", "j1", "video_encode", 4.0)
    cmds = core.register("vv1", "video_encode", 1, {}, 5.0)
    assert retried(cmds) == ["video_encode"]
    assert tasks_to(cmds, "vv2") == [("j1", "video_encode")]
    assert ("SEND", "vd1", "j1", "vae_decode", "vv2") in brief(cmds)  # vae_decode still holds
    assert job_events(finish(core, "vv2", "j1", "video_encode", 6.0, result={"path": "x"}), "succeeded")
    core.check_invariants()


def test_holder_lost_while_its_consumer_runs_remakes_nothing_until_the_consumer_must_rerun():
    """A running consumer already has its inputs: losing their holder costs nothing unless
    the consumer itself must run again, and then lineage makes them again."""
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    run_encoders(core, "j1")
    finish(core, "dn1", "j1", "denoise", 2.0)
    core.started("vd1", "j1", "vae_decode", 3.0)
    cmds = core.register("dn1", "denoise", 1, {}, 4.0)
    assert retried(cmds) == [] and core.job("j1")["stages"]["denoise"]["state"] == "done"
    core.check_invariants()
    cmds = core.failed("vd1", "j1", "vae_decode", "CUDA error", True, 5.0)
    assert retried(cmds)[0] == "vae_decode"
    assert sorted(retried(cmds)[1:]) == sorted(["denoise", *ENCODERS])
    core.check_invariants()


def test_failed_delivery_when_every_consumer_already_runs_remakes_nothing():
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    run_encoders(core, "j1")
    finish(core, "dn1", "j1", "denoise", 2.0)
    core.started("vd1", "j1", "vae_decode", 3.0)
    cmds = core.failed("dn1", "j1", "denoise", "outputs not held here", True, 4.0)
    assert brief(cmds) == [("RELEASE", "dn1", "j1", "denoise")]
    core.check_invariants()


def test_a_holder_that_cannot_reach_the_consumer_gets_it_bound_elsewhere_without_rerunning():
    """A consumer's worker died, its heartbeats not yet overdue: the producer's word re-binds the
    consumer (spending no attempt of either), and the producer, still holding, sends again."""
    core = wan_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    run_encoders(core, "j1")
    finish(core, "dn1", "j1", "denoise", 2.0)
    cmds = core.unreachable("dn1", "j1", "denoise", "vd1", "vae_decode", "connection refused", 3.0)
    assert brief(cmds) == [
        ("CANCEL", "vd1", "j1", "vae_decode"), ("stage_retry", "j1", "vae_decode"),
        ("TASK", "vd2", "j1", "vae_decode"), ("stage_assigned", "j1", "vae_decode"),
        ("SEND", "dn1", "j1", "denoise", "vd2"),
    ]
    assert "could not reach it on vd1" in cmds[1].data["reason"]
    assert core.job("j1")["stages"]["vae_decode"]["attempt"] == 1
    assert core.job("j1")["stages"]["denoise"]["state"] == "done"  # nothing re-made
    core.check_invariants()
    # a late or lying report changes nothing
    assert isinstance(core.unreachable("dn1", "j1", "denoise", "vd1", "vae_decode", "x", 3.1)[0], Stale)
    assert isinstance(core.unreachable("vd2", "j1", "denoise", "vd2", "vae_decode", "x", 3.1)[0], Stale)
    assert isinstance(core.unreachable("dn1", "j1", "denoise", "vd2", "video_encode", "x", 3.1)[0], Stale)
    core.started("vd2", "j1", "vae_decode", 3.2)
    assert isinstance(core.unreachable("dn1", "j1", "denoise", "vd2", "vae_decode", "x", 3.3)[0], Stale)
    core.check_invariants()


# -- deadlines ------------------------------------------------------------------------------------


def deadline_core(**kw):
    kw = {"progress_floor_s": 5.0, "progress_cap_s": 60.0, "progress_factor": 4.0, "job_deadline_s": 1000.0,
          **kw}
    return wan_core(**kw)


def test_a_task_that_never_starts_is_lost_after_the_bound_and_rerun_elsewhere():
    core = deadline_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    assert core.progress_bound("text_encode") == 60.0  # nothing observed yet: the cap
    beat = lambda t: [core.heartbeat(w, t) for w in list(core._workers)]  # noqa: E731
    beat(59.0)
    assert core.expire(59.0) == []
    beat(61.0)
    cmds = core.expire(61.0)
    assert ("CANCEL", "te1", "j1", "text_encode") in brief(cmds)
    retry = job_events(cmds, "stage_retry")
    assert [r.data["stage"] for r in retry] == list(ENCODERS)
    assert "no progress for 61.0 s on worker te1" in retry[0].data["reason"]
    assert tasks_to(cmds, "te2") == [("j1", "text_encode")]
    assert core.job("j1")["stages"]["text_encode"]["attempt"] == 2  # a stall spends an attempt
    core.check_invariants()


def test_the_bound_follows_observed_service_times_within_floor_and_cap():
    core = deadline_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    core.started("te1", "j1", "text_encode", 0.0)
    core.done("te1", "j1", "text_encode", 0.5)
    assert core.progress_bound("text_encode") == 5.0  # 4 x 0.5 s is under the floor
    core.started("ie1", "j1", "image_encode", 0.0)
    core.done("ie1", "j1", "image_encode", 3.0)
    assert core.progress_bound("image_encode") == 12.0
    core.started("ve1", "j1", "vae_encode", 0.0)
    core.done("ve1", "j1", "vae_encode", 30.0)
    assert core.progress_bound("vae_encode") == 60.0  # 120 s, capped


def test_progress_events_keep_a_long_task_alive():
    core = deadline_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    run_encoders(core, "j1", now=0.0)
    core.started("dn1", "j1", "denoise", 1.0)
    for t in range(10, 300, 10):
        core.heartbeat("dn1", float(t))
        core.progress("dn1", "j1", "denoise", t, 300, float(t))
        assert core.expire(float(t) + 1) == []
    assert core.job("j1")["stages"]["denoise"]["state"] == "running"


def test_a_running_task_its_worker_vouches_for_is_bound_by_the_cap_only():
    """A job much larger than those observed is not killed for being slow while its worker
    says it is computing it; a task the worker forgot (it stops listing it) is lost at the
    stage's own bound."""
    core = deadline_core(progress_cap_s=100.0)
    for job in ("j1", "j2"):
        core.submit(job, "wan_i2v", {}, None, 0.0)
    core.started("te1", "j1", "text_encode", 0.0)
    core.done("te1", "j1", "text_encode", 0.5)  # observed: 0.5 s, so the bound is the 5 s floor
    core.started("te2", "j2", "text_encode", 1.0)
    core.submit("j3", "wan_i2v", {}, None, 1.0)
    core.started("te1", "j3", "text_encode", 1.0)
    te2_lists = []  # te2 forgot j2
    for t in range(2, 100, 2):
        core.heartbeat("te1", float(t), 1, [("j3", "text_encode"), ("nope", "text_encode")])
        core.heartbeat("te2", float(t), 1, te2_lists)
        for w in list(core._workers):
            if not w.startswith("te"):
                core.heartbeat(w, float(t))
        cmds = core.expire(float(t))
        if t == 8:
            assert retried(cmds)[0] == "text_encode"
            assert "no progress for 7.0 s on worker te2" in job_events(cmds, "stage_retry")[0].data["reason"]
            assert tasks_to(cmds, "te2") == [("j2", "text_encode")]  # the only one with room
            core.started("te2", "j2", "text_encode", float(t))
            te2_lists = [("j2", "text_encode")]
        else:
            assert "text_encode" not in retried(cmds), t
    assert core.job("j3")["stages"]["text_encode"]["state"] == "running"
    core.heartbeat("te1", 101.5, 1, [("j3", "text_encode")])
    assert ("CANCEL", "te1", "j3", "text_encode") in brief(core.expire(101.5))  # the cap still holds


def test_a_task_waiting_for_inputs_being_remade_does_not_count_down():
    core = deadline_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    finish(core, "te1", "j1", "text_encode", 1.0)  # binds dn1, which waits for the other encoders
    for t in (20.0, 40.0, 55.0):
        for w in list(core._workers):
            core.heartbeat(w, t)
        core.started("ie1", "j1", "image_encode", t)
        core.progress("ve1", "j1", "vae_encode", 1, 2, t)
        assert not retried(core.expire(t + 1))
    assert core.job("j1")["stages"]["denoise"]["state"] == "assigned"
    core.done("ie1", "j1", "image_encode", 56.0)
    core.done("ve1", "j1", "vae_encode", 56.0)  # every input sent: now its clock runs
    for w in list(core._workers):
        core.heartbeat(w, 56.0 + 61)
    cmds = core.expire(56.0 + 61)
    assert retried(cmds) == ["denoise"]
    core.check_invariants()


def test_a_job_past_its_deadline_fails_naming_the_stage_and_why():
    core = deadline_core(job_deadline_s=100.0, progress_cap_s=1000.0)
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    run_encoders(core, "j1")
    core.started("dn1", "j1", "denoise", 2.0)
    core.heartbeat("dn1", 99.0)
    assert core.expire(99.0) == []
    for w in list(core._workers):
        core.heartbeat(w, 101.0)
    cmds = core.expire(101.0)
    assert ("CANCEL", "dn1", "j1", "denoise") in brief(cmds)
    failed = job_events(cmds, "failed")
    assert failed and failed[0].data["stage"] == "denoise"
    reason = failed[0].data["reason"]
    assert reason.startswith("job exceeded its deadline of 100 s: stage denoise was running on worker dn1"), reason
    core.check_invariants()
    assert core.stages()["denoise"]["workers"][0]["load"] == 0


def test_a_job_queued_for_a_stage_nobody_serves_fails_at_its_deadline():
    core = Core({"wan_i2v": WAN}, heartbeat_liveness_s=1000.0, job_deadline_s=50.0)
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    cmds = core.expire(51.0)
    reason = job_events(cmds, "failed")[0].data["reason"]
    assert "stage text_encode was queued for 51.0 s: no live worker serves it" in reason
    assert core.stages()["text_encode"]["queued"] == 0
    core.check_invariants()


def test_a_requeued_job_keeps_its_original_deadline():
    core = Core({"wan_i2v": WAN}, heartbeat_liveness_s=1000.0, job_deadline_s=50.0)
    core.submit("j1", "wan_i2v", {}, None, 40.0, created=0.0)
    assert job_events(core.expire(51.0), "failed")


def test_deadline_settings_are_checked():
    with pytest.raises(CoreError):
        Core({"wan_i2v": WAN}, progress_floor_s=10.0, progress_cap_s=5.0)
    with pytest.raises(CoreError):
        Core({"wan_i2v": WAN}, job_deadline_s=0)


def test_health_names_stuck_stages_and_overdue_work():
    core = deadline_core()
    core.submit("j1", "wan_i2v", {}, None, 0.0)
    assert core.health(0.0) == []
    for w in [w for w in list(core._workers) if w.startswith("te")]:
        core.disconnect(w, 1.0)
    core.cancel("j1", 1.0)
    core.submit("j2", "wan_i2v", {}, None, 2.0)
    problems = core.health(3.0)
    assert any(p["stage"] == "text_encode" and "no worker" in p["reason"] for p in problems), problems
    stuck = core.stages(3.0)["text_encode"]["stuck"]
    assert stuck and stuck[0]["job"] == "j2" and stuck[0]["state"] == "queued"


# -- random schedules: deaths anywhere, stalls, lost messages; every job still ends ---------------

CHAIN = workflow_from_dict({
    "name": "chain",
    "result": "d",
    "stages": {"a": {"outputs": ["o"]}, "b": {"after": ["a"], "outputs": ["o"]},
               "c": {"after": ["b"], "outputs": ["o"]}, "d": {"after": ["c"]}},
})

OPS = ("submit", "submit", "done", "done", "done", "done", "deliver", "deliver", "deliver", "deliver",
       "kill_holder", "kill_holder", "kill", "stall", "lose_send", "unreachable", "fail", "tick", "cancel",
       "checkpoint", "handoff")


@pytest.mark.parametrize("wf", [FAN, CHAIN, WAN], ids=["fan", "chain", "wan"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 63), st.integers(0, 63), st.booleans()),
                    min_size=10, max_size=120))
def test_random_deaths_stalls_and_losses_every_job_ends(wf, ops):
    """A killed holder is replaced at once by a fresh worker of the same id (the
    position of the death is wherever the schedule puts it); a stalled worker keeps
    its heartbeat but forgets a task; a lost SEND never arrives; running tasks leave
    checkpoints (some with a worker that holds none of their inputs: refused) and are
    handed off at step boundaries. Afterwards workers
    behave, time passes, and every job ends, with a reason naming a stage if it failed."""
    core = Core({wf.name: wf}, heartbeat_liveness_s=7.5, max_attempts=3, progress_floor_s=2.0,
                progress_cap_s=20.0, job_deadline_s=500.0)
    sim = Sim(core, wf)
    stages = list(wf.stages)
    for s in stages:
        sim.register(s, 1)
        sim.register(s, 1)
    for op, a, b, flag in ops:
        sim.now += 0.1
        workers = sim.registered()
        if op == "submit":
            jid = f"j{len(sim.jobs)}"
            sim.jobs.append(jid)
            sim.apply(core.submit(jid, wf.name, {"n": a}, {"p": b} if flag else None, sim.now))
        elif op == "done":
            ready = [(w, k) for w in workers for k in sim.ready(w) if k in sim.tasks[w]]
            if ready:
                w, (job, stage) = ready[a % len(ready)]
                sim.apply(core.started(w, job, stage, sim.now))
                sim.done(w, (job, stage))
        elif op == "deliver" and sim.inflight:
            sim.deliver(a)
        elif op in ("kill_holder", "kill"):
            holders = [w for w in workers if sim.holding[w]] if op == "kill_holder" else workers
            if holders:
                w = holders[a % len(holders)]
                sim.register(core._workers[w].stage, 1, wid=w)  # SIGKILL, and a supervisor restarts it
        elif op == "stall":
            busy = [w for w in workers if sim.tasks[w]]
            if busy:
                w = busy[a % len(busy)]
                sim.tasks[w].discard(sorted(sim.tasks[w])[b % len(sim.tasks[w])])
                sim.stalled.add(w)
        elif op == "lose_send" and sim.inflight:
            sim.inflight.pop(a % len(sim.inflight))
        elif op == "unreachable" and sim.inflight:  # the holder could not deliver: it says to whom
            src, job, stage, to, to_stage = sim.inflight.pop(a % len(sim.inflight))
            if src in sim.tasks:
                sim.apply(core.unreachable(src, job, stage, to, to_stage, "refused", sim.now))
        elif op == "fail":
            busy = [w for w in workers if sim.tasks[w]]
            if busy:
                w = busy[a % len(busy)]
                job, stage = sorted(sim.tasks[w])[b % len(sim.tasks[w])]
                sim.tasks[w].discard((job, stage))
                sim.apply(core.failed(w, job, stage, "boom", flag, sim.now))
        elif op in ("checkpoint", "handoff"):  # invariant 11: state left with an input's holder
            running = [(w, k) for w in workers if w not in sim.stalled for k in sim.ready(w) if k in sim.tasks[w]]
            if running:
                w, (job, stage) = running[a % len(running)]
                if op == "checkpoint":  # with the holder of an input, or (flag) a worker that holds none
                    holders = [h for h in workers if any((job, up) in sim.holding[h] for up in wf.upstream(stage))]
                    holder = holders[b % len(holders)] if holders and not flag else workers[b % len(workers)]
                    sim.apply(core.started(w, job, stage, sim.now))
                    sim.apply(core.checkpointed(w, job, stage, 1 + b % 9, holder, sim.now))
                else:  # the worker drains: it stops at a step boundary and forgets the task
                    sim.apply(core.started(w, job, stage, sim.now))
                    sim.tasks[w].discard((job, stage))
                    sim.apply(core.handoff(w, job, stage, b % 9, sim.now))
        elif op == "tick":
            sim.tick(0.5 + a % 5)
        elif op == "cancel" and sim.jobs:
            sim.apply(core.cancel(sim.jobs[a % len(sim.jobs)], sim.now))
        sim.check(strict=False)

    for _ in range(400):
        if not core.active_jobs():
            break
        while sim.inflight:
            sim.deliver(0)
        for w in sim.registered():
            for key in sim.ready(w):
                if key in sim.tasks[w]:
                    sim.apply(core.started(w, *key, sim.now))
                    sim.done(w, key)
        sim.tick(1.0)
        sim.check(strict=False)
    assert core.active_jobs() == [], {
        j: {s: t["state"] for s, t in core.job(j)["stages"].items()} for j in core.active_jobs()
    }
    assert sorted(sim.terminal) == sorted(sim.jobs)
    for reason in sim.failures:
        assert any(f"stage {s}" in reason for s in stages), reason
