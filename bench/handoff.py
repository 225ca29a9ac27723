#!/usr/bin/env python
"""What moving a denoise job's state between workers costs, on the tiny Wan model.

    python bench/handoff.py [--quick] [--json PATH] [--size PX] [--frames N] [--steps N] [--jobs N]

Everything is real: a broker, REST API and worker processes (``onepiece.stack.Stack``,
shm data plane, temporary data dir), the tiny Wan2.1 image-to-video model built in
code. Jobs run one at a time, so each figure is one job's own. Reported as ratios of
a baseline measured in the same run (machines of one kind differ 2-3x):

1. **State** (in this process): the size of one denoise state at this resolution,
   the time to capture it and to push it through the tensor codec, each as a
   fraction of one denoising step.
2. **Checkpoint overhead**: ``--jobs`` jobs on a stack whose denoise workers take no
   checkpoints (``checkpoint_steps=0, checkpoint_s=0``), then the same jobs on one
   that checkpoints after every step (the cost of one checkpoint, magnified), then on
   one at the default interval (``Settings.checkpoint_steps``/``checkpoint_s``): the
   denoise stage's run time (its ``run_s`` timing) over the one without, as a
   percentage.
3. **One handoff**: on the second stack, ``--jobs`` jobs whose denoise worker is
   drained at step ``steps // 3`` (a node manager's move). The time the handoff
   adds is the denoise span (first ``stage_started`` to ``stage_finished``) of such
   a job minus an uninterrupted job's, also given in steps; the *gap* is from the
   drained worker's last progress event to the next worker's first, less one step.
4. **The expert split** (Wan2.2 A14B image-to-video): the time from ``denoise_high``
   finishing to ``denoise_low`` starting (the state crossing to the low-noise
   expert's worker), in steps.

The medians are printed; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ONEPIECE_LOG_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402
import torch  # noqa: E402

from onepiece import client  # noqa: E402
from onepiece.config import Settings, load_settings  # noqa: E402
from onepiece.ports import free_port  # noqa: E402
from onepiece.stack import Stack  # noqa: E402
from stages.wan import WanParams, decode_image, denoise, image_encode, load_components, text_encode, vae_encode  # noqa: E402
from transports import codec  # noqa: E402

SAMPLE = ROOT / "stages" / "assets" / "sample.png"


def job_params(args, seed: int) -> dict:
    return dict(prompt="a paper boat on a pond", negative_prompt="blur", height=args.size, width=args.size,
                num_frames=args.frames, steps=args.steps, guidance_scale=5.0, seed=seed)


# -- 1. the state, in this process --------------------------------------------------------


def measure_state(args) -> dict:
    """Step time, state size, capture and codec times of one denoise at these params."""
    p = WanParams.from_dict(job_params(args, 1))
    c = load_components("tiny", device="cpu")
    image = decode_image(SAMPLE.read_bytes())
    inputs = {**text_encode(c, p), **image_encode(c, image, p), **vae_encode(c, image, p)}
    captures: list[float] = []
    states: list[dict] = []

    def snapshot(done, make_state):
        t0 = time.perf_counter()
        states.append(make_state())
        captures.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    denoise(c, inputs, p, snapshot=snapshot)
    run = time.perf_counter() - t0 - sum(captures)
    step = run / args.steps
    state = states[len(states) // 2]
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        encoded = codec.encode({"job": "j"}, state)
        payload = codec.payload_buffer(encoded.nbytes)
        view, offset = memoryview(payload), 0
        for part in encoded.parts:  # what a transport does: the parts laid end to end
            view[offset:offset + part.nbytes] = part
            offset += part.nbytes
        codec.decode_tensors(codec.decode_meta(encoded.meta), payload)
    wire = (time.perf_counter() - t0) / reps
    return {"step_s": step, "state_bytes": nbytes, "capture_s": statistics.median(captures), "codec_s": wire,
            "capture_steps": statistics.median(captures) / step, "codec_steps": wire / step}


# -- 2-4. stacks ------------------------------------------------------------------------------


async def until_two(stack: Stack, stage: str) -> None:
    while len([w for w in stack.broker.stages()[stage]["workers"] if not w["draining"]]) < 2:
        await asyncio.sleep(0.05)


async def run_job(stack: Stack, session, workflow: str, params: dict, image: bytes | None, hook=None) -> list[dict]:
    job = await client.submit(session, stack.url, image, workflow=workflow, **params)
    seen = []
    async for e in client.events(session, stack.url, job):
        seen.append(e)
        if hook is not None:
            await hook(job, e)
        if e["type"] in ("succeeded", "failed", "cancelled"):
            break
    if seen[-1]["type"] != "succeeded":
        raise RuntimeError(f"job {job} ended {seen[-1]}")
    return seen


def first(seen, type_, stage, **match) -> dict:
    return next(e for e in seen if e["type"] == type_ and e["data"].get("stage") == stage
                and all(e["data"].get(k) == v for k, v in match.items()))


def denoise_span(seen, stage="denoise") -> float:
    return first(seen, "stage_finished", stage)["ts"] - first(seen, "stage_started", stage)["ts"]


def run_s(seen, stage="denoise") -> float:
    return first(seen, "stage_finished", stage)["data"]["timings"]["run_s"]


def stack_settings(tmp: Path, workflows: list[str], **kw) -> Settings:
    return load_settings(env={}, data_dir=tmp, control="tcp://127.0.0.1:*", rest_port=free_port(),
                         transport="shm", workflows=workflows, heartbeat_s=0.5, liveness=3, **kw)


async def measure_stacks(args, tmp: Path) -> dict:
    image = SAMPLE.read_bytes()
    out: dict = {}
    defaults = Settings()
    configs = (("off", {"checkpoint_steps": 0, "checkpoint_s": 0.0}),
               ("every", {"checkpoint_steps": 1, "checkpoint_s": 0.0}),  # the cost of one, magnified
               ("default", {"checkpoint_steps": defaults.checkpoint_steps, "checkpoint_s": defaults.checkpoint_s}))
    async with aiohttp.ClientSession() as session:
        for name, kw in configs:
            async with Stack(stack_settings(tmp / name, ["wan_i2v"], **kw)) as stack:
                await run_job(stack, session, "wan_i2v", job_params(args, 0), image)  # warm-up
                plain = [await run_job(stack, session, "wan_i2v", job_params(args, i + 1), image)
                         for i in range(args.jobs)]
                out[name] = {"run_s": [run_s(s) for s in plain], "span_s": [denoise_span(s) for s in plain]}
                if name != "default":
                    continue
                await stack.launcher.start("wan_i2v", "denoise")
                handed = []
                for i in range(args.jobs):
                    await until_two(stack, "denoise")
                    # both workers warm (a fresh process's first steps are slower): the handoff is measured
                    await asyncio.gather(*(run_job(stack, session, "wan_i2v", job_params(args, 100 + k), image)
                                           for k in range(2)))
                    drained: list = []
                    at = max(1, args.steps // 3)

                    async def hook(job, e, drained=drained, at=at):
                        if e["type"] == "progress" and e["data"]["stage"] == "denoise" and e["data"]["step"] >= at \
                                and not drained:
                            worker = stack.broker.core.job(job)["stages"]["denoise"]["worker"]
                            drained.append(worker)
                            handle = next(h for h in stack.launcher.workers() if h.id == worker)
                            asyncio.get_running_loop().create_task(stack.launcher.drain(handle, timeout=60))

                    seen = await run_job(stack, session, "wan_i2v", job_params(args, i + 1), image, hook)
                    # the pool keeps two; started after the job, so a process start does not share its cores
                    await stack.launcher.start("wan_i2v", "denoise")
                    again = [e for e in seen if e["type"] == "stage_started" and e["data"]["stage"] == "denoise"]
                    if len(again) < 2:
                        raise RuntimeError("the drain did not hand the job off")
                    progress = [e for e in seen if e["type"] == "progress" and e["data"]["stage"] == "denoise"]
                    retry = first(seen, "stage_retry", "denoise")["ts"]
                    last_old = max(e["ts"] for e in progress if e["ts"] < again[1]["ts"])
                    first_new = min(e["ts"] for e in progress if e["ts"] > again[1]["ts"])
                    handed.append({"span_s": denoise_span(seen), "gap_s": first_new - last_old,
                                   # the step ends, the state goes to its holder, HANDOFF reaches the broker
                                   "stop_s": retry - last_old,
                                   # re-bound: TASK, the inputs and the state sent to the next worker
                                   "rebind_s": again[1]["ts"] - retry,
                                   # its first step
                                   "first_step_s": first_new - again[1]["ts"],
                                   "resumed_from_step": again[1]["data"].get("resumed_from_step", 0)})
                out["handoff"] = handed
        async with Stack(stack_settings(tmp / "wan22", ["wan22_i2v"])) as stack:
            await run_job(stack, session, "wan22_i2v", job_params(args, 0), image)
            split = []
            for i in range(args.jobs):
                seen = await run_job(stack, session, "wan22_i2v", job_params(args, i + 1), image)
                cross = first(seen, "stage_started", "denoise_low")["ts"] - \
                    first(seen, "stage_finished", "denoise_high")["ts"]
                steps = len([e for e in seen if e["type"] == "progress"
                             and e["data"]["stage"] in ("denoise_high", "denoise_low")])
                denoising = denoise_span(seen, "denoise_high") + denoise_span(seen, "denoise_low")
                split.append({"cross_s": cross, "step_s": denoising / max(1, steps)})
            out["expert_split"] = split
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, smaller jobs (a smoke run)")
    ap.add_argument("--size", type=int, default=256, help="frame height and width (default 256)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=5, help="jobs per measurement (default 5)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.size, args.frames, args.steps, args.jobs = 128, 9, 30, 2
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the measured process leaves the cores to the workers

    state = measure_state(args)
    with tempfile.TemporaryDirectory(prefix="onepiece-handoff-") as tmp:
        stacks = asyncio.run(measure_stacks(args, Path(tmp)))

    med = statistics.median
    off, on, every = (med(stacks[k]["run_s"]) for k in ("off", "default", "every"))
    step = off / args.steps
    plain_span = med(stacks["default"]["span_s"])
    handed_span = med(h["span_s"] for h in stacks["handoff"])
    gap = med(h["gap_s"] for h in stacks["handoff"])
    parts = {k: med(h[k] for h in stacks["handoff"]) for k in ("stop_s", "rebind_s", "first_step_s")}
    cross = med(s["cross_s"] for s in stacks["expert_split"])
    split_step = med(s["step_s"] for s in stacks["expert_split"])
    d = Settings()
    print(f"tiny Wan2.1 I2V, {args.size}x{args.size}, {args.frames} frames, {args.steps} steps, CFG, shm; "
          f"medians of {args.jobs} jobs")
    print(f"  one step (stack, no checkpoints)            {step * 1e3:9.1f} ms")
    print(f"  state: {state['state_bytes'] / 2**20:.2f} MiB; capture {state['capture_s'] * 1e3:.2f} ms "
          f"= {state['capture_steps']:.3f} steps; codec round trip {state['codec_s'] * 1e3:.2f} ms "
          f"= {state['codec_steps']:.3f} steps (in-process step {state['step_s'] * 1e3:.1f} ms)")
    print(f"  checkpoint overhead at the default interval ({d.checkpoint_steps} steps or {d.checkpoint_s:g} s): "
          f"denoise run {on:.3f} s vs {off:.3f} s without = {100 * (on / off - 1):+.2f} %")
    print(f"  checkpoint after every step: {every:.3f} s = {100 * (every / off - 1):+.2f} %, "
          f"so one checkpoint costs {(every - off) / (args.steps - 1) * 1e3:.2f} ms "
          f"= {(every - off) / (args.steps - 1) / step:.3f} steps")
    print(f"  one handoff on drain: denoise span {handed_span:.3f} s vs {plain_span:.3f} s uninterrupted: "
          f"+{handed_span - plain_span:.3f} s = {(handed_span - plain_span) / step:.1f} steps; "
          f"gap between the two workers' steps {gap * 1e3:.0f} ms = {(gap - step) / step:.1f} steps beyond one")
    print(f"    of which: step end -> state left -> HANDOFF at the broker {parts['stop_s'] * 1e3:.0f} ms; "
          f"re-bind, inputs and state to the next worker {parts['rebind_s'] * 1e3:.0f} ms; "
          f"its first step {parts['first_step_s'] * 1e3:.0f} ms")
    print(f"  expert split (Wan2.2 I2V): denoise_high finished -> denoise_low started {cross * 1e3:.0f} ms "
          f"= {cross / split_step:.1f} steps of {split_step * 1e3:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "state": state,
                                         "stacks": stacks}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
