"""Launchers: how workers are started and drained, behind one small interface.

``local`` (worker processes on this host) is implemented here; the
interface is what a ``compose`` or ``kubernetes`` launcher implements too:
start a worker of a stage, drain one (it finishes in-flight work,
deregisters and exits), kill one, close all.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass, field

log = logging.getLogger("onepiece.launcher")


@dataclass
class WorkerHandle:
    id: str
    workflow: str
    stage: str
    process: asyncio.subprocess.Process | None = None
    draining: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Launcher(abc.ABC):
    """Starts and stops stage workers."""

    @abc.abstractmethod
    async def start(self, workflow: str, stage: str, *, env: dict[str, str] | None = None,
                    sp: int = 1) -> WorkerHandle:
        """Start one worker of ``stage``; it registers with the broker by itself. ``env`` adds
        environment variables (the node manager pins GPUs with CUDA_VISIBLE_DEVICES). ``sp > 1``:
        a sequence-parallel group of that many processes (``onepiece worker --sp``), one GPU each."""

    @abc.abstractmethod
    async def drain(self, handle: WorkerHandle, timeout: float = 600.0) -> int | None:
        """Ask a worker to finish its work and leave; wait for it (kill after ``timeout``)."""

    @abc.abstractmethod
    async def kill(self, handle: WorkerHandle) -> None:
        """Stop a worker at once (SIGKILL): its tasks are re-dispatched by the broker."""

    @abc.abstractmethod
    def workers(self) -> list[WorkerHandle]:
        """The workers this launcher started that are still running."""

    async def aclose(self, timeout: float = 20.0) -> None:
        """Drain every worker (kill what does not leave in time)."""
        await asyncio.gather(*(self.drain(h, timeout) for h in self.workers()))


class PolledLauncher(Launcher):
    """A launcher whose workers live elsewhere (containers, Ray actors): it keeps their handles
    and, since :meth:`workers` is synchronous, polls every ``poll_s`` for the ones that ended on
    their own (:meth:`_check` forgets them)."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s
        self._handles: dict[str, WorkerHandle] = {}
        self._poller: asyncio.Task | None = None

    def _watch(self) -> None:
        """Start polling (once a worker has been started)."""
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name=f"{type(self).__name__}-poll")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._check()

    @abc.abstractmethod
    async def _check(self) -> None:
        """Forget the handles whose worker is no longer running (and say so)."""

    def workers(self) -> list[WorkerHandle]:
        return list(self._handles.values())

    async def aclose(self, timeout: float = 20.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        await super().aclose(timeout)


class LocalLauncher(Launcher):
    """Worker processes on this host: ``python -m onepiece.cli worker ...``."""

    def __init__(self, settings, *, extra_args: list[str] | None = None, env: dict | None = None):
        self.settings = settings
        self.extra_args = extra_args or []
        self.env = env
        self._handles: dict[str, WorkerHandle] = {}

    def command(self, workflow: str, stage: str, worker_id: str, sp: int | None = None) -> list[str]:
        s = self.settings
        sp = s.sp if sp is None else sp
        cmd = [sys.executable, "-m", "onepiece.cli", "worker", "--workflow", workflow, "--stage", stage,
               "--worker-id", worker_id, "--control", s.control, "--transport", s.transport,
               "--model", s.model, "--data-dir", str(s.data_dir), "--heartbeat-s", str(s.heartbeat_s),
               "--liveness", str(s.liveness), "--data-host", s.data_host, "--ring-bytes", str(s.ring_bytes),
               "--capacity", str(s.capacity), "--checkpoint-steps", str(s.checkpoint_steps),
               "--checkpoint-s", str(s.checkpoint_s), "--checkpoint-bytes", str(s.checkpoint_bytes)]
        if s.device:
            cmd += ["--device", s.device]
        if s.dtype:
            cmd += ["--dtype", s.dtype]
        if s.curve_broker is not None:  # CURVE: the worker's certificate and the broker's public one
            cmd += ["--curve-secret", str(s.curve_secret), "--curve-broker", str(s.curve_broker)]
        if s.results:  # the result store (its credentials go by environment: see start)
            cmd += ["--results", s.results, "--s3-region", s.s3_region]
            if s.s3_endpoint:
                cmd += ["--s3-endpoint", s.s3_endpoint]
        if sp != 1:
            cmd += ["--sp", str(sp)]
        return cmd + self.extra_args

    def _secrets(self) -> dict[str, str]:
        """Settings a worker needs that must not show in its command line (``ps``)."""
        s = self.settings
        pairs = {"ONEPIECE_S3_ACCESS_KEY_ID": s.s3_access_key_id, "ONEPIECE_S3_SECRET_ACCESS_KEY": s.s3_secret_access_key}
        return {k: v for k, v in pairs.items() if v}

    async def start(self, workflow: str, stage: str, *, env: dict[str, str] | None = None,
                    sp: int = 1) -> WorkerHandle:
        if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
            raise ValueError(f"sp must be an integer >= 1, not {sp!r}")
        worker_id = f"{stage}-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, **self._secrets(), **(self.env or {}), **(env or {})}
        cmd = self.command(workflow, stage, worker_id, sp if sp != 1 else None)
        process = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL)
        handle = WorkerHandle(worker_id, workflow, stage, process)
        self._handles[worker_id] = handle
        log.info("started worker %s (pid %d%s)", worker_id, process.pid, f", a group of {sp}" if sp != 1 else "")
        return handle

    async def drain(self, handle: WorkerHandle, timeout: float = 600.0) -> int | None:
        if not handle.alive:
            self._handles.pop(handle.id, None)
            return handle.process.returncode if handle.process else None
        handle.draining = True
        handle.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                code = await handle.process.wait()
        except TimeoutError:
            log.warning("worker %s did not drain in %.0f s: killing it", handle.id, timeout)
            await self.kill(handle)
            code = handle.process.returncode
        self._handles.pop(handle.id, None)
        return code

    async def kill(self, handle: WorkerHandle) -> None:
        if handle.alive:
            handle.process.kill()
            await handle.process.wait()
        self._handles.pop(handle.id, None)

    def workers(self) -> list[WorkerHandle]:
        for wid in [w for w, h in self._handles.items() if not h.alive]:
            log.warning("worker %s exited with %s", wid, self._handles[wid].process.returncode)
            del self._handles[wid]
        return list(self._handles.values())
