"""What only a CUDA device can show. CI has none, so these skip there; a lent GPU runs them
(`pytest tests/test_cuda.py`):

- a stage loaded on the device reports the memory it holds (the Node Manager packs by it);
- the split stages reproduce diffusers' pipeline run on the device;
- a device tensor reaches its consumer through a granted shm region, copied once from the
  device into memory registered as pinned, and a stage can copy its output straight from the
  device into a tensor the consumer granted (what ``vae_decode`` does).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

MiB = 1 << 20


@pytest.mark.parametrize("stage", ["text_encode", "denoise", "vae_decode"])
def test_a_stage_loaded_on_cuda_reports_the_memory_it_holds(stage):
    from stages.kinds import make_stage
    from stages.workflow import load_workflow

    kind = make_stage(load_workflow("wan_i2v").stages[stage], model="tiny", device="cuda")
    kind.load()
    info = kind.info()
    held = torch.cuda.memory_allocated()
    assert "memory_gb" in info, info
    assert info["memory_gb"] == round(held / 1e9, 3)
    params = [p for part in vars(kind.components).values() if isinstance(part, torch.nn.Module)
              for p in part.parameters()]
    assert params and all(p.device.type == "cuda" for p in params)
    assert held >= sum(p.numel() * p.element_size() for p in params)


def test_the_split_stages_match_the_pipeline_on_cuda():
    from tests.stages.test_wan_equivalence import pipeline_of, run_stages
    from tests.stages.wan_helpers import SAMPLE, assert_same_video, run_pipeline

    from stages.wan import WanParams, decode_image, load_components

    c = load_components("tiny", device="cuda")
    assert c.transformer.device.type == "cuda"
    image = decode_image(SAMPLE.read_bytes())
    p = WanParams(prompt="a red house below a mountain", negative_prompt="blurry", height=128, width=128,
                  num_frames=9, steps=4, guidance_scale=5.0, seed=3)
    expected = run_pipeline(pipeline_of(c), p, image=image)
    assert_same_video(run_stages(c, image, p), expected)


@pytest.fixture
async def shm_pair():
    from transports import open_transport

    from .transports.conftest import shm_entries, shm_leaks

    before = shm_entries()
    options = {"ring_bytes": 4 * MiB, "grant_min_bytes": 2 * MiB, "grant_bytes": 64 * MiB}
    a = await open_transport("shm", **options)
    b = await open_transport("shm", **options)
    sender = await a.connect(b.descriptor, timeout=10)
    yield a, b, sender
    await sender.aclose()
    await a.aclose()
    await b.aclose()
    assert shm_leaks(before) == set()


async def test_a_device_tensor_goes_by_rendezvous_into_a_pinned_region(shm_pair):
    _, b, sender = shm_pair
    x = torch.randn(3, 1024, 1024, device="cuda")  # 12 MiB: by rendezvous
    for i in range(2):
        await sender.send({"i": i}, {"x": x, "small": torch.arange(5, device="cuda")})
        with await b.recv(timeout=10) as msg:
            assert msg.zero_copy and msg.tensors["x"].device.type == "cpu"
            assert torch.equal(msg.tensors["x"], x.cpu())
            assert torch.equal(msg.tensors["small"], torch.arange(5))
    # The region was registered with CUDA once (a nonzero address), and it was the same region twice.
    assert len(sender._pinned) == 1 and all(sender._pinned.values())


async def test_a_stage_copies_its_device_output_straight_into_a_granted_tensor(shm_pair):
    _, b, sender = shm_pair
    video = torch.rand(3, 9, 256, 256, device="cuda")  # 7 MiB of frames, as vae_decode makes them
    out = await sender.allocate(tuple(video.shape), video.dtype)
    assert out.device.type == "cpu"
    out.copy_(video)  # the one device-to-host copy
    await sender.send({"frames": 1}, {"video": out})
    with await b.recv(timeout=10) as msg:
        assert torch.equal(msg.tensors["video"], video.cpu())
    assert torch.equal(out, video.cpu())
