"""A whole local stack in one place: broker, REST API and stage workers.

``onepiece up`` and ``make demo`` both run this. Start-up order: broker
(control plane), REST API, then one worker per stage through the launcher;
ready when every stage has a live worker. Shutdown is the reverse: drain
workers (they finish in-flight work), stop the API, stop the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from broker.api import start_api
from broker.service import Broker
from manager.launcher import LocalLauncher

log = logging.getLogger("onepiece.stack")


def workflow_ref(wf) -> str:
    """What a worker process is told to load: the workflow's file, so custom files work too."""
    return wf.source if Path(wf.source).is_file() else wf.name


class Stack:
    def __init__(self, settings, *, workers_per_stage: int = 1, launcher=None):
        self.settings = settings
        self.workers_per_stage = workers_per_stage
        self.broker: Broker | None = None
        self.launcher = launcher
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
        for wf in self.broker.workflows.values():
            for stage in wf.stages:
                for _ in range(self.workers_per_stage):
                    await self.launcher.start(workflow_ref(wf), stage)
        await self.wait_ready(ready_timeout)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while missing := self.broker.missing_stages():
            if time.monotonic() > deadline:
                raise TimeoutError(f"stages without a worker after {timeout:.0f} s: {', '.join(missing)}")
            if not self.launcher.workers():
                raise RuntimeError("every worker process exited; see the log above")
            await asyncio.sleep(0.1)
        log.info("ready: every stage has a worker")

    async def stop(self, drain_timeout: float = 30.0) -> None:
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
