"""``make demo``: bring up a full local stack, turn the sample image into a video, shut down.

Six stage services (text, image and VAE encoders, denoise, VAE decode,
video encode) run as separate processes with the embedded ``tiny`` model,
moving tensors over the ``shm`` double ring; the job goes in and the video
comes out over the REST API, exactly as a user's would.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import aiohttp

from . import client
from .cli import _run
from .config import load_settings
from .ports import free_port
from .stack import Stack

SAMPLE = Path(__file__).resolve().parent.parent / "stages" / "assets" / "sample.png"


async def demo(args) -> int:
    settings = load_settings(data_dir=Path(args.data_dir), rest_port=free_port(), control="tcp://127.0.0.1:*",
                             transport=args.transport, model="tiny", workflows=["wan_i2v"])
    out = Path(args.out)
    t0 = time.monotonic()
    print(f"starting broker, REST API and 6 stage workers (transport {args.transport}, tiny model)...", flush=True)
    async with Stack(settings) as stack:
        print(f"stack ready in {time.monotonic() - t0:.1f} s at {stack.url}", flush=True)
        async with aiohttp.ClientSession() as session:
            job = await client.submit(session, stack.url, SAMPLE.read_bytes(), prompt=args.prompt,
                                      negative_prompt="blurry, low quality", height=args.size, width=args.size,
                                      num_frames=args.frames, steps=args.steps, guidance_scale=5.0, seed=42)
            print(f"submitted job {job}", flush=True)
            t1 = time.monotonic()
            await client.wait(session, stack.url, job, client.ProgressBar(sys.stdout))
            n = await client.download(session, stack.url, job, out)
            print(f"job took {time.monotonic() - t1:.1f} s", flush=True)
        print("shutting down...", flush=True)
    print(f"\nvideo: {out.resolve()} ({n} bytes, {args.frames} frames of {args.size}x{args.size})")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="out/demo.mp4")
    p.add_argument("--data-dir", default=".onepiece/demo")
    p.add_argument("--transport", default="shm", choices=["shm", "tcp"])
    p.add_argument("--prompt", default="a paper boat drifting across a pond at sunset")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    os.environ.setdefault("ONEPIECE_LOG_LEVEL", args.log_level)  # the worker processes inherit it
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        return _run(demo(args))
    except client.JobFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
