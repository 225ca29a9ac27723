"""A whole local stack in one place: broker, REST API, node manager and stage workers.

``onepiece up`` and ``make demo`` both run this. Start-up order: broker
(control plane), REST API, then the node manager, which launches workers
through the launcher: with the default ``NoScaling`` policy,
``workers_per_stage`` of each stage, started once and left alone; with
another policy, whatever it decides (its floors at first). Ready when every
stage has a live worker, except those the policy starts on demand.
Shutdown is the reverse: the manager stops deciding and drains its workers
(they finish in-flight work), the launcher drains any others, then the API
and the broker stop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from broker.api import start_api
from broker.service import Broker
from manager.launcher import LocalLauncher
from manager.policy import NoScaling
from manager.service import Manager, default_cpu_slots, default_gpu_slots

log = logging.getLogger("onepiece.stack")



class Stack:
    def __init__(self, settings, *, workers_per_stage: int = 1, launcher=None, policy=None,
                 gpu_slots: int | None = None, cpu_slots: int | None = None, period_s: float = 5.0,
                 gpu_memory_gb: float | None = None, gpu_max_load: float = 1.0):
        self.settings = settings
        self.workers_per_stage = workers_per_stage
        self.broker: Broker | None = None
        self.launcher = launcher
        self.policy = policy
        self.gpu_slots, self.cpu_slots, self.period_s = gpu_slots, cpu_slots, period_s
        self.gpu_memory_gb = gpu_memory_gb  # memory of a GPU slot: the manager then packs workers by memory
        self.gpu_max_load = gpu_max_load  # ... and their declared gpu_load up to this per GPU
        self.manager: Manager | None = None
        self._runner = None
        self.rest_port = settings.rest_port

    @property
    def url(self) -> str:
        return f"http://{self.settings.rest_host}:{self.rest_port}"

    async def start(self, *, ready_timeout: float = 300.0) -> None:
        self.broker = Broker(self.settings)
        await self.broker.start()
        # Workers must reach the port the broker really bound ("tcp://host:*" is allowed).
        self.settings = self.settings.replace(control=self.broker.endpoint)
        self._runner, self.rest_port = await start_api(self.broker, self.settings.rest_host, self.settings.rest_port)
        log.info("REST API on %s", self.url)
        if self.launcher is None:
            self.launcher = LocalLauncher(self.settings)
        self.manager = self._manager()
        await self.manager.start()  # it adds itself to broker.extensions: the API shows its allocation
        if isinstance(self.manager.policy, NoScaling) and self.workers_per_stage:
            for stage in self.manager.gpu:  # a fixed allocation: started once, left alone
                self.manager.scale(stage, self.workers_per_stage, "initial allocation (--workers)")
        await self.wait_ready(ready_timeout)

    def _manager(self) -> Manager:
        """The node manager, with pools sized from the hardware unless given."""
        policy = self.policy if self.policy is not None else NoScaling()
        stages = {s: spec.gpu for wf in self.broker.workflows.values() for s, spec in wf.stages.items()}
        gpu_slots, cpu_slots, pinned = self.gpu_slots, self.cpu_slots, False
        if gpu_slots is None:
            gpu_slots, pinned = default_gpu_slots()
            if not pinned:  # no GPU: a slot is a CPU worker, and a laptop may run more workers than cores
                gpu_slots = max(gpu_slots, sum(max(1, self.workers_per_stage) for gpu in stages.values() if gpu))
        if cpu_slots is None:
            cpu_slots = max(default_cpu_slots(), sum(max(1, self.workers_per_stage)
                                                     for gpu in stages.values() if not gpu))
        return Manager(self.broker, self.launcher, policy, gpu_slots=gpu_slots, cpu_slots=cpu_slots,
                       gpu_memory_gb=self.gpu_memory_gb, gpu_max_load=self.gpu_max_load if self.gpu_memory_gb else None,
                       period_s=self.period_s, pin_gpus=pinned)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while missing := self.broker.missing_stages():
            if time.monotonic() > deadline:
                raise TimeoutError(f"stages without a worker after {timeout:.0f} s: {', '.join(missing)}")
            if not self.launcher.workers() and not any(a["starting"] for a in self.manager.allocation().values()):
                raise RuntimeError("every worker process exited; see the log above")
            await asyncio.sleep(0.1)
        log.info("ready: every stage has a worker")

    async def stop(self, drain_timeout: float = 30.0) -> None:
        if self.manager is not None:
            await self.manager.stop(drain_timeout)
            self.manager = None
        if self.launcher is not None:
            await self.launcher.aclose(drain_timeout)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
