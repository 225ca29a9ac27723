"""The faithfulness tests of the workflows beyond wan_i2v: the split stages of
wan_t2v, wan22_i2v and wan22_t2v must reproduce diffusers' own monolithic
pipelines (WanPipeline, WanImageToVideoPipeline with two experts) run on the very
same component objects. The two-expert runs hold each expert in a components
object of its own and pass the denoise state between them through the tensor
codec, as two workers would. Also: loading each identity from a local
diffusers directory of each layout."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline

from stages.wan import (
    IDENTITIES,
    WanParams,
    decode_image,
    denoise,
    expert_steps,
    frames_from_video,
    is_state,
    load_components,
    state_step,
    text_encode,
    vae_decode,
    vae_encode,
)

from .wan_helpers import SAMPLE, assert_same_video, run_pipeline, through_the_wire

# bf16 on both sides runs the same operations on the same weights; the bound
# only guards against a gross divergence (one bf16 ulp at 1.0 is 2**-7).
BF16_TOLERANCE = 2e-2
PROMPT = "A lighthouse on a cliff at dusk,  waves crashing &amp; gulls circling"
NEGATIVE = "blurry, static, washed out"


def load(identity: str, dtype=torch.float32):
    return load_components("tiny", identity=identity, device="cpu", dtype=dtype)


@pytest.fixture(scope="module")
def image():
    return decode_image(SAMPLE.read_bytes())


@pytest.fixture(scope="module")
def shared():
    """The text encoder and VAE every workflow shares (one worker each)."""
    return {"text": load("umt5-xxl"), "vae": load("wan2.1-vae")}


def denoise_two_experts(high, low, inputs, p: WanParams) -> dict[str, torch.Tensor]:
    """denoise_high then denoise_low, the state crossing the wire between them."""
    handed = denoise(high, inputs, p)
    assert is_state(handed) and "latents" not in handed
    assert state_step(handed) == expert_steps(high, p).stop == expert_steps(low, p).start
    assert 0 < state_step(handed) < p.steps  # both experts really run
    out = denoise(low, inputs, p, state=through_the_wire(handed))
    assert set(out) == {"latents"}
    return out


@pytest.mark.parametrize(
    "guidance_scale, seed, height, width, num_frames, steps",
    [(4.0, 42, 48, 64, 9, 5), (1.0, 99, 64, 32, 5, 3)],
    ids=["guided", "unguided-portrait"],
)
def test_wan_t2v_matches_wan_pipeline(shared, guidance_scale, seed, height, width, num_frames, steps):
    text, vae, dit = shared["text"], shared["vae"], load("wan2.1-t2v-14b")
    p = WanParams(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=num_frames,
                  steps=steps, guidance_scale=guidance_scale, seed=seed)
    pipe = WanPipeline(tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae.vae,
                       transformer=dit.transformer, scheduler=copy.deepcopy(dit.scheduler))
    expected = run_pipeline(pipe, p)
    inputs = text_encode(text, p)
    got = frames_from_video(vae_decode(vae, denoise(dit, inputs, p), p)["video"])
    assert got.shape == (num_frames, height, width, 3)
    assert_same_video(got, expected)


def wan22_i2v(shared, image, p: WanParams, dtype=torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """(stages, pipeline) frames of wan22_i2v on the same components."""
    text = shared["text"] if dtype == torch.float32 else load("umt5-xxl", dtype)
    vae = shared["vae"]
    high, low = load("wan2.2-i2v-a14b-high", dtype), load("wan2.2-i2v-a14b-low", dtype)
    pipe = WanImageToVideoPipeline(
        tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae.vae,
        scheduler=copy.deepcopy(high.scheduler), image_processor=None, image_encoder=None,
        transformer=high.transformer, transformer_2=low.transformer, boundary_ratio=high.boundary_ratio,
    )
    expected = run_pipeline(pipe, p, image=image)
    inputs = {**text_encode(text, p), **vae_encode(vae, image, p)}
    got = frames_from_video(vae_decode(vae, denoise_two_experts(high, low, inputs, p), p)["video"])
    return got, expected


@pytest.mark.parametrize(
    "guidance_scale, guidance_scale_2, seed, height, width, num_frames, steps",
    [(3.5, None, 21, 64, 48, 9, 6), (4.0, 2.0, 5, 32, 64, 5, 8)],
    ids=["same-guidance", "own-low-guidance"],
)
def test_wan22_i2v_matches_pipeline_with_two_experts(
    shared, image, guidance_scale, guidance_scale_2, seed, height, width, num_frames, steps
):
    p = WanParams(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=num_frames,
                  steps=steps, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2, seed=seed)
    got, expected = wan22_i2v(shared, image, p)
    assert got.shape == (num_frames, height, width, 3)
    assert_same_video(got, expected)


@pytest.mark.parametrize(
    "guidance_scale, guidance_scale_2, seed, height, width, num_frames, steps",
    [(3.0, 4.5, 77, 48, 48, 9, 6), (1.0, None, 2024, 32, 64, 5, 4)],
    ids=["own-low-guidance", "unguided"],
)
def test_wan22_t2v_matches_pipeline_with_two_experts(
    shared, guidance_scale, guidance_scale_2, seed, height, width, num_frames, steps
):
    text, vae = shared["text"], shared["vae"]
    high, low = load("wan2.2-t2v-a14b-high"), load("wan2.2-t2v-a14b-low")
    p = WanParams(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=num_frames,
                  steps=steps, guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2, seed=seed)
    pipe = WanPipeline(tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae.vae,
                       scheduler=copy.deepcopy(high.scheduler), transformer=high.transformer,
                       transformer_2=low.transformer, boundary_ratio=high.boundary_ratio)
    expected = run_pipeline(pipe, p)
    inputs = text_encode(text, p)
    got = frames_from_video(vae_decode(vae, denoise_two_experts(high, low, inputs, p), p)["video"])
    assert got.shape == (num_frames, height, width, 3)
    assert_same_video(got, expected)


def test_wan22_i2v_bf16_matches_pipeline(shared, image):
    """bfloat16 DiTs and text encoder (float32 VAE), as on a GPU; prints the figure."""
    p = WanParams(prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=32, num_frames=5, steps=4,
                  guidance_scale=3.5, seed=8)
    got, expected = wan22_i2v(shared, image, p, dtype=torch.bfloat16)
    diff = assert_same_video(got, expected, BF16_TOLERANCE)
    print(f"wan22_i2v bf16 max abs difference to the pipeline: {diff:.3g}")


def test_tiny_experts_are_different_models_with_wan22_boundaries():
    for family, ratio, t2v in (("wan2.2-i2v-a14b", 0.900, False), ("wan2.2-t2v-a14b", 0.875, True)):
        high, low = load(f"{family}-high"), load(f"{family}-low")
        assert (high.expert, low.expert) == ("high", "low")
        assert high.boundary_ratio == low.boundary_ratio == ratio
        assert high.transformer.config.image_dim is None
        assert high.transformer.config.in_channels == (16 if t2v else 36)
        assert dict(high.transformer.config) == dict(low.transformer.config)
        weights = zip(high.transformer.state_dict().values(), low.transformer.state_dict().values())
        assert not all(torch.equal(a, b) for a, b in weights)
    t2v = load("wan2.1-t2v-14b")
    assert t2v.expert is None and t2v.boundary_ratio is None
    assert t2v.transformer.config.in_channels == 16 and t2v.transformer.config.added_kv_proj_dim is None


def test_identities_share_the_tiny_text_encoder_and_vae():
    whole = load_components("tiny", device="cpu")  # identity=None: the whole Wan2.1 I2V model
    for part, identity in (("text_encoder", "umt5-xxl"), ("vae", "wan2.1-vae"), ("image_encoder", "clip-vit-h-14")):
        mine = getattr(load(identity), part).state_dict()
        theirs = getattr(whole, part).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), part
    assert load("umt5-xxl").parts == IDENTITIES["umt5-xxl"].parts == {"tokenizer", "text_encoder"}
    with pytest.raises(ValueError, match="^identity:"):
        load("wan9-huge")
    with pytest.raises(ValueError, match="^parts:"):
        load_components("tiny", identity="wan2.1-vae", parts={"transformer"}, device="cpu")


@pytest.fixture(scope="module")
def saved_wan22_i2v(tmp_path_factory):
    """The tiny Wan2.2 I2V model in the layout of Wan2.2-I2V-A14B-Diffusers."""
    text, vae = load("umt5-xxl"), load("wan2.1-vae")
    high, low = load("wan2.2-i2v-a14b-high"), load("wan2.2-i2v-a14b-low")
    path = tmp_path_factory.mktemp("wan22-i2v")
    WanImageToVideoPipeline(
        tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae.vae, scheduler=high.scheduler,
        image_processor=None, image_encoder=None, transformer=high.transformer, transformer_2=low.transformer,
        boundary_ratio=high.boundary_ratio,
    ).save_pretrained(path)
    return path, {"high": high, "low": low}


def test_load_wan22_experts_from_directory(saved_wan22_i2v):
    path, tiny = saved_wan22_i2v
    for expert in ("high", "low"):
        c = load_components(str(path), identity=f"wan2.2-i2v-a14b-{expert}", device="cpu")
        assert c.expert == expert and c.boundary_ratio == 0.9 and c.parts == {"transformer", "scheduler"}
        mine, theirs = c.transformer.state_dict(), tiny[expert].transformer.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), expert
        schedulers = (c.scheduler, tiny[expert].scheduler)
        public = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in schedulers]
        assert public[0] == public[1]
    text = load_components(str(path), identity="umt5-xxl", device="cpu")
    assert text.text_encoder is not None and text.vae is None
    # one expert run as a whole DiT would go over every step: refused
    with pytest.raises(ValueError, match="^identity:"):
        load_components(str(path), identity="wan2.1-i2v-14b", device="cpu")


def test_load_wan21_t2v_from_directory(tmp_path):
    text, vae, dit = load("umt5-xxl"), load("wan2.1-vae"), load("wan2.1-t2v-14b")
    WanPipeline(tokenizer=text.tokenizer, text_encoder=text.text_encoder, vae=vae.vae,
                transformer=dit.transformer, scheduler=dit.scheduler).save_pretrained(tmp_path)
    c = load_components(str(tmp_path), identity="wan2.1-t2v-14b", device="cpu")
    assert c.expert is None and c.boundary_ratio is None
    mine, theirs = c.transformer.state_dict(), dit.transformer.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    # a one-DiT directory is no two-expert model
    with pytest.raises(ValueError, match="^identity:"):
        load_components(str(tmp_path), identity="wan2.2-t2v-a14b-high", device="cpu")
