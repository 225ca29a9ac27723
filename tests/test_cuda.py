"""What only a CUDA device can show. CI has none, so these skip there; a lent GPU runs them
(`pytest tests/test_cuda.py`):

- a stage loaded on the device reports the memory it holds (the Node Manager packs by it);
- the split stages reproduce diffusers' pipeline run on the device.

The data plane's CUDA cases (a device tensor by rendezvous into pinned memory, a device-to-host
copy into a granted tensor) are in tests/transports/test_rendezvous.py, also skipped without one.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


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
