"""The broker seen from a node manager in another process (compose, Kubernetes).

:class:`manager.service.Manager` reads the broker synchronously through
``onepiece.links.BrokerLink``. :class:`RemoteBroker` offers that interface
over the REST API: a background task refreshes a
snapshot of ``GET /v1/signals`` a few times a second, and drains are sent as
``POST /v1/workers/{id}/drain``. The manager's own metrics live in this
process's registry, served by :func:`start_manager_api`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from onepiece import client
from stages.workflow import load_workflow

log = logging.getLogger("onepiece.manager.remote")


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()


class BrokerRefused(Exception):
    """The broker refused the manager's API key (missing, invalid, or without admin)."""


class RemoteBroker:
    """A read-mostly proxy of a broker's REST API (see the module docstring)."""

    def __init__(self, url: str, workflows: list[str], *, refresh_s: float = 0.25, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key  # needs admin (signals, drain); default: $ONEPIECE_API_KEY
        self.workflows = {wf.name: wf for wf in map(load_workflow, workflows)}
        self.refresh_s = refresh_s
        self.metrics = _Metrics()
        self.snapshot: dict = {"signals": {}, "stages": {}}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    async def start(self, timeout: float = 120.0) -> None:
        """Connect and take a first snapshot (retrying while the broker starts)."""
        self._session = client.session(self.api_key, timeout=aiohttp.ClientTimeout(total=10))
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._refresh()
                break
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"broker at {self.url} unreachable for {timeout:.0f} s: {exc}") from exc
                log.info("waiting for the broker at %s: %s", self.url, exc)
                await asyncio.sleep(1.0)
        self._task = asyncio.get_running_loop().create_task(self._refreshing())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, *self._pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _refresh(self) -> None:
        async with self._session.get(f"{self.url}/v1/signals") as resp:
            if resp.status in (401, 403):  # no retry can fix a key: say so at once
                raise BrokerRefused(f"the broker at {self.url} refused the node manager (HTTP {resp.status}): "
                                    f"{await client.error_text(resp)}; give it an admin key (--api-key or "
                                    f"{client.API_KEY_ENV})")
            resp.raise_for_status()
            body = await resp.json()
        self.snapshot = {"signals": body["signals"], "stages": body["stages"]}

    async def _refreshing(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self._refresh()
            except (aiohttp.ClientError, OSError, TimeoutError, BrokerRefused) as exc:
                log.warning("broker at %s: %s (keeping the last snapshot)", self.url, exc)

    def stages(self) -> dict:
        return self.snapshot["stages"]

    def stage_signals(self, now: float) -> dict:
        return self.snapshot["signals"]

    def attach(self, name: str, extension) -> None:
        pass  # the broker's API is in another process: the manager serves its own (start_manager_api)

    def detach(self, name: str, extension) -> None:
        pass

    def metrics_registry(self):
        return self.metrics.registry

    def drain(self, worker_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(worker_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def lost(self, worker_id: str, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self._lost(worker_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _lost(self, worker_id: str) -> None:
        try:
            async with self._session.post(f"{self.url}/v1/workers/{worker_id}/lost") as resp:
                if resp.status not in (202, 404):  # 404: the broker noticed first
                    log.warning("lost report of %s refused (%d): %s", worker_id, resp.status, await resp.text())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("lost report of %s not delivered: %s (its heartbeats will lapse)", worker_id, exc)

    async def _drain(self, worker_id: str) -> None:
        try:
            async with self._session.post(f"{self.url}/v1/workers/{worker_id}/drain") as resp:
                if resp.status != 202:
                    log.warning("drain of %s refused (%d): %s", worker_id, resp.status, await resp.text())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("drain of %s not delivered: %s", worker_id, exc)


async def start_manager_api(manager, host: str, port: int) -> web.AppRunner:
    """``/metrics``, ``/v1/allocation`` and ``/healthz`` of a stand-alone manager."""

    async def metrics(request):
        return web.Response(body=generate_latest(manager.broker.metrics_registry()),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def allocation(request):
        body = {"allocation": manager.allocation(), "slots": manager.slots(), "decisions": manager.decisions(50)}
        return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))

    async def healthz(request):
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/allocation", allocation)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
