"""The ``onepiece`` command.

    onepiece up        broker + REST API + node manager + stage workers, on this machine
    onepiece broker    the broker and its REST API alone (compose, Kubernetes)
    onepiece manager   the node manager alone, next to a broker reached over REST
    onepiece worker    one stage worker
    onepiece submit    submit an image over REST, follow it, save the video
    onepiece status    stages, workers and recent jobs of a running broker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .config import load_settings
from .heap import freeze_startup_heap

log = logging.getLogger("onepiece")


#: Settings field -> (flag, type, help). A flag left unset (None) keeps the file/env/default value.
SETTINGS_FLAGS = {
    "control": ("--control", str, "ZeroMQ endpoint of the broker (default tcp://127.0.0.1:5555)"),
    "data_dir": ("--data-dir", Path, "job store and results folder (default .onepiece)"),
    "transport": ("--transport", str, "data plane: shm, tcp, rdma or auto (default shm)"),
    "model": ("--model", str, "'tiny' (default) or a local diffusers directory"),
    "device": ("--device", str, "torch device (default: cuda when present)"),
    "dtype": ("--dtype", str, "torch dtype of the model, e.g. bfloat16"),
    "heartbeat_s": ("--heartbeat-s", float, "heartbeat interval in seconds (default 2.5)"),
    "liveness": ("--liveness", int, "missed heartbeats before a peer is dead (default 3)"),
    "rest_host": ("--rest-host", str, "REST API address (default 127.0.0.1)"),
    "rest_port": ("--rest-port", int, "REST API port (default 8000)"),
    "data_host": ("--data-host", str, "address the data-plane endpoint listens on"),
    "advertise_host": ("--advertise-host", str, "address peers use to reach this worker"),
    "ring_bytes": ("--ring-bytes", int, "bytes of each inbound ring (shm/rdma; default 32 MiB)"),
    "capacity": ("--capacity", int, "tasks a worker runs at once (default 1)"),
    "rdma_device": ("--rdma-device", str, "RDMA device, e.g. mlx5_0 (default: first with an active port)"),
    "rdma_port": ("--rdma-port", int, "RDMA port number (default 1)"),
    "rdma_gid_index": ("--rdma-gid-index", int, "GID index (default: RoCEv2 IPv4-mapped, else 0)"),
    "max_attempts": ("--max-attempts", int, "attempts per stage before a job fails (default 3)"),
    "job_deadline_s": ("--job-deadline-s", float, "a job not ended this long after submission fails (default 3600)"),
    "progress_floor_s": ("--progress-floor-s", float,
                         "least silence after which a task is lost and re-run (default 30)"),
    "progress_cap_s": ("--progress-cap-s", float, "most silence after which a task is lost and re-run (default 900)"),
    "orphan_bytes": ("--orphan-bytes", int, "data-plane bytes kept for tasks not yet assigned (default 64 MiB)"),
    "send_timeout_s": ("--send-timeout-s", float, "one attempt to send a task's outputs (default 60)"),
    "task_timeout_s": ("--task-timeout-s", float, "one run of a stage before it is failed (default 3600)"),
}


def _settings_args(p: argparse.ArgumentParser, *names: str) -> None:
    """Add the SETTINGS_FLAGS of ``names`` to a subcommand."""
    for name in names:
        flag, typ, help_ = SETTINGS_FLAGS[name]
        p.add_argument(flag, dest=name, type=typ, default=None, help=help_)


def _settings(args):
    overrides = {k: getattr(args, k, None) for k in SETTINGS_FLAGS}
    if getattr(args, "workflows", None):
        overrides["workflows"] = args.workflows
    return load_settings(args.config, **overrides)


def _run(coro) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)  # a second Ctrl-C now interrupts the shutdown


def _floors(items: list[str] | None) -> dict[str, int]:
    floors = {}
    for item in items or []:
        stage, _, n = item.partition("=")
        if not stage or not n.isdigit():
            raise SystemExit(f"error: --floor takes STAGE=N with N >= 0, not {item!r}")
        floors[stage] = int(n)
    return floors


def _policy(args, settings):
    """The node manager's policy from --policy, --floor and --workers."""
    from manager.policy import NoScaling, PolicyConfig, ProportionalPolicy, StaticPolicy
    from stages.workflow import load_workflow

    floors = _floors(args.floor)
    stages = {s for w in settings.workflows for s in load_workflow(w).stages}
    unknown = set(floors) - stages
    if unknown:
        raise SystemExit(f"error: --floor names unknown stage(s) {', '.join(sorted(unknown))}; "
                         f"stages: {', '.join(sorted(stages))}")
    if args.policy == "none":
        return NoScaling()
    if args.policy == "static":
        return StaticPolicy({s: floors.get(s, args.workers) for s in sorted(stages)})
    return ProportionalPolicy(PolicyConfig(floors=floors, default_floor=args.workers, period_s=args.period))


# -- commands --------------------------------------------------------------------------
async def cmd_up(args) -> int:
    from .stack import Stack

    settings = _settings(args)
    stack = Stack(settings, workers_per_stage=args.workers, policy=_policy(args, settings), gpu_slots=args.slots,
                  cpu_slots=args.cpu_slots, period_s=args.period)
    try:
        await stack.start(ready_timeout=args.ready_timeout)
    except BaseException:
        await stack.stop()
        raise
    freeze_startup_heap()
    print(f"OnePiece is up: REST API on {stack.url} (transport {settings.transport}, model {settings.model}). "
          f"Ctrl-C stops it.", flush=True)
    try:
        await _until_signal()
    finally:
        print("stopping: draining workers...", flush=True)
        await stack.stop()
    return 0


async def cmd_broker(args) -> int:
    from broker.api import start_api
    from broker.service import Broker

    settings = _settings(args)
    broker = Broker(settings)
    await broker.start()
    runner, port = await start_api(broker, settings.rest_host, settings.rest_port)
    log.info("REST API on http://%s:%d", settings.rest_host, port)
    freeze_startup_heap()
    try:
        await _until_signal()
    finally:
        await runner.cleanup()
        await broker.stop()
    return 0


async def cmd_manager(args) -> int:
    from manager.remote import RemoteBroker, start_manager_api
    from manager.service import Manager, default_cpu_slots, default_gpu_slots

    settings = _settings(args)
    remote = RemoteBroker(args.broker_url, settings.workflows)
    if args.launcher == "compose":
        from manager.compose import ComposeLauncher

        launcher = ComposeLauncher(args.compose_file, project=args.compose_project, service=lambda stage: stage)
    else:
        from manager.launcher import LocalLauncher

        launcher = LocalLauncher(settings)
    gpu_slots, pinned = (args.slots, False) if args.slots else default_gpu_slots()
    manager = Manager(remote, launcher, _policy(args, settings), gpu_slots=gpu_slots,
                      cpu_slots=args.cpu_slots or default_cpu_slots(), period_s=args.period, pin_gpus=pinned)
    await remote.start()
    runner = None
    try:
        await manager.start()
        runner = await start_manager_api(manager, settings.rest_host, args.port)
        log.info("node manager for %s: %s launcher, metrics on http://%s:%d/metrics", args.broker_url,
                 args.launcher, settings.rest_host, args.port)
        await _until_signal()
    finally:
        await manager.stop()
        if runner is not None:
            await runner.cleanup()
        await remote.stop()
    return 0


async def cmd_worker(args) -> int:
    from stages.workflow import load_workflow
    from stages.worker import Worker

    settings = _settings(args)
    workflow = load_workflow(args.workflow)
    # "{host}" lets a container name itself after its hostname (the compose launcher matches on it).
    worker_id = args.worker_id.format(host=socket.gethostname(), pid=os.getpid()) if args.worker_id else None
    return await Worker(settings, workflow, args.stage, worker_id=worker_id, freeze_heap=True).run()


async def cmd_submit(args) -> int:
    import aiohttp

    from . import client

    image = Path(args.image).read_bytes() if args.image else None
    params = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                  width=args.width, num_frames=args.frames, steps=args.steps,
                  guidance_scale=args.guidance_scale, seed=args.seed, workflow=args.workflow)
    async with aiohttp.ClientSession() as session:
        try:
            job_id = await client.submit(session, args.url, image, **params)
            print(f"job {job_id} submitted", file=sys.stderr)
            bar = client.ProgressBar() if not args.quiet else (lambda e: None)
            await client.wait(session, args.url, job_id, bar)
            if args.out:
                n = await client.download(session, args.url, job_id, Path(args.out))
                print(f"saved {args.out} ({n} bytes)")
        except client.JobFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except aiohttp.ClientConnectorError as exc:
            print(f"error: cannot reach the broker at {args.url}: {exc}", file=sys.stderr)
            return 2
    return 0


async def cmd_status(args) -> int:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{args.url}/v1/stages") as resp:
                overview = await resp.json()
            async with session.get(f"{args.url}/v1/jobs", params={"limit": str(args.jobs)}) as resp:
                jobs = (await resp.json()) if resp.status == 200 else {"jobs": []}
    except aiohttp.ClientConnectorError as exc:
        print(f"error: cannot reach the broker at {args.url}: {exc}", file=sys.stderr)
        return 2
    print(f"{'stage':<16}{'workers':>8}{'busy':>6}{'queued':>8}  workers (load/capacity)")
    for name, s in overview.get("stages", {}).items():
        ws = " ".join(f"{w['id']}({w['load']}/{w['capacity']}{',draining' if w['draining'] else ''})"
                      for w in s["workers"])
        print(f"{name:<16}{len(s['workers']):>8}{s['busy']:>6}{s['queued']:>8}  {ws}")
    if overview.get("missing"):
        print(f"stages without workers: {', '.join(overview['missing'])}")
    if overview.get("allocation"):
        pools = ", ".join(f"{p} {v['used']}/{v['total']}" for p, v in (overview.get("slots") or {}).items())
        print(f"\nallocation (slots used: {pools})")
        print(f"{'stage':<16}{'pool':>5}{'workers':>8}{'starting':>9}{'draining':>9}{'target':>7}")
        for name, a in overview["allocation"].items():
            print(f"{name:<16}{a['pool']:>5}{a['workers']:>8}{a['starting']:>9}{a['draining']:>9}{a['target']:>7}")
        for d in (overview.get("decisions") or [])[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(d["ts"]))
            print(f"  {when} {d['stage']} {d['delta']:+d}: {d['reason']}")
    rows = jobs.get("jobs", jobs if isinstance(jobs, list) else [])
    if rows:
        print(f"\n{'job':<34}{'workflow':<12}{'state':<11}reason")
        for j in rows:
            print(f"{j['id']:<34}{j['workflow']:<12}{j['state']:<11}{j.get('reason') or ''}")
    return 0


def _manager_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1,
                    help="workers per stage: the floor of each stage (proportional), or its fixed count "
                         "(static, none) (default 1)")
    p.add_argument("--policy", choices=("proportional", "static", "none"), default="proportional",
                    help="node manager policy: workers in proportion to load (default), fixed targets, "
                         "or start --workers per stage and never change")
    p.add_argument("--floor", action="append", metavar="STAGE=N",
                    help="workers a stage always keeps (0: scale to zero, started when a job needs it); "
                         "the target with --policy static; repeatable")
    p.add_argument("--slots", type=int, default=None,
                    help="GPU slots the manager allocates (default: CUDA devices found, else CPU cores)")
    p.add_argument("--cpu-slots", type=int, default=None, help="slots for CPU-only stages (default: CPU cores)")
    p.add_argument("--period", type=float, default=5.0, help="node manager control period, s (default 5)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onepiece", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML settings file (also ONEPIECE_CONFIG)")
    p.add_argument("--log-level", default=os.environ.get("ONEPIECE_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run broker, REST API, node manager and stage workers here")
    _settings_args(up, "control", "data_dir", "transport", "model", "device", "dtype", "heartbeat_s",
                   "liveness", "rest_host", "rest_port", "data_host", "ring_bytes", "max_attempts",
                   "job_deadline_s", "progress_floor_s", "progress_cap_s")
    up.add_argument("--workflows", nargs="+", help="workflows to serve (default wan_i2v)")
    _manager_args(up)
    up.add_argument("--ready-timeout", type=float, default=300.0)
    up.set_defaults(func=cmd_up)

    br = sub.add_parser("broker", help="run the broker and its REST API")
    _settings_args(br, "control", "data_dir", "heartbeat_s", "liveness", "rest_host", "rest_port", "max_attempts",
                   "job_deadline_s", "progress_floor_s", "progress_cap_s")
    br.add_argument("--workflows", nargs="+", help="workflows to serve (default wan_i2v)")
    br.set_defaults(func=cmd_broker)

    mg = sub.add_parser("manager", help="run the node manager next to a broker reached over REST")
    mg.add_argument("--broker-url", default="http://127.0.0.1:8000")
    _settings_args(mg, "control", "data_dir", "transport", "model", "device", "dtype", "heartbeat_s",
                   "liveness", "data_host", "ring_bytes", "rest_host")
    mg.add_argument("--workflows", nargs="+", help="workflows the broker serves (default wan_i2v)")
    mg.add_argument("--launcher", choices=("local", "compose"), default="local",
                    help="start workers as local processes or as docker compose replicas")
    mg.add_argument("--compose-file", default="docker/compose.yaml")
    mg.add_argument("--compose-project", default="onepiece")
    mg.add_argument("--port", type=int, default=8001, help="port of the manager's /metrics (default 8001)")
    _manager_args(mg)
    mg.set_defaults(func=cmd_manager)

    wk = sub.add_parser("worker", help="run one stage worker")
    wk.add_argument("--workflow", default="wan_i2v", help="workflow name or TOML path")
    wk.add_argument("--stage", required=True)
    wk.add_argument("--worker-id", default=None)
    _settings_args(wk, "control", "data_dir", "transport", "model", "device", "dtype", "heartbeat_s",
                   "liveness", "data_host", "advertise_host", "ring_bytes", "capacity", "rdma_device",
                   "rdma_port", "rdma_gid_index", "orphan_bytes", "send_timeout_s", "task_timeout_s")
    wk.set_defaults(func=cmd_worker)

    sb = sub.add_parser("submit", help="submit an image and save the video")
    sb.add_argument("image", nargs="?", help="input image (PNG/JPEG/WebP)")
    sb.add_argument("--prompt", required=True)
    sb.add_argument("--negative-prompt", default=None)
    sb.add_argument("--height", type=int, default=None)
    sb.add_argument("--width", type=int, default=None)
    sb.add_argument("--frames", type=int, default=None, help="number of frames (4k+1)")
    sb.add_argument("--steps", type=int, default=None)
    sb.add_argument("--guidance-scale", type=float, default=None)
    sb.add_argument("--seed", type=int, default=None)
    sb.add_argument("--workflow", default=None)
    sb.add_argument("--out", default="video.mp4")
    sb.add_argument("--url", default="http://127.0.0.1:8000")
    sb.add_argument("--quiet", action="store_true")
    sb.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="stages, workers and recent jobs")
    st.add_argument("--url", default="http://127.0.0.1:8000")
    st.add_argument("--jobs", type=int, default=10)
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        return _run(args.func(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
