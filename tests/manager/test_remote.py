"""`onepiece manager` as its own process, steering a broker it reaches only over REST."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import pytest

from broker.api import start_api
from broker.service import Broker
from onepiece import client
from onepiece.config import load_settings

from ..helpers import SYNTHETIC_PARAMS, free_port

pytestmark = [pytest.mark.timeout(300)]

WORKFLOW = """
name = "pair"
result = "b"
[stages.a]
kind = "synthetic"
outputs = ["x"]
[stages.a.synthetic]
service_time = 0.05
output_bytes = 4096
[stages.b]
kind = "synthetic"
after = ["a"]
[stages.b.synthetic]
service_time = 0.05
""" + SYNTHETIC_PARAMS


async def test_standalone_manager_starts_workers_serves_jobs_and_drains_on_exit(tmp_path):
    wf = tmp_path / "pair.toml"
    wf.write_text(WORKFLOW)
    settings = load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*", workflows=[str(wf)],
                             heartbeat_s=0.5)
    broker = Broker(settings)
    await broker.start()
    runner, port = await start_api(broker, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    mport = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "onepiece.cli", "--log-level", "WARNING", "manager", "--broker-url", url,
        "--workflows", str(wf), "--control", broker.endpoint, "--data-dir", str(tmp_path / "data"),
        "--heartbeat-s", "0.5", "--policy", "static", "--workers", "1", "--slots", "4", "--cpu-slots", "2",
        "--period", "0.5", "--port", str(mport), env={**os.environ, "ONEPIECE_LOG_LEVEL": "WARNING"})
    try:
        deadline = time.monotonic() + 120
        while broker.missing_stages():
            assert proc.returncode is None, "the manager exited"
            assert time.monotonic() < deadline, f"no workers for {broker.missing_stages()}"
            await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            jobs = [await client.submit(session, url, None, prompt="x", workflow="pair") for _ in range(3)]
            for job in jobs:
                await client.wait(session, url, job)
            async with session.get(f"http://127.0.0.1:{mport}/v1/allocation") as resp:
                alloc = (await resp.json())["allocation"]
            async with session.get(f"http://127.0.0.1:{mport}/metrics") as resp:
                metrics = await resp.text()
        assert alloc["a"]["workers"] == 1 and alloc["b"]["workers"] == 1
        assert "onepiece_manager_workers" in metrics
        workers = [w["info"]["pid"] for s in broker.stages().values() for w in s["workers"]]
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        for pid in workers:  # the manager drained its workers before it left
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
        await broker.stop()
