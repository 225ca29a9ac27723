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
from stages.workflow import load_workflow

from ..helpers import SYNTHETIC_PARAMS, chain3, free_port, until

pytestmark = pytest.mark.timeout(180)



def settings_for(tmp: Path, b_service: float = 0.2, heartbeat_s: float = 0.5):
    tmp.mkdir(parents=True, exist_ok=True)
    wf = tmp / "mgr3.toml"
    wf.write_text(chain3("mgr3", b_service))
    return load_settings(env={}, data_dir=tmp / "data", control="tcp://127.0.0.1:*", rest_port=free_port(),
                         transport="shm", workflows=[str(wf)], heartbeat_s=heartbeat_s, liveness=3)


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
        self.broker.core.register(h.id, stage, 1, {"transport": "none"}, time.time(), self.info(stage))
        return h

    def info(self, stage: str) -> dict:
        """What a worker of ``stage`` says about itself when it registers."""
        return {"load_s": 0.25}

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


# -- GPU memory: small stages share a GPU ----------------------------------------------------------

# Four GPU stages in a chain: three small ones (25 GB at their peak, a tenth of a GPU's compute)
# and a big one (60 GB, busy all the time).
PACKED = """
name = "packed"
result = "big"
[stages.s1]
kind = "synthetic"
gpu = true
outputs = ["x"]
memory_gb = 2.0
peak_gb = 25.0
gpu_load = 0.1
[stages.s1.synthetic]
service_time = 0.01
output_bytes = 1024
[stages.s2]
kind = "synthetic"
gpu = true
after = ["s1"]
outputs = ["y"]
memory_gb = 2.0
peak_gb = 25.0
gpu_load = 0.1
[stages.s2.synthetic]
service_time = 0.01
output_bytes = 1024
[stages.s3]
kind = "synthetic"
gpu = true
after = ["s2"]
outputs = ["z"]
memory_gb = 2.0
peak_gb = 25.0
gpu_load = 0.1
[stages.s3.synthetic]
service_time = 0.01
output_bytes = 1024
[stages.big]
kind = "synthetic"
gpu = true
after = ["s3"]
memory_gb = 40.0
peak_gb = 60.0
gpu_load = 1.0
[stages.big.synthetic]
service_time = 0.01
"""


def test_memory_options_that_cannot_fit_a_gpu_are_refused(tmp_path):
    broker = Broker(settings_for(tmp_path))  # not started: the manager only reads its workflows
    wf = tmp_path / "packed.toml"
    wf.write_text(PACKED + SYNTHETIC_PARAMS)
    with pytest.raises(ValueError, match="stage 'big' needs 60.0 GB at its peak .* a GPU has 40.0 GB"):
        Manager(broker, MemoryLauncher(broker), StaticPolicy({}), gpu_slots=2, cpu_slots=0,
                workflows={"packed": load_workflow(wf)}, gpu_memory_gb=40.0)
    with pytest.raises(ValueError, match="stage_needs and gpu_max_load need gpu_memory_gb"):
        Manager(broker, MemoryLauncher(broker), StaticPolicy({}), gpu_slots=2, cpu_slots=0, gpu_max_load=1.0)


async def test_small_gpu_stages_share_one_gpu_and_an_exit_frees_room_for_a_waiting_start(tmp_path, monkeypatch):
    """No GPU exists here: the workers run on the CPU, but the manager's accounting is the one it
    does on CUDA, where workers that share a GPU are pinned to the same device, as here."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # what this process may use: slot 0 is device 5
    tmp_path.mkdir(parents=True, exist_ok=True)
    wf = tmp_path / "packed.toml"
    wf.write_text(PACKED + SYNTHETIC_PARAMS)
    settings = load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*", rest_port=free_port(),
                             transport="shm", workflows=[str(wf)], heartbeat_s=0.5, liveness=3)
    broker = Broker(settings)
    await broker.start()
    launcher = LocalLauncher(settings.replace(control=broker.endpoint), env={"ONEPIECE_LOG_LEVEL": "WARNING"})
    launched: dict[str, tuple[str, float]] = {}  # worker id -> (its device, when it was started)
    start = launcher.start

    async def remember(workflow, stage, *, env=None):
        h = await start(workflow, stage, env=env)
        launched[h.id] = (env["CUDA_VISIBLE_DEVICES"], time.time())
        return h

    launcher.start = remember
    policy = StaticPolicy({"s1": 1, "s2": 1, "s3": 1, "big": 1})
    manager = Manager(broker, launcher, policy, gpu_slots=2, cpu_slots=0, period_s=60.0, pin_gpus=True,
                      gpu_memory_gb=80.0, gpu_max_load=1.0)
    assert manager.pools[True].policy_slots == 4  # what the policy is told: 4 workers on 2 GPUs

    def gpus():
        return {frozenset(w.split("-")[0] for w in g["workers"]): (g["used_gb"], g["resident_gb"], g["device"])
                for g in manager.slots()["gpu"]["gpus"]}

    try:
        await manager.start()
        await until(lambda: broker.missing_stages() == [], 90, "every stage registered")
        assert manager.slots()["gpu"]["total"] == 2 and manager.slots()["gpu"]["used"] == 2
        placed = gpus()  # three small workers on one GPU, the big one alone on the other
        small_dev = placed[frozenset({"s1", "s2", "s3"})][2]
        assert placed == {frozenset({"s1", "s2", "s3"}): (75.0, 6.0, small_dev),
                          frozenset({"big"}): (60.0, 40.0, {"5": "7", "7": "5"}[small_dev])}
        devices = {wid.split("-")[0]: dev for wid, (dev, _) in launched.items()}
        assert devices["s1"] == devices["s2"] == devices["s3"] == small_dev != devices["big"]
        job = broker.submit("packed", {})
        assert (await job_events(broker, job))[-1]["type"] == "succeeded"

        # one more s1: 5 GB left beside the small ones, and the big one's GPU is busy: it waits
        policy.targets.update(s1=2, s2=0)
        manager.scale("s1", 1, "test: a start that does not fit")
        await asyncio.sleep(1.0)
        assert len(launched) == 4 and manager.allocation()["s1"]["starting"] == 1
        assert gpus() == placed
        # draining s2 frees its 25 GB; the waiting start takes them, on the same device
        assert [(c.stage, c.delta) for c in manager.tick()] == [("s2", -1)]
        await until(lambda: manager.allocation()["s1"]["workers"] == 2, 60, "the waiting s1 to start")
        (s2_exit,) = [e["at"] for e in manager.exits().values() if e["stage"] == "s2"]
        (new_s1,) = [wid for wid in launched if wid.startswith("s1-")][1:]
        assert launched[new_s1][0] == small_dev and launched[new_s1][1] >= s2_exit
        now = manager.slots()["gpu"]["gpus"]
        assert sorted(w.split("-")[0] for g in now for w in g["workers"] if g["device"] == small_dev) == \
            ["s1", "s1", "s3"]
        assert manager.slots()["gpu"]["used"] == 2
    finally:
        await manager.stop(timeout=20)
        await launcher.aclose(5)
        await broker.stop()


async def test_a_start_waiting_for_gpu_memory_blocks_the_ones_behind_it_and_is_cancelled_by_stop(tmp_path):
    wf = tmp_path / "packed.toml"
    wf.write_text(PACKED + SYNTHETIC_PARAMS)
    broker = Broker(load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*",
                                  rest_port=free_port(), transport="shm", workflows=[str(wf)], heartbeat_s=60.0))
    await broker.start()
    launcher = MemoryLauncher(broker)
    policy = StaticPolicy({"s1": 1, "s2": 1, "s3": 1, "big": 1})
    manager = Manager(broker, launcher, policy, gpu_slots=2, cpu_slots=0, period_s=60.0, gpu_memory_gb=80.0,
                      gpu_max_load=1.0)
    try:
        await manager.start()
        assert len(launcher.started) == 4 and manager.slots()["gpu"]["used"] == 2
        policy.targets.update(big=2, s2=0)
        manager.scale("big", 1, "test: no GPU has 60 GB free")
        assert [(c.stage, c.delta) for c in manager.tick()] == [("s2", -1)]
        (victim,) = [w for w, _ in launcher.started if w.startswith("s2-")]
        await until(lambda: victim in launcher.exited, 5, "the small worker to leave")
        # 25 GB are free beside the small ones now, but the big start is first in line and still
        # does not fit: the s1 start behind it waits too, so small workers cannot starve a big one
        manager.scale("s1", 1, "test: fits, but behind the big start")
        await asyncio.sleep(0.2)
        assert len(launcher.started) == 4
        assert [a["starting"] for s, a in manager.allocation().items() if s in ("big", "s1")] == [1, 1]
    finally:
        await manager.stop(timeout=5)  # cancels both waiting starts: nothing more is launched
        await broker.stop()
    assert len(launcher.started) == 4 and manager.pools[True].gpus.held() == 0


async def test_with_a_max_load_above_one_a_small_stage_shares_the_big_ones_gpu(tmp_path):
    """max_load 1.0 gives the big stage (load 1.0) its GPU to itself, so a small one (0.1) needs a
    second GPU; at 1.2 the small one sits beside it (20 GB of peaks fit the 80 GB): one GPU."""
    wf = tmp_path / "beside.toml"
    wf.write_text(PACKED.replace('peak_gb = 25.0', 'peak_gb = 10.0') + SYNTHETIC_PARAMS)
    broker = Broker(load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*",
                                  rest_port=free_port(), transport="shm", workflows=[str(wf)], heartbeat_s=60.0))
    await broker.start()
    try:
        for max_load, held in ((1.0, 2), (1.2, 1)):
            launcher = MemoryLauncher(broker)
            manager = Manager(broker, launcher, StaticPolicy({"big": 1, "s1": 1}), gpu_slots=2, cpu_slots=0,
                              period_s=60.0, gpu_memory_gb=80.0, gpu_max_load=max_load)
            try:
                await manager.start()
                assert len(launcher.started) == 2
                assert manager.slots()["gpu"]["used"] == held, max_load
                [gpu] = [g for g in manager.slots()["gpu"]["gpus"] if any(w.startswith("big-") for w in g["workers"])]
                assert any(w.startswith("s1-") for w in gpu["workers"]) == (held == 1)
            finally:
                await manager.stop(timeout=5)
    finally:
        await broker.stop()


async def test_scaling_down_drains_the_worker_that_gives_a_gpu_back(tmp_path):
    """Two big workers, a small one beside the newer of them (max_load 1.2): when one big worker
    must go, the manager drains the one alone on its GPU (not the newest, as it would otherwise),
    so the pool holds one GPU instead of two."""
    wf = tmp_path / "beside.toml"
    wf.write_text(PACKED.replace('peak_gb = 25.0', 'peak_gb = 10.0') + SYNTHETIC_PARAMS)
    broker = Broker(load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*",
                                  rest_port=free_port(), transport="shm", workflows=[str(wf)], heartbeat_s=60.0))
    await broker.start()
    launcher = MemoryLauncher(broker)
    policy = StaticPolicy({"s1": 1, "s2": 1, "s3": 1})
    manager = Manager(broker, launcher, policy, gpu_slots=2, cpu_slots=0, period_s=60.0, gpu_memory_gb=80.0,
                      gpu_max_load=1.2)

    def placed() -> list[list[str]]:
        return [sorted(w.split("-")[0] for w in g["workers"]) for g in manager.slots()["gpu"]["gpus"] if g["workers"]]

    async def settle(n_started: int, what: str) -> None:
        manager.tick()
        await until(lambda: len(launcher.started) == n_started
                    and not any(a["starting"] or a["draining"] for a in manager.allocation().values()), 5, what)

    try:
        await manager.start()  # the three small ones stack on one GPU (30 of 80 GB)
        await until(lambda: sum(map(len, placed())) == 3, 5, "the small workers")
        policy.targets.update(big=1)  # 60 GB more does not fit beside them: the first big one takes GPU 2
        await settle(4, "the first big worker")
        policy.targets.update(s2=0, s3=0)
        await settle(4, "s2 and s3 to leave")
        policy.targets.update(big=2)  # the second big one fits beside s1 (70 GB, load 1.1)
        await settle(5, "the second big worker")
        assert sorted(placed()) == [["big"], ["big", "s1"]]
        [first_big] = [w for w, _ in launcher.started if w.startswith("big-")][:1]
        policy.targets.update(big=1)
        assert [(c.stage, c.delta) for c in manager.tick()] == [("big", -1)]
        await until(lambda: first_big in launcher.exited, 5, "the lone (older) big worker to leave")
        assert placed() == [["big", "s1"]] and manager.slots()["gpu"]["used"] == 1
    finally:
        await manager.stop(timeout=5)
        await broker.stop()


# -- sequence-parallel groups: a worker of width k holds k GPU slots ----------------------------

WIDE = """
name = "wide"
result = "dit"
[stages.enc]
kind = "synthetic"
gpu = true
outputs = ["x"]
[stages.enc.synthetic]
service_time = 0.01
output_bytes = 1024
[stages.dit]
kind = "synthetic"
gpu = true
after = ["enc"]
[stages.dit.synthetic]
service_time = 0.01
"""


class GroupLauncher(MemoryLauncher):
    """The in-memory launcher that can start groups: it records each start's width and devices."""

    def __init__(self, broker: Broker):
        super().__init__(broker)
        self.widths: dict[str, int] = {}
        self.devices: dict[str, str] = {}

    async def start(self, workflow: str, stage: str, *, env=None, sp: int = 1) -> WorkerHandle:
        h = await super().start(workflow, stage)
        self.widths[h.id] = sp
        self.devices[h.id] = (env or {}).get("CUDA_VISIBLE_DEVICES", "")
        return h


async def test_a_width_2_start_takes_two_gpu_slots_and_retires_the_old_width_as_it_registers(tmp_path, monkeypatch):
    """No GPU exists here: the accounting (and the devices a group is pinned to) is the one the
    manager does on CUDA, with workers that exist only as registrations (GroupLauncher)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    wf = tmp_path / "wide.toml"
    wf.write_text(WIDE + SYNTHETIC_PARAMS)
    broker = Broker(load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*",
                                  rest_port=free_port(), transport="shm", workflows=[str(wf)], heartbeat_s=60.0))
    await broker.start()
    launcher = GroupLauncher(broker)
    policy = StaticPolicy({"enc": 1, "dit": 1})
    manager = Manager(broker, launcher, policy, gpu_slots=4, cpu_slots=0, period_s=60.0, pin_gpus=True)
    try:
        await manager.start()
        (old,) = [w for w, _ in launcher.started if w.startswith("dit-")]
        assert manager.slots()["gpu"]["used"] == 2 and "width" not in manager.allocation()["dit"]
        manager.scale("dit", 1, "test: a group of 2", width=2)
        (group,) = await until(lambda: [w for w, _ in launcher.started if w.startswith("dit-") and w != old], 5,
                               "the group to be launched")
        assert launcher.widths[group] == 2 and len(launcher.devices[group].split(",")) == 2
        assert set(launcher.devices[group].split(",")) <= {"4", "5", "6", "7"}
        assert launcher.devices[group] != launcher.devices[old]
        # the group registered at once (in memory): the old width-1 worker is drained as it comes up
        manager._observe()
        await until(lambda: old in launcher.exited, 5, "the width-1 worker to be replaced")
        a = manager.allocation()["dit"]
        assert (a["workers"], a["width"], a["slots"]) == (1, 2, 2)
        assert manager.slots()["gpu"]["used"] == 3  # enc 1 + the group 2
        sig = manager.signals()["dit"]
        assert (sig.width, sig.slots, sig.workers, sig.draining) == (2, 2, 1, 0)
        # a second group does not fit in the one free slot: it waits, holding what it has, and
        # an exit gives it the rest
        manager.scale("dit", 1, "test: another group", width=2)
        await asyncio.sleep(0.1)
        assert manager.allocation()["dit"]["starting"] == 1 and manager.slots()["gpu"]["used"] == 4
        policy.targets.update(enc=0)
        manager.scale("enc", -1, "test: make room")
        await until(lambda: manager.allocation()["dit"]["workers"] == 2, 5, "the second group to start")
        assert manager.slots()["gpu"]["used"] == 4
        assert [launcher.widths[w] for w, _ in launcher.started if w.startswith("dit-")] == [1, 2, 2]
    finally:
        await manager.stop(timeout=5)
        await broker.stop()
    assert manager.pools[True].used == 0


async def test_a_launcher_without_groups_starts_width_1_workers_and_says_so(tmp_path, caplog):
    wf = tmp_path / "wide.toml"
    wf.write_text(WIDE + SYNTHETIC_PARAMS)
    broker = Broker(load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*",
                                  rest_port=free_port(), transport="shm", workflows=[str(wf)], heartbeat_s=60.0))
    await broker.start()
    manager = Manager(broker, MemoryLauncher(broker), StaticPolicy({"enc": 1, "dit": 1}), gpu_slots=4,
                      cpu_slots=0, period_s=60.0)
    try:
        await manager.start()
        with pytest.raises(ValueError, match="width must be an integer >= 1"):
            manager.scale("dit", 1, "test", width=0)
        manager.scale("dit", 1, "test: a group of 2", width=2)
        assert "cannot start sequence-parallel groups" in caplog.text
        await until(lambda: manager.allocation()["dit"]["workers"] == 2, 5, "a second width-1 worker")
        assert manager.slots()["gpu"]["used"] == 3 and "width" not in manager.allocation()["dit"]
    finally:
        await manager.stop(timeout=5)
        await broker.stop()


async def test_memory_measured_at_start_above_the_declared_places_the_next_workers_by_it(tmp_path):
    """On CUDA a worker reports the memory it holds once loaded (``info.memory_gb``, see
    stages/kinds.py); no GPU here, so the workers (registrations only) report 30 GB for s1, which
    declares 2 GB resident and 25 GB at its peak: the next s1 is placed for 53 GB."""
    wf = tmp_path / "packed.toml"
    wf.write_text(PACKED + SYNTHETIC_PARAMS)
    broker = Broker(load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*",
                                  rest_port=free_port(), transport="shm", workflows=[str(wf)], heartbeat_s=60.0))
    await broker.start()

    class Measuring(MemoryLauncher):
        def info(self, stage: str) -> dict:
            return {**super().info(stage), **({"memory_gb": 30.0} if stage == "s1" else {})}

    launcher = Measuring(broker)
    policy = StaticPolicy({"s1": 1, "s2": 0, "s3": 0, "big": 0})
    manager = Manager(broker, launcher, policy, gpu_slots=2, cpu_slots=0, period_s=60.0, gpu_memory_gb=80.0,
                      gpu_max_load=1.0)
    try:
        await manager.start()
        assert manager.pools[True].needs["s1"].peak_gb == 25.0
        manager._observe()
        need = manager.pools[True].needs["s1"]
        assert (need.memory_gb, need.peak_gb) == (30.0, 53.0)
        manager.scale("s1", 1, "test: a second s1")
        await until(lambda: manager.allocation()["s1"]["workers"] == 2, 5, "the second s1")
        # placed for 53 GB, best fit: beside the first (25 + 53 of 80 GB), not alone on the empty GPU
        gpus = manager.slots()["gpu"]["gpus"]
        assert sorted(g["used_gb"] for g in gpus) == [0.0, 78.0]
    finally:
        await manager.stop(timeout=5)
        await broker.stop()
