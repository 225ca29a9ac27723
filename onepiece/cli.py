"""The ``onepiece`` command.

    onepiece up        broker + REST API + node manager + stage workers, on this machine
    onepiece broker    the broker and its REST API alone (compose, Kubernetes)
    onepiece manager   the node manager alone, next to a broker reached over REST
    onepiece worker    one stage worker
    onepiece submit    submit a job over REST, follow it, save the video
    onepiece status    stages, workers and recent jobs of a running broker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

from broker.auth import SCOPES

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
    "grant_bytes": ("--grant-bytes", int, "bound of the worker's regions for large messages (shm/rdma; "
                                          "default 512 MiB; 0: they stream through the ring)"),
    "capacity": ("--capacity", int, "tasks a worker runs at once (default 1)"),
    "sp": ("--sp", int, "a denoise worker's sequence-parallel processes: 1, 2, 4 or 8 (default 1)"),
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
    "checkpoint_steps": ("--checkpoint-steps", int,
                         "a step-wise task leaves its state every this many steps (default 10; 0: not by steps)"),
    "checkpoint_s": ("--checkpoint-s", float,
                     "... or every this many seconds, whichever comes first (default 60; 0: not by time)"),
    "checkpoint_bytes": ("--checkpoint-bytes", int, "other workers' checkpoints kept here (default 512 MiB)"),
    "api_keys": ("--api-keys", Path, "REST API keys file (onepiece keys create); needed to serve REST on an "
                                     "address other than loopback"),
    "api_keys_init": ("--api-keys-init", Path, "at first start (no --api-keys file yet): create it with one admin "
                                               "key and write that key to this file (mode 0600)"),
    "curve_secret": ("--curve-secret", Path, "CURVE on the control plane: this process's certificate "
                                           "(NAME.key_secret, from onepiece keys curve)"),
    "curve_allow": ("--curve-allow", Path, "the broker's allow-list: a directory of the public certificates "
                                          "(NAME.key) of the workers and managers that may connect"),
    "curve_broker": ("--curve-broker", Path, "the broker's public certificate (broker.key), for a worker"),
    "curve_init": ("--curve-init", Path, "at first start, make the broker's CURVE pair, the workers' pair and "
                                        "the allow-list in this directory (compose)"),
    "results": ("--results", str, "the result store: a directory, or s3://bucket/prefix (credentials from "
                                  "ONEPIECE_S3_ACCESS_KEY_ID/_SECRET_ACCESS_KEY or boto3's own; default "
                                  "DATA_DIR/results)"),
    "s3_endpoint": ("--s3-endpoint", str, "S3-compatible endpoint URL for --results s3://... (default AWS)"),
    "s3_region": ("--s3-region", str, "S3 region (default us-east-1)"),
    "insecure": ("--insecure", None, "serve REST on a non-loopback address without API keys: anyone who can "
                                     "reach it controls the service (a warning is logged every minute)"),
}


def _settings_args(p: argparse.ArgumentParser, *names: str) -> None:
    """Add the SETTINGS_FLAGS of ``names`` to a subcommand."""
    for name in names:
        flag, typ, help_ = SETTINGS_FLAGS[name]
        if typ is None:  # a switch: given, it is true; absent, the settings decide
            p.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=help_)
        else:
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
    """The node manager's policy from --policy, --floor, --workers and --profile; the proportional
    one sizes the stages of a workflow that declares ``[slo]`` to meet it."""
    from manager.policy import NoScaling, PolicyConfig, ProportionalPolicy, StaticPolicy
    from manager.profile import ProfileError, load_profile
    from manager.slo import Objective
    from stages.workflow import load_workflow

    floors = _floors(args.floor)
    workflows = [load_workflow(w) for w in settings.workflows]
    stages = {s for wf in workflows for s in wf.stages}
    unknown = set(floors) - stages
    if unknown:
        raise SystemExit(f"error: --floor names unknown stage(s) {', '.join(sorted(unknown))}; "
                         f"stages: {', '.join(sorted(stages))}")
    if args.policy == "none":
        return NoScaling()
    if args.policy == "static":
        return StaticPolicy({s: floors.get(s, args.workers) for s in sorted(stages)})
    objectives = {wf.name: Objective(wf.slo.p95_s, {s: tuple(spec.after) for s, spec in wf.stages.items()})
                  for wf in workflows if wf.slo is not None}
    sp_efficiency: dict[str, dict[int, float]] = {}
    service_cv: dict[str, float] = {}
    for ref in getattr(args, "profile", None) or []:
        try:
            prof = load_profile(ref)
        except ProfileError as exc:
            raise SystemExit(f"error: --profile: {exc}") from None
        served = [s for s in prof.stages if s in stages]
        if not served:
            raise SystemExit(f"error: --profile {ref}: none of its stages ({', '.join(prof.stages)}) is served "
                             f"here; stages: {', '.join(sorted(stages))}")
        for s in served:
            st = prof.stages[s]
            service_cv[s] = st.cv
            if len(st.sp_efficiency) > 1:
                sp_efficiency[s] = dict(st.sp_efficiency)
    return ProportionalPolicy(PolicyConfig(floors=floors, default_floor=args.workers, period_s=args.period,
                                           objectives=objectives, sp_efficiency=sp_efficiency,
                                           service_cv=service_cv))


def _check_exposure(settings):
    """Make the first keys if asked (--api-keys-init, --curve-init), then refuse, before anything
    starts, to serve REST or the control socket beyond loopback without keys (or --insecure).
    Returns the settings, with the CURVE paths --curve-init made."""
    from broker.api import check_exposure
    from broker.auth import KeysError, exposure_error, init_keys
    from broker.curve import CurveError, init_dir
    from broker.errors import CoreError

    try:
        if settings.api_keys_init is not None:
            if settings.api_keys is None:
                raise SystemExit("error: --api-keys-init needs --api-keys (the keys file to create)")
            init_keys(settings.api_keys, settings.api_keys_init)
        if settings.curve_init is not None:
            made = init_dir(settings.curve_init)
            settings = settings.replace(curve_secret=settings.curve_secret or made["broker_secret"],
                                        curve_allow=settings.curve_allow or made["allow"])
        check_exposure(settings, settings.rest_host)
        host = _endpoint_host(settings.control)
        why = host and exposure_error(
            "the control socket", host, settings.curve_secret is not None, settings.insecure,
            how="Make CURVE key pairs with `onepiece keys curve broker --dir KEYS` (and one per worker host, its "
                "public .key file in an allow-list directory) and start with --curve-secret KEYS/broker.key_secret "
                "--curve-allow ALLOWDIR (workers: --curve-secret, --curve-broker KEYS/broker.key), or "
                "--curve-init DIR to make them all",
            risk="anyone who can reach it could register as a worker, receive other users' prompts and images, "
                 "and submit jobs")
        if why:
            raise SystemExit("error: " + why)
    except (CoreError, KeysError, CurveError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return settings


def _endpoint_host(endpoint: str) -> str | None:
    """The host a ZeroMQ tcp endpoint binds (None for ipc://, inproc://: this machine only)."""
    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    return "0.0.0.0" if host == "*" else host


# -- commands --------------------------------------------------------------------------
async def cmd_up(args) -> int:
    from .stack import Stack

    settings = _check_exposure(_settings(args))
    stack = Stack(settings, workers_per_stage=args.workers, policy=_policy(args, settings), gpu_slots=args.slots,
                  cpu_slots=args.cpu_slots, period_s=args.period, gpu_memory_gb=args.gpu_memory_gb,
                  gpu_max_load=_gpu_max_load(args) or 1.0)
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

    settings = _check_exposure(_settings(args))
    broker = Broker(settings)
    await broker.start()
    try:
        runner, port = await start_api(broker, settings.rest_host, settings.rest_port)
    except BaseException:
        await broker.stop()
        raise
    log.info("REST API on http://%s:%d", settings.rest_host, port)
    freeze_startup_heap()
    try:
        await _until_signal()
    finally:
        await runner.cleanup()
        await broker.stop()
    return 0


async def cmd_manager(args) -> int:
    from manager.remote import BrokerRefused, RemoteBroker, start_manager_api
    from manager.service import Manager, default_cpu_slots, default_gpu_slots

    settings = _settings(args)
    key = args.api_key
    if key is None and args.api_key_file is not None:
        from broker.auth import KeysError, read_token

        try:  # beside a broker that writes it at its first start: wait for it a while
            key = await asyncio.to_thread(read_token, args.api_key_file, 120.0)
        except KeysError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    remote = RemoteBroker(args.broker_url, settings.workflows, api_key=key)
    if args.launcher == "compose":
        from manager.compose import ComposeLauncher

        launcher = ComposeLauncher(args.compose_file, project=args.compose_project, service=lambda stage: stage)
    elif args.launcher == "ray":
        from manager.raylauncher import RayLauncher, RayLauncherError
        from stages.workflow import load_workflow

        gpu_stages = {s for w in settings.workflows for s, spec in load_workflow(w).stages.items() if spec.gpu}
        try:
            launcher = RayLauncher(settings, args.ray_address, gpu_stages=gpu_stages)
        except RayLauncherError as exc:
            await remote.stop()
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        from manager.launcher import LocalLauncher

        launcher = LocalLauncher(settings)
    gpu_slots, pinned = (args.slots, False) if args.slots else default_gpu_slots()
    manager = Manager(remote, launcher, _policy(args, settings), gpu_slots=gpu_slots,
                      cpu_slots=args.cpu_slots or default_cpu_slots(), period_s=args.period, pin_gpus=pinned,
                      gpu_memory_gb=args.gpu_memory_gb, gpu_max_load=_gpu_max_load(args))
    try:
        await remote.start()
    except BrokerRefused as exc:
        await remote.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


async def cmd_keys(args) -> int:
    """Make, list and revoke REST API keys in a keys file (broker/auth.py)."""
    from broker.auth import KeysError, add_key, list_keys, revoke_key
    from broker.curve import CurveError, make_keypair

    path = args.file or _settings(args).api_keys
    if path is None and args.keys_command != "curve":
        print("error: name the keys file with --file (or --api-keys / ONEPIECE_API_KEYS)", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "create":
            key_id, token = add_key(path, args.scope, args.name or "")
            print(token)
            print(f"key {key_id} ({', '.join(sorted(set(args.scope)))}) added to {path}. The line above is the "
                  "key: it is shown once and stored only as a hash. Clients send it as "
                  "'Authorization: Bearer <key>' (onepiece: --api-key or ONEPIECE_API_KEY).", file=sys.stderr)
        elif args.keys_command == "curve":
            public, secret = make_keypair(args.dir, args.name)
            print(f"{public}\n{secret}")
            print(f"CURVE pair {args.name}: give {secret.name} (0600) to that process (--curve-secret) only; "
                  f"copy {public.name} into the broker's --curve-allow directory to let it in (the broker's own "
                  f"{public.name} goes to its workers as --curve-broker)", file=sys.stderr)
        elif args.keys_command == "list":
            for e in list_keys(path):
                print(f"{e['id']}  {','.join(e['scopes']):<20} {e.get('created', ''):<21} {e.get('name', '')}")
        else:
            if not revoke_key(path, args.id):
                print(f"error: no key {args.id} in {path}", file=sys.stderr)
                return 1
            print(f"key {args.id} revoked (a broker reading {path} stops accepting it within a second)",
                  file=sys.stderr)
    except (KeysError, CurveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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

    images = {}
    for name in args.image_params:
        path = getattr(args, _dest(name))
        if name == "image" and args.image_path is not None:
            if path is not None:
                print("error: give the image once, as IMAGE or as --image", file=sys.stderr)
                return 2
            path = args.image_path
        if path is not None:
            try:
                images[name] = Path(path).read_bytes()
            except OSError as exc:
                print(f"error: cannot read {name} {path}: {exc.strerror or exc}", file=sys.stderr)
                return 2
    # only what was given: the broker fills in the defaults of its own declaration
    params = {name: value for name in args.value_params if (value := getattr(args, _dest(name))) is not None}
    image = images.pop("image", None)
    async with client.session(args.api_key) as session:
        try:
            job_id = await client.submit(session, args.url, image, workflow=args.submit_workflow, **images, **params)
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


# -- the options of `onepiece submit`, from the workflow's declaration --------------------

DEFAULT_URL = "http://127.0.0.1:8000"
#: Shorter spellings `onepiece submit` had before its options came from the declarations.
PARAM_ALIASES = {"num_frames": ("--frames",)}


class Declaration:
    """A workflow's name and params, as ``onepiece submit`` builds its options from them."""

    def __init__(self, workflow: str, params: dict, source: str):
        self.workflow, self.params, self.source = workflow, params, source


def _dest(name: str) -> str:
    return f"param_{name}"  # apart from the command's own options (url, out, ...)


def _get_json(url: str, timeout: float, key: str | None = None):
    import json
    import urllib.request

    from .client import auth_headers

    with urllib.request.urlopen(urllib.request.Request(url, headers=auth_headers(key)), timeout=timeout) as resp:
        return json.load(resp)


def fetch_declaration(url: str, workflow: str | None, timeout: float = 3.0, key: str | None = None) -> Declaration:
    """The params of ``workflow`` as the broker at ``url`` declares them (it is the one that checks
    them); the shipped workflow file of that name where the broker cannot be reached. None: the
    broker's default workflow (wan_i2v offline). A path to a TOML file is read as it is."""
    import json
    import urllib.error
    import urllib.parse

    from stages.params import param_from_table
    from stages.workflow import WorkflowError, load_workflow

    def from_file(name: str, why: str) -> Declaration:
        try:
            wf = load_workflow(name)
        except WorkflowError as exc:
            raise SystemExit(f"error: {exc}") from None
        return Declaration(wf.name, dict(wf.params), f"{wf.source}{why}")

    if workflow is not None and (workflow.endswith(".toml") or "/" in workflow):
        return from_file(workflow, "")
    offline = f" (the broker at {url} did not answer)"
    try:
        if workflow is None:
            listing = _get_json(f"{url}/v1/workflows", timeout, key)
            workflow = listing.get("default")
            if workflow is None:
                served = ", ".join(w["name"] for w in listing.get("workflows", []))
                raise SystemExit(f"error: the broker at {url} serves {served} and no default: pass --workflow")
        view = _get_json(f"{url}/v1/workflows/{urllib.parse.quote(workflow, safe='')}", timeout, key)
    except urllib.error.HTTPError as exc:
        try:
            body = json.load(exc)
        except ValueError:
            body = {}
        if (exc.code == 404 and body.get("field") == "name") or exc.code in (401, 403):
            raise SystemExit(f"error: {body.get('error')} (at {url})") from None
        # a broker without GET /v1/workflows, or one that is failing: the shipped file says what it takes
        return from_file(workflow or "wan_i2v", f" (the broker at {url} answered HTTP {exc.code})")
    except (urllib.error.URLError, OSError, ValueError):
        return from_file(workflow or "wan_i2v", offline)
    params = {name: param_from_table(name, {k: v for k, v in decl.items() if k != "schema"})
              for name, decl in view.get("params", {}).items()}
    return Declaration(view.get("name", workflow), params, f"the broker at {url}")


def _param_help(param) -> str:
    """The description, then what the value may be, e.g. "(default 480; 64..1280, multiple of 16)"."""
    facts = []
    if param.required:
        facts.append("required")
    elif param.has_default:
        facts.append(f"default {param.default!r}" if isinstance(param.default, str) and param.default != "random"
                     else f"default {param.default}")
    bounds = param.declaration()
    lo, hi = bounds.get("minimum"), bounds.get("maximum")
    if lo is not None or hi is not None:
        span = f"{'' if lo is None else f'{lo:g}'}..{'' if hi is None else f'{hi:g}'}"
        if param.TYPE == "integer":
            span = f"{'' if lo is None else lo}..{'' if hi is None else hi}"
        facts.append(f"values {span}" if param.TYPE == "map" else span)
    if "multiple_of" in bounds:
        facts.append(f"multiple of {bounds['multiple_of']}")
    if "congruent" in bounds:
        facts.append("{}k+{}".format(*bounds["congruent"]))
    if "max_length" in bounds:
        facts.append(f"at most {bounds['max_length']} characters")
    if param.TYPE == "map":
        facts.append('JSON object, e.g. \'{"b": 2}\'')
    text = " ".join(filter(None, [param.description, f"({'; '.join(facts)})" if facts else ""]))
    return text.replace("%", "%%")


def _submit_args(sb: argparse.ArgumentParser, declared: Declaration) -> None:
    """Add one option per declared param (--num-frames for num_frames), checked as the broker checks it."""
    from stages.params import Boolean, Image, ParamError

    def parse_with(param):
        def parse(text: str):
            try:
                return param.parse(text, form=True)
            except ParamError as exc:
                raise argparse.ArgumentTypeError(exc.message) from None
        parse.__name__ = param.TYPE  # argparse names the type in its messages
        return parse

    group = sb.add_argument_group(f"parameters of workflow {declared.workflow}",
                                  f"Declared by {declared.source}; left out, the broker's default applies.")
    values, images = [], []
    for name, param in declared.params.items():
        flags = [f"--{name.replace('_', '-')}", *PARAM_ALIASES.get(name, ())]
        kw: dict = {"dest": _dest(name), "default": None, "help": _param_help(param)}
        if isinstance(param, Image):
            images.append(name)
            need = "required" if param.required else "optional"
            kw.update(metavar="PATH", help=f"{param.description} (a file; {need})".replace("%", "%%"))
        elif isinstance(param, Boolean):
            values.append(name)
            kw["action"] = argparse.BooleanOptionalAction
        else:
            values.append(name)
            kw.update(type=parse_with(param), metavar=param.TYPE.upper(), required=param.required)
        try:
            group.add_argument(*flags, **kw)
        except argparse.ArgumentError as exc:
            raise SystemExit(f"error: workflow {declared.workflow}'s param {name!r} cannot be an option: {exc}"
                             ) from None
    if "image" in images:
        sb.add_argument("image_path", nargs="?", metavar="IMAGE", help="the image, as --image")
    else:
        sb.set_defaults(image_path=None)
    sb.set_defaults(submit_workflow=declared.workflow, value_params=values, image_params=images)


def _submit_workflow(argv: list[str]) -> Declaration | None:
    """For a ``submit`` command line, the declaration its options come from; else None."""
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--config")
    top.add_argument("--log-level")
    top.add_argument("command", nargs="?")
    top.add_argument("rest", nargs=argparse.REMAINDER)
    known, _ = top.parse_known_args(argv)
    if known.command != "submit":
        return None
    sub = argparse.ArgumentParser(add_help=False)
    sub.add_argument("--workflow")
    sub.add_argument("--url", default=DEFAULT_URL)
    sub.add_argument("--api-key", default=None)
    opts, _ = sub.parse_known_args(known.rest)
    return fetch_declaration(opts.url, opts.workflow, key=opts.api_key)


async def cmd_status(args) -> int:
    import aiohttp

    from . import client

    try:
        async with client.session(args.api_key) as session:
            async with session.get(f"{args.url}/v1/stages") as resp:
                overview = await resp.json()
                if resp.status in (401, 403):
                    print(f"error: {overview.get('error')}", file=sys.stderr)
                    return 2
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
    p.add_argument("--profile", action="append", metavar="NAME|PATH",
                   help="a stage profile (stages/profiles/, e.g. wan_i2v_480p): its sp_efficiency tables let "
                        "the proportional policy run those stages as sequence-parallel groups of k GPUs "
                        "(onepiece worker --sp k) when that meets a workflow's [slo] with fewer slots, and "
                        "its service-time spread sizes them; repeatable")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="memory of one GPU slot: GPU workers are then packed by their stage's declared "
                        "memory_gb/peak_gb/gpu_load (peaks within the memory, loads within --gpu-max-load "
                        "per GPU), several small stages to a GPU (default: one worker per slot)")
    p.add_argument("--gpu-max-load", type=_max_load, default=1.0, metavar="LOAD",
                   help="with --gpu-memory-gb: the declared gpu_load one GPU's workers may sum to. 1.0 (the "
                        "default) gives a denoiser (1.0) its GPU to itself; 1.2 also lets small stages "
                        "(0.05 each) share a denoiser's GPU where memory allows, which saves their GPU at "
                        "the cost of time-slicing it with the denoiser while they run")


def _gpu_max_load(args) -> float | None:
    """--gpu-max-load for GPU slots with memory (--gpu-memory-gb); None without them, where asking
    for one is an error rather than a flag that silently does nothing."""
    if args.gpu_memory_gb:
        return args.gpu_max_load
    if args.gpu_max_load != 1.0:
        print("error: --gpu-max-load needs --gpu-memory-gb (GPU slots with a memory to pack by)", file=sys.stderr)
        raise SystemExit(2)
    return None


def _max_load(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number >= 1.0 (a denoiser declares 1.0), not {text}")
    return value


def _api_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="the REST API key to send (default: $ONEPIECE_API_KEY; none on a broker without keys)")


def _shipped_declaration() -> Declaration:
    from stages.workflow import load_workflow

    wf = load_workflow("wan_i2v")
    return Declaration(wf.name, dict(wf.params), wf.source)


def build_parser(submit: Declaration | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``submit`` is where ``submit``'s parameter options come from
    (default: the shipped wan_i2v file; :func:`main` asks the broker)."""
    p = argparse.ArgumentParser(prog="onepiece", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML settings file (also ONEPIECE_CONFIG)")
    p.add_argument("--log-level", default=os.environ.get("ONEPIECE_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run broker, REST API, node manager and stage workers here")
    _settings_args(up, "control", "data_dir", "transport", "model", "device", "dtype", "heartbeat_s",
                   "liveness", "rest_host", "rest_port", "data_host", "ring_bytes", "max_attempts",
                   "job_deadline_s", "progress_floor_s", "progress_cap_s", "checkpoint_steps", "checkpoint_s",
                   "api_keys", "api_keys_init", "insecure", "results", "s3_endpoint", "s3_region")
    up.add_argument("--workflows", nargs="+", help="workflows to serve (default wan_i2v)")
    _manager_args(up)
    up.add_argument("--ready-timeout", type=float, default=300.0)
    up.set_defaults(func=cmd_up)

    br = sub.add_parser("broker", help="run the broker and its REST API")
    _settings_args(br, "control", "data_dir", "heartbeat_s", "liveness", "rest_host", "rest_port", "max_attempts",
                   "job_deadline_s", "progress_floor_s", "progress_cap_s", "api_keys", "api_keys_init", "insecure",
                   "curve_secret", "curve_allow", "curve_init", "results", "s3_endpoint", "s3_region")
    br.add_argument("--workflows", nargs="+", help="workflows to serve (default wan_i2v)")
    br.set_defaults(func=cmd_broker)

    mg = sub.add_parser("manager", help="run the node manager next to a broker reached over REST")
    mg.add_argument("--broker-url", default="http://127.0.0.1:8000")
    _settings_args(mg, "control", "data_dir", "transport", "model", "device", "dtype", "heartbeat_s",
                   "liveness", "data_host", "ring_bytes", "rest_host", "checkpoint_steps", "checkpoint_s",
                   "curve_secret", "curve_broker", "results", "s3_endpoint", "s3_region")
    mg.add_argument("--workflows", nargs="+", help="workflows the broker serves (default wan_i2v)")
    mg.add_argument("--launcher", choices=("local", "compose", "ray"), default="local",
                    help="start workers as local processes, docker compose replicas, or Ray actors")
    mg.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                    help="the Ray cluster of --launcher ray (default: RAY_ADDRESS, else a local one)")
    mg.add_argument("--compose-file", default="docker/compose.yaml")
    mg.add_argument("--compose-project", default="onepiece")
    mg.add_argument("--port", type=int, default=8001, help="port of the manager's /metrics (default 8001)")
    _api_key_arg(mg)
    mg.add_argument("--api-key-file", type=Path, default=None, metavar="PATH",
                    help="read the (admin) API key from this file, e.g. the broker's --api-keys-init file")
    _manager_args(mg)
    mg.set_defaults(func=cmd_manager)

    wk = sub.add_parser("worker", help="run one stage worker")
    wk.add_argument("--workflow", default="wan_i2v", help="workflow name or TOML path")
    wk.add_argument("--stage", required=True)
    wk.add_argument("--worker-id", default=None)
    _settings_args(wk, "control", "data_dir", "transport", "model", "device", "dtype", "heartbeat_s",
                   "liveness", "data_host", "advertise_host", "ring_bytes", "grant_bytes", "capacity",
                   "rdma_device", "rdma_port", "rdma_gid_index", "orphan_bytes", "send_timeout_s", "task_timeout_s",
                   "checkpoint_steps", "checkpoint_s", "checkpoint_bytes", "sp", "curve_secret", "curve_broker",
                   "results", "s3_endpoint", "s3_region")
    wk.set_defaults(func=cmd_worker)

    sb = sub.add_parser("submit", help="submit a job over REST, follow it and save the video",
                        description="Submit a job of --workflow (default: the broker's default workflow). Its "
                                    "parameter options come from the workflow's declaration: "
                                    "`onepiece submit --workflow NAME --help` lists them.")
    sb.add_argument("--workflow", default=None, help="workflow to run (default: the broker's default, wan_i2v)")
    sb.add_argument("--out", default="video.mp4")
    sb.add_argument("--url", default=DEFAULT_URL)
    sb.add_argument("--quiet", action="store_true")
    _api_key_arg(sb)
    _submit_args(sb, submit if submit is not None else _shipped_declaration())
    sb.set_defaults(func=cmd_submit)

    ks = sub.add_parser("keys", help="make, list and revoke REST API keys")
    ks_sub = ks.add_subparsers(dest="keys_command", required=True)
    kc = ks_sub.add_parser("create", help="add a key and print it, once")
    kc.add_argument("--scope", action="append", required=True, choices=SCOPES,
                    help="what the key may do (repeatable): submit (create jobs, see and cancel its own), "
                         "read (every job, the stages, metrics), admin (everything: drain workers, signals)")
    kc.add_argument("--name", default="", help="who or what the key is for (shown by keys list)")
    kl = ks_sub.add_parser("list", help="the keys of the file (ids, scopes, names; never the keys)")
    kr = ks_sub.add_parser("revoke", help="remove a key")
    kr.add_argument("id", help="the key's id (8 hex digits, as keys list shows it)")
    for k in (kc, kl, kr):
        k.add_argument("--file", type=Path, default=None,
                       help="the keys file (default: --api-keys / ONEPIECE_API_KEYS of the settings)")
        _settings_args(k, "api_keys")
    kv = ks_sub.add_parser("curve", help="make a CURVE key pair for the control plane: NAME.key, NAME.key_secret")
    kv.add_argument("name", help="whose pair: broker, a worker host's name, ...")
    kv.add_argument("--dir", type=Path, required=True, help="where to write the two files")
    kv.set_defaults(file=None)
    ks.set_defaults(func=cmd_keys)

    st = sub.add_parser("status", help="stages, workers and recent jobs")
    st.add_argument("--url", default="http://127.0.0.1:8000")
    st.add_argument("--jobs", type=int, default=10)
    _api_key_arg(st)
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_submit_workflow(argv)).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        return _run(args.func(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
