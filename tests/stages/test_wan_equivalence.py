"""The faithfulness test: the split stages must reproduce diffusers'
WanImageToVideoPipeline run on the very same component objects."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
from transformers import CLIPVisionModel

from stages.wan import (
    WanParams,
    decode_image,
    denoise,
    frames_from_video,
    image_encode,
    load_components,
    text_encode,
    vae_decode,
    vae_encode,
)

from .wan_helpers import SAMPLE, assert_same_video, run_pipeline



@pytest.fixture(scope="module")
def components():
    return load_components("tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    return decode_image(SAMPLE.read_bytes())


def pipeline_of(c) -> WanImageToVideoPipeline:
    # The pipeline gets its own scheduler copy so neither run can see the other's
    # scheduler state; every other module is the very object the stages use.
    return WanImageToVideoPipeline(
        tokenizer=c.tokenizer,
        text_encoder=c.text_encoder,
        image_encoder=c.image_encoder,
        image_processor=c.image_processor,
        transformer=c.transformer,
        vae=c.vae,
        scheduler=copy.deepcopy(c.scheduler),
    )


def run_stages(c, image, p: WanParams) -> np.ndarray:
    inputs = {**text_encode(c, p), **image_encode(c, image, p), **vae_encode(c, image, p)}
    latents = denoise(c, inputs, p)
    return frames_from_video(vae_decode(c, latents, p)["video"])


@pytest.mark.parametrize(
    "guidance_scale, seed, height, width, num_frames",
    [(5.0, 0, 256, 256, 17), (1.0, 1234, 128, 192, 9)],
    ids=["guided", "unguided-landscape"],
)
def test_split_matches_pipeline(components, image, guidance_scale, seed, height, width, num_frames):
    p = WanParams(
        # the double space and HTML entity exercise the pipeline's prompt cleaning
        prompt="A small red house below a snowy mountain, the sun  shining &amp; birds flying",
        negative_prompt="blurry, static, low quality",
        height=height,
        width=width,
        num_frames=num_frames,
        steps=4,
        guidance_scale=guidance_scale,
        seed=seed,
    )
    expected = run_pipeline(pipeline_of(components), p, image=image)
    got = run_stages(components, image, p)
    assert got.shape == expected.shape == (num_frames, height, width, 3)
    assert_same_video(got, expected)


def test_checkpoint_loading_matches_pipeline_from_pretrained(components, image, tmp_path):
    """On a checkpoint, load_components must give what Wan's model card does:
    bfloat16 transformer and text encoder (with diffusers' float32-kept modules),
    float32 VAE and image encoder."""
    pipeline_of(components).save_pretrained(tmp_path)
    pipe = WanImageToVideoPipeline.from_pretrained(
        tmp_path,
        vae=AutoencoderKLWan.from_pretrained(tmp_path, subfolder="vae", dtype=torch.float32),
        image_encoder=CLIPVisionModel.from_pretrained(tmp_path / "image_encoder", dtype=torch.float32),
        dtype=torch.bfloat16,
    )
    loaded = load_components(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == pipe.transformer.dtype == torch.bfloat16
    p = WanParams(
        prompt="a house", negative_prompt="blur", height=128, width=128, num_frames=9, steps=3, guidance_scale=5.0,
        seed=3,
    )
    assert_same_video(run_stages(loaded, image, p), run_pipeline(pipe, p, image=image))
