"""The Ray launcher on a local Ray cluster (a real one, started by the test in this process):
a denoise group of k=2 is a STRICT_PACK placement group of 2 bundles, its worker registers with
a real broker as a group of 2 (``--sp 2``: two gloo ranks on the CPU), and a drain ends it and
frees its bundles. Multi-node placement and node loss: tests/test_multihost.py."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from broker.service import Broker
from onepiece.config import Settings

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def test_a_denoise_group_is_a_strict_pack_placement_group_and_drains_cleanly(tmp_path, monkeypatch):
    from manager.raylauncher import RayLauncher

    monkeypatch.setenv("HOME", str(tmp_path))  # a local Ray writes its auth token under ~/.ray: not the user's

    settings = Settings(control="tcp://127.0.0.1:*", data_dir=tmp_path / "data", workflows=["wan_i2v"],
                        heartbeat_s=0.5, liveness=3, device="cpu")
    broker = Broker(settings)
    await broker.start()
    temp = f"/tmp/oprl-{tmp_path.name[-12:]}"  # short: Ray's socket paths live under it
    launcher = None
    try:
        launcher = RayLauncher(settings.replace(control=broker.endpoint), None, gpu_stages={"denoise"},
                               temp_dir=temp)
        assert launcher.gpu_stages == set()  # --device cpu (and no GPU here): the group runs on the CPU
        handle = await launcher.start("wan_i2v", "denoise", sp=2)
        table = ray.util.placement_group_table(handle.extra["group"])
        assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 2 and table["state"] == "CREATED"
        deadline = time.monotonic() + 180
        while not (workers := broker.stages()["denoise"]["workers"]):
            assert time.monotonic() < deadline, "the group did not register"
            await asyncio.sleep(0.2)
        [worker] = workers
        assert worker["id"] == handle.id and worker["info"]["sp"] == 2
        assert await launcher.drain(handle, timeout=60) == 0
        assert ray.util.placement_group_table(handle.extra["group"])["state"] == "REMOVED"
        assert launcher.workers() == []
    finally:
        if launcher is not None:
            await launcher.aclose()
        ray.shutdown()
        await broker.stop()
        shutil.rmtree(temp, ignore_errors=True)
