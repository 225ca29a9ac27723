"""Ray as the cluster engine: the node manager starts and drains workers through Ray
(``onepiece manager --launcher ray --ray-address HOST:6379``; ``pip install 'onepiece[ray]'``).

* Each worker is a Ray actor (:class:`_WorkerActor`) that Ray places by its resources: one CPU,
  and ``num_gpus`` for a stage that needs a GPU. The actor runs ``onepiece worker`` as its child
  process (the same command the local launcher runs), listening on the node's address and
  advertising it, and with ``PR_SET_PDEATHSIG`` so the worker dies with its actor.
* A k-GPU denoise group (``sp=k``) is a placement group of k bundles with ``STRICT_PACK`` (all
  on one node, where the group's ranks talk through torch.distributed): the worker's actor sits in
  bundle 0, one reservation actor in each other bundle, and the worker is started with
  ``--sp k`` and every bundle's GPUs in ``CUDA_VISIBLE_DEVICES``.
* Workers are spread over the nodes (``SPREAD``) unless told otherwise.
* Death of a worker, of its actor or of its node shows in :meth:`workers` within ``poll_s``; the
  node manager then reports it lost to the broker (manager/service.py), which re-makes its work
  as for any lost worker. GPU pinning is Ray's: the manager's ``CUDA_VISIBLE_DEVICES`` is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Collection

from .launcher import LocalLauncher, PolledLauncher, WorkerHandle

log = logging.getLogger("onepiece.launcher")


class RayLauncherError(RuntimeError):
    """Ray is missing or the cluster cannot be reached or cannot place a worker."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _WorkerActor:
    """One worker process on the node Ray placed this actor on (made a Ray actor class on use)."""

    def __init__(self, argv: list[str], env: dict[str, str], gpu_ids: list[str] | None = None):
        import subprocess
        import sys

        import ray

        self.node = ray.util.get_node_ip_address()
        env = {**os.environ, **env}
        ids = [*map(str, ray.get_gpu_ids()), *(gpu_ids or [])]  # its own bundle's, then the group's others
        if ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        argv = [sys.executable, *argv, "--data-host", "0.0.0.0", "--advertise-host", self.node]
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def where(self) -> tuple[str, int]:
        return self.node, self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def drain(self, timeout: float) -> int | None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class _Reservation:
    """Holds one bundle of a group's placement group and says which GPUs it got."""

    def gpu_ids(self) -> list[str]:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]


class RayLauncher(PolledLauncher):
    """Workers as Ray actors on a Ray cluster (see the module docstring)."""

    def __init__(self, settings, address: str | None = None, *, gpu_stages: Collection[str] = (),
                 strategy: str = "SPREAD", poll_s: float = 1.0, place_timeout_s: float = 300.0,
                 temp_dir: str | None = None):
        """``gpu_stages``: the stages whose workers need a GPU each (``num_gpus=1``; none on a
        cluster without GPUs, or with ``--device cpu``: they run on the CPU there). ``temp_dir``: the
        session directory of a local cluster (no ``address``: Ray starts one here)."""
        try:
            import ray
        except ImportError as exc:
            raise RayLauncherError("the ray launcher needs Ray: pip install 'onepiece[ray]'") from exc
        self.ray = ray
        self.settings = settings
        super().__init__(poll_s)
        self.strategy = strategy
        self.place_timeout_s = place_timeout_s
        self._local = LocalLauncher(settings)  # the worker command and its secrets, as for local workers
        try:
            local = {"_temp_dir": temp_dir} if address is None and temp_dir else {}
            ray.init(address=address, namespace="onepiece", ignore_reinit_error=True, log_to_driver=False,
                     configure_logging=False, **local)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: say where and why
            raise RayLauncherError(f"cannot join the Ray cluster at {address or 'a new local one'}: {exc}") from exc
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        self.gpu_stages = set(gpu_stages) if cluster_gpus and settings.device != "cpu" else set()
        if gpu_stages and not self.gpu_stages:
            log.warning("ray launcher: %s; the GPU stages' workers run on the CPU",
                        "--device cpu" if cluster_gpus else "the Ray cluster has no GPU")
        self._actor = ray.remote(_WorkerActor)
        self._reserve = ray.remote(_Reservation)
        log.info("ray launcher: cluster %s, %s", address or "local", {k: v for k, v in ray.cluster_resources().items()
                                                                    if k in ("CPU", "GPU", "memory")})

    async def start(self, workflow: str, stage: str, *, env: dict[str, str] | None = None,
                    sp: int = 1) -> WorkerHandle:
        if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
            raise ValueError(f"sp must be an integer >= 1, not {sp!r}")
        worker_id = f"{stage}-{uuid.uuid4().hex[:8]}"
        argv = self._local.command(workflow, stage, worker_id, sp if sp != 1 else None)[1:]
        env = {k: v for k, v in {**self._local._secrets(), **(env or {})}.items() if k != "CUDA_VISIBLE_DEVICES"}
        gpus = 1.0 if stage in self.gpu_stages else 0.0
        extra: dict = {}
        if sp == 1:
            actor = self._actor.options(name=worker_id, num_cpus=1, num_gpus=gpus,
                                        scheduling_strategy=self.strategy).remote(argv, env)
        else:
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
            group = placement_group([bundle] * sp, strategy="STRICT_PACK", name=f"{worker_id}-group")
            try:
                await asyncio.wait_for(group.ready(), self.place_timeout_s)
            except (TimeoutError, asyncio.TimeoutError) as exc:
                remove_placement_group(group)
                raise RayLauncherError(f"Ray could not place a group of {sp} x {bundle} on one node within "
                                       f"{self.place_timeout_s:.0f} s") from exc

            def in_bundle(i: int) -> PlacementGroupSchedulingStrategy:
                return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i)

            holders = [self._reserve.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=in_bundle(i)).remote()
                       for i in range(1, sp)]
            ids = [g for ref in await asyncio.gather(*(h.gpu_ids.remote() for h in holders)) for g in ref]
            actor = self._actor.options(name=worker_id, num_cpus=1, num_gpus=gpus,
                                        scheduling_strategy=in_bundle(0)).remote(argv, env, ids or None)
            extra.update(group=group, holders=holders)
            if ids:  # the actor adds its own GPUs (bundle 0) to these
                extra["gpu_ids"] = ids
        handle = WorkerHandle(worker_id, workflow, stage, extra={"actor": actor, **extra})
        self._handles[worker_id] = handle
        try:
            node, pid = await asyncio.wait_for(actor.where.remote(), self.place_timeout_s)
        except Exception as exc:  # noqa: BLE001 - not placed in time, or the actor failed at start
            await self.kill(handle)
            raise RayLauncherError(f"Ray did not start worker {worker_id} of {stage}: {exc!r}") from exc
        handle.extra.update(node=node, pid=pid)
        self._watch()
        log.info("started worker %s on Ray node %s (pid %d%s)", worker_id, node, pid,
                 f", a group of {sp}" if sp != 1 else "")
        return handle

    async def drain(self, handle: WorkerHandle, timeout: float = 600.0) -> int | None:
        handle.draining = True
        code = None
        try:
            code = await asyncio.wait_for(handle.extra["actor"].drain.remote(timeout), timeout + 30)
        except Exception as exc:  # noqa: BLE001 - the actor or its node is gone: nothing left to drain
            log.warning("worker %s: drain through Ray failed (%r); killing its actor", handle.id, exc)
        await self.kill(handle)
        return code

    async def kill(self, handle: WorkerHandle) -> None:
        ray = self.ray
        for actor in [handle.extra.get("actor"), *handle.extra.get("holders", ())]:
            if actor is not None:
                try:
                    ray.kill(actor)  # the worker process dies with it (PR_SET_PDEATHSIG)
                except Exception as exc:  # noqa: BLE001 - already dead
                    log.debug("ray.kill(%s): %r", handle.id, exc)
        if handle.extra.get("group") is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(handle.extra["group"])
            except Exception as exc:  # noqa: BLE001
                log.debug("remove_placement_group(%s): %r", handle.id, exc)
        self._handles.pop(handle.id, None)

    async def _check(self) -> None:
        """Forget workers whose process, actor or node is gone."""
        for wid, h in list(self._handles.items()):
            if h.draining:
                continue
            try:
                code = await asyncio.wait_for(h.extra["actor"].poll.remote(), max(5.0, 5 * self.poll_s))
            except (TimeoutError, asyncio.TimeoutError):
                continue  # a busy or slow node: ask again next time (a dead one raises)
            except Exception as exc:  # noqa: BLE001 - RayActorError: the actor or its node died
                log.warning("worker %s: its Ray actor on %s is gone: %s", wid, h.extra.get("node"),
                            str(exc).splitlines()[0][:200])
                self._handles.pop(wid, None)
                continue
            if code is not None:
                log.warning("worker %s on %s exited with %s", wid, h.extra.get("node"), code)
                await self.kill(h)
