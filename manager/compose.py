"""Workers as replicas of docker compose services: one service per stage.

A start scales the stage's service up by one (``docker compose up -d
--no-recreate --no-deps --scale SERVICE=N SERVICE``) and finds the new
container; a drain stops that container (``docker stop --time T``: SIGTERM,
which makes a worker drain, then SIGKILL after T seconds), reads its exit
code and removes it, so a later ``--scale`` counts only live replicas.

Each service must run the worker with its container's hostname as its
worker id, which is how a handle here and a registration at the broker are
matched, e.g.::

    worker-denoise:
      image: onepiece
      command: ["worker", "--stage", "denoise", "--worker-id", "{host}"]

Docker names a container's hostname after the first 12 characters of its id.
The commands run through ``run`` (an async callable taking an argv and
returning ``(exit status, stdout)``), so a test checks them without Docker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .launcher import PolledLauncher, WorkerHandle

__all__ = ["ComposeError", "ComposeLauncher"]

log = logging.getLogger("onepiece.launcher.compose")

Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


class ComposeError(RuntimeError):
    """A docker compose command failed; the message has the command and its output."""


async def run_command(argv: list[str]) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
    except FileNotFoundError as exc:
        raise ComposeError(f"{argv[0]} not found: the compose launcher needs the docker CLI") from exc
    out, _ = await proc.communicate()
    return proc.returncode, out.decode(errors="replace")


class ComposeLauncher(PolledLauncher):
    """Stage workers as docker compose service replicas (see the module docstring)."""

    def __init__(self, compose_file: str, *, project: str | None = None,
                 service: Callable[[str], str] = lambda stage: f"worker-{stage}", run: Runner = run_command,
                 docker: str = "docker", poll_s: float = 5.0):
        self.compose = [docker, "compose", "-f", str(compose_file)] + (["-p", project] if project else [])
        self.docker = docker
        self.service = service
        self.run = run
        super().__init__(poll_s)
        self._locks: dict[str, asyncio.Lock] = {}

    async def _ok(self, argv: list[str]) -> str:
        code, out = await self.run(argv)
        if code != 0:
            raise ComposeError(f"{' '.join(argv)} exited with {code}: {out.strip()[-500:]}")
        return out

    async def _containers(self, service: str) -> list[str]:
        return (await self._ok(self.compose + ["ps", "-q", service])).split()

    async def start(self, workflow: str, stage: str, *, env: dict[str, str] | None = None,
                    sp: int = 1) -> WorkerHandle:
        if sp != 1:
            raise ComposeError(f"the compose launcher starts replicas of one service per stage: a group of {sp} "
                               "GPUs (sp) is declared in the compose file, not per start; use the local launcher "
                               "for elastic sequence parallelism")
        if env:
            # A replica of a compose service gets the service's environment; pin GPUs in the file.
            log.warning("compose launcher ignores per-worker environment %s", sorted(env))
        service = self.service(stage)
        async with self._locks.setdefault(service, asyncio.Lock()):  # two scale-ups must not race
            before = await self._containers(service)
            await self._ok(self.compose + ["up", "-d", "--no-recreate", "--no-deps", "--scale",
                                           f"{service}={len(before) + 1}", service])
            new = [c for c in await self._containers(service) if c not in before]
        if len(new) != 1:
            raise ComposeError(f"scaling {service} up by one started {len(new)} containers: {new}")
        cid = new[0]
        handle = WorkerHandle(cid[:12], workflow, stage, extra={"container": cid, "service": service})
        self._handles[handle.id] = handle
        self._watch()
        log.info("started worker %s (%s)", handle.id, service)
        return handle

    async def drain(self, handle: WorkerHandle, timeout: float = 600.0) -> int | None:
        cid = handle.extra["container"]
        handle.draining = True
        await self._ok([self.docker, "stop", "--time", str(max(1, round(timeout))), cid])
        code = await self._exit_code(cid)
        await self._ok([self.docker, "rm", cid])
        self._handles.pop(handle.id, None)
        return code

    async def kill(self, handle: WorkerHandle) -> None:
        await self._ok([self.docker, "rm", "-f", handle.extra["container"]])
        self._handles.pop(handle.id, None)

    async def _exit_code(self, cid: str) -> int | None:
        out = await self._ok([self.docker, "inspect", "--format", "{{.State.ExitCode}}", cid])
        return int(out.strip()) if out.strip().lstrip("-").isdigit() else None

    async def _check(self) -> None:
        """Forget containers that exited on their own."""
        try:
            running = set((await self._ok(self.compose + ["ps", "-q"])).split())
        except ComposeError as exc:
            log.warning("compose launcher: %s", exc)
            return
        for wid, h in list(self._handles.items()):
            if not h.draining and h.extra["container"] not in running:
                log.warning("worker %s (%s) is no longer running", wid, h.extra["service"])
                del self._handles[wid]
