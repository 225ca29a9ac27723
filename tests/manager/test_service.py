"""The Manager against a real Broker: first with an in-memory launcher (fast, exact timing
of exits), then with real LocalLauncher worker processes running a synthetic workflow."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import aiohttp
import pytest

from broker.api import start_api
from broker.service import Broker
from manager.launcher import Launcher, LocalLauncher, WorkerHandle
from manager.policy import PolicyConfig, PolicyError, ProportionalPolicy, StaticPolicy
from manager.service import Manager
from onepiece.config import load_settings

from ..helpers import chain3, free_port

pytestmark = pytest.mark.timeout(180)



def settings_for(tmp: Path, b_service: float = 0.2, heartbeat_s: float = 0.5):
    tmp.mkdir(parents=True, exist_ok=True)
    wf = tmp / "mgr3.toml"
    wf.write_text(chain3("mgr3", b_service))
    return load_settings(env={}, data_dir=tmp / "data", control="tcp://127.0.0.1:*", rest_port=free_port(),
                         transport="shm", workflows=[str(wf)], heartbeat_s=heartbeat_s, liveness=3)


async def until(cond, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def job_events(broker: Broker, job: str, on_event=None) -> list[dict]:
    history, q = broker.subscribe(job)
    seen = list(history)
    for e in history:
        if on_event:
            on_event(e)
    while (e := await asyncio.wait_for(q.get(), 120)) is not None:
        seen.append(e)
        if on_event:
            on_event(e)
    return seen


class MemoryLauncher(Launcher):
    """Workers that exist only as registrations in the broker's core. A drain waits until the
    test opens the worker's gate (``hold_drains``), so exits happen exactly when a test says."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.handles: dict[str, WorkerHandle] = {}
        self.started: list[tuple[str, float]] = []
        self.exited: dict[str, float] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.hold_drains = False
        self.killed: list[str] = []
        self._n = 0

    async def start(self, workflow: str, stage: str) -> WorkerHandle:
        self._n += 1
        h = WorkerHandle(f"{stage}-{self._n}", workflow, stage)
        self.handles[h.id] = h
        self.started.append((h.id, time.time()))
        self.broker.core.register(h.id, stage, 1, {"transport": "none"}, time.time(), {"load_s": 0.25})
        return h

    async def drain(self, handle: WorkerHandle, timeout: float = 600.0) -> int | None:
        gate = self.gates.setdefault(handle.id, asyncio.Event())
        if not self.hold_drains:
            gate.set()
        await gate.wait()
        self.broker._apply(self.broker.core.disconnect(handle.id, time.time()))
        self.handles.pop(handle.id, None)
        self.exited[handle.id] = time.time()
        return 0

    async def kill(self, handle: WorkerHandle) -> None:
        self.handles.pop(handle.id, None)
        self.killed.append(handle.id)
        self.gates.setdefault(handle.id, asyncio.Event()).set()  # a drain waiting for it ends

    def workers(self) -> list[WorkerHandle]:
        return list(self.handles.values())


@contextlib.asynccontextmanager
async def memory_stack(tmp_path, policy, *, cpu_slots=3, gpu_slots=0, period_s=60.0):
    broker = Broker(settings_for(tmp_path, heartbeat_s=60.0))
    await broker.start()
    launcher = MemoryLauncher(broker)
    manager = Manager(broker, launcher, policy, gpu_slots=gpu_slots, cpu_slots=cpu_slots, period_s=period_s)
    try:
        await manager.start()
        yield broker, launcher, manager
    finally:
        launcher.hold_drains = False
        for gate in launcher.gates.values():
            gate.set()
        await manager.stop(timeout=5)
        await broker.stop()


# -- in memory: the manager's bookkeeping -------------------------------------------------------------


async def test_start_brings_up_the_initial_allocation_and_a_short_pool_is_refused(tmp_path):
    async with memory_stack(tmp_path, ProportionalPolicy()) as (broker, launcher, manager):
        assert sorted(w for w, _ in launcher.started) == ["a-1", "b-2", "c-3"]
        assert broker.missing_stages() == []
        alloc = manager.allocation()
        assert {s: (a["workers"], a["target"], a["pool"]) for s, a in alloc.items()} == \
            {"a": (1, 1, "cpu"), "b": (1, 1, "cpu"), "c": (1, 1, "cpu")}
        assert [d["delta"] for d in manager.decisions()] == [1, 1, 1]
        assert all("floor" in d["reason"] and "queued" in d["signals"] for d in manager.decisions())
    with pytest.raises(PolicyError, match="floors need 3 CPU slots"):
        async with memory_stack(tmp_path / "short", ProportionalPolicy(), cpu_slots=2):
            pass


async def test_a_re_purposed_slot_is_used_only_once_the_drained_worker_has_exited(tmp_path):
    policy = StaticPolicy({"a": 1, "b": 1, "c": 1})
    async with memory_stack(tmp_path, policy) as (broker, launcher, manager):
        launcher.hold_drains = True
        policy.targets["b"] = 0
        changes = manager.tick()
        assert [(c.stage, c.delta) for c in changes] == [("b", -1)]
        assert broker.stages()["b"]["workers"][0]["draining"]  # the broker binds nothing new to it
        policy.targets["c"] = 2
        manager.scale("c", 1, "test: b's slot goes to c")
        await asyncio.sleep(0.3)
        assert len(launcher.started) == 3, "started a worker before the slot was free"
        assert manager.allocation()["c"]["starting"] == 1 and manager.allocation()["b"]["draining"] == 1
        assert manager.slots()["cpu"] == {"total": 3, "used": 3}
        assert manager.tick() == []  # the policy sees c at its target: it does not start another
        launcher.gates["b-2"].set()
        await until(lambda: len(launcher.started) == 4, 5, "the start that waited for b's slot")
        new_c, launched = launcher.started[-1]
        assert new_c.startswith("c-") and launched >= launcher.exited["b-2"]
        assert manager.exits()["b-2"]["code"] == 0 and manager.exits()["b-2"]["how"] == "drained"
        await until(lambda: manager.allocation()["c"]["workers"] == 2, 5, "c registered")
        assert manager.allocation()["b"] == {"workers": 0, "starting": 0, "draining": 0, "target": 0,
                                              "pool": "cpu"}


async def test_stop_is_bounded_by_its_timeout_even_for_drains_begun_earlier(tmp_path):
    """A worker drained before the stop (it holds outputs nobody releases, so it never leaves)
    is killed once stop's timeout passes, instead of keeping the manager for drain_timeout_s."""
    policy = StaticPolicy({"a": 1, "b": 1, "c": 1})
    async with memory_stack(tmp_path, policy) as (broker, launcher, manager):
        launcher.hold_drains = True
        policy.targets["b"] = 0
        assert [(c.stage, c.delta) for c in manager.tick()] == [("b", -1)]  # drains with drain_timeout_s=600
        await asyncio.wait_for(manager.stop(timeout=0.5), 30)
        assert "b-2" in launcher.killed


async def test_a_worker_that_dies_frees_its_slot_and_is_replaced(tmp_path):
    async with memory_stack(tmp_path, ProportionalPolicy(), period_s=0.3) as (broker, launcher, manager):
        victim = launcher.handles["b-2"]
        del launcher.handles["b-2"]  # the process is gone ...
        broker._apply(broker.core.disconnect("b-2", time.time()))  # ... and the broker noticed
        await until(lambda: manager.exits().get("b-2"), 5, "the manager to notice the exit")
        assert manager.exits()["b-2"]["how"] == "exited"
        await until(lambda: manager.allocation()["b"]["workers"] == 1, 5, "a replacement")
        assert victim.id not in {w["id"] for w in broker.stages()["b"]["workers"]}
        assert any(d["stage"] == "b" and d["delta"] == 1 and "floor" in d["reason"] for d in manager.decisions()[3:])


async def test_a_queued_task_for_a_stage_at_zero_wakes_the_manager_early(tmp_path):
    policy = ProportionalPolicy(PolicyConfig(floors={"a": 0}))
    async with memory_stack(tmp_path, policy, period_s=60.0) as (broker, launcher, manager):
        assert manager.allocation()["a"]["workers"] == 0
        broker.submit("mgr3", {})
        # a whole period is a minute: the start must come from the early wake-up
        await until(lambda: manager.allocation()["a"]["workers"] == 1, 5, "a cold start")
        assert "cold start" in manager.decisions()[-1]["reason"]


async def test_metrics_and_v1_stages_show_the_allocation(tmp_path):
    async with memory_stack(tmp_path, ProportionalPolicy()) as (broker, launcher, manager):
        runner, port = await start_api(broker, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                async with session.get(f"http://127.0.0.1:{port}/v1/stages") as resp:
                    body = await resp.json()
        finally:
            await runner.cleanup()
        assert 'onepiece_manager_workers{stage="b"} 1.0' in text
        assert 'onepiece_manager_target_workers{stage="b"} 1.0' in text
        assert 'onepiece_manager_decisions_total{direction="up",stage="b"} 1.0' in text
        assert 'onepiece_manager_slots{pool="cpu",state="total"} 3.0' in text
        assert body["allocation"]["b"]["workers"] == 1 and body["decisions"][-1]["stage"] == "c"


# -- real worker processes ------------------------------------------------------------------------


def _shm_left(pids: list[int]) -> list[str]:
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return [n for n in names if any(n.startswith(f"onepiece-{pid}-") for pid in pids)]


@contextlib.asynccontextmanager
async def process_stack(tmp_path, policy, *, b_service: float, cpu_slots: int = 3, period_s: float = 0.5):
    settings = settings_for(tmp_path, b_service=b_service)
    broker = Broker(settings)
    await broker.start()
    settings = settings.replace(control=broker.endpoint)
    launcher = LocalLauncher(settings, env={"ONEPIECE_LOG_LEVEL": "WARNING"})
    pids: list[int] = []
    started = launcher.start

    async def remember(workflow, stage):
        h = await started(workflow, stage)
        pids.append(h.process.pid)
        return h

    launcher.start = remember
    manager = Manager(broker, launcher, policy, gpu_slots=0, cpu_slots=cpu_slots, period_s=period_s)
    runner = None
    try:
        runner, port = await start_api(broker, "127.0.0.1", 0)
        await manager.start()
        yield broker, launcher, manager, f"http://127.0.0.1:{port}"
    finally:
        await manager.stop(timeout=20)
        await launcher.aclose(5)
        if runner is not None:
            await runner.cleanup()
        await broker.stop()
        for pid in pids:  # every process started has exited (and been reaped)
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert _shm_left(pids) == []


async def test_draining_a_worker_mid_task_neither_loses_nor_repeats_it(tmp_path):
    policy = StaticPolicy({"a": 1, "b": 1, "c": 1})
    async with process_stack(tmp_path, policy, b_service=3.0) as (broker, launcher, manager, _):
        await until(lambda: broker.missing_stages() == [], 90, "every stage registered")
        job = broker.submit("mgr3", {})
        drained: list[str] = []

        def on_event(e):
            if e["type"] == "stage_started" and e["data"]["stage"] == "b" and not drained:
                drained.append(e["data"]["worker"])
                policy.targets["b"] = 0  # scale b down while its only worker runs the task
                changes = manager.tick()
                assert [(c.stage, c.delta) for c in changes] == [("b", -1)]

        events = await job_events(broker, job, on_event)
        assert events[-1]["type"] == "succeeded", events[-1]
        (w,) = drained
        b_started = [e for e in events if e["type"] == "stage_started" and e["data"]["stage"] == "b"]
        b_finished = [e for e in events if e["type"] == "stage_finished" and e["data"]["stage"] == "b"]
        assert len(b_started) == 1 and b_started[0]["data"]["attempt"] == 1
        assert len(b_finished) == 1 and b_finished[0]["data"] == {**b_finished[0]["data"], "worker": w,
                                                                   "attempt": 1}
        assert not [e for e in events if e["type"] == "stage_retry"]
        exit_ = await until(lambda: manager.exits().get(w), 30, "the drained worker to exit")
        assert exit_["code"] == 0 and exit_["how"] == "drained"
        # (until: a worker that re-registers between its DISCONNECT and its exit lingers until liveness)
        await until(lambda: manager.allocation()["b"]["workers"] == 0, 10, "b to have no worker")
        assert any(d["stage"] == "b" and d["delta"] == -1 for d in manager.decisions())


async def test_a_job_for_a_stage_at_zero_workers_starts_one_completes_and_the_stage_goes_back_to_zero(tmp_path):
    cfg = PolicyConfig(floors={"b": 0}, period_s=0.5, down_delay_periods=2, idle_to_zero_load_times=0.5)
    async with process_stack(tmp_path, ProportionalPolicy(cfg), b_service=0.2) as (broker, launcher, manager, url):
        await until(lambda: not set(broker.missing_stages()) - {"b"}, 90, "a and c registered")
        assert manager.allocation()["b"] == {"workers": 0, "starting": 0, "draining": 0, "target": 0,
                                              "pool": "cpu"}
        job = broker.submit("mgr3", {})
        events = await job_events(broker, job)
        assert events[-1]["type"] == "succeeded", events[-1]
        cold = [d for d in manager.decisions() if d["stage"] == "b" and d["delta"] == 1]
        assert len(cold) == 1 and "cold start" in cold[0]["reason"]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
        assert 'onepiece_manager_decisions_total{direction="up",stage="b"} 1.0' in text
        # idle again: after the down delay and half a cold start's worth of idling, back to zero
        await until(lambda: any(e["stage"] == "b" and e["how"] == "drained" for e in manager.exits().values()),
                    60, "b to scale back to zero")
        assert [e["code"] for e in manager.exits().values() if e["stage"] == "b"] == [0]
        await until(lambda: manager.allocation()["b"]["workers"] == 0, 10, "b to have no worker")
        assert "idle" in [d for d in manager.decisions() if d["stage"] == "b"][-1]["reason"]
