"""Contracts of the Wan2.1 I2V stage functions and of load_components."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import imageio
import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from stages.wan import (
    ALL_PARTS,
    STAGE_PARTS,
    Cancelled,
    WanParams,
    decode_image,
    denoise,
    frames_from_video,
    image_encode,
    load_components,
    text_encode,
    vae_decode,
    vae_encode,
    video_encode,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "stages" / "assets" / "sample.png"
PARAMS = WanParams(
    prompt="a red house below a mountain",
    negative_prompt="blurry",
    height=256,
    width=256,
    num_frames=17,
    steps=4,
    guidance_scale=5.0,
    seed=7,
)
# small enough that the tests needing several runs stay quick
SMALL = replace(PARAMS, prompt="a red house", height=64, width=64, num_frames=5, steps=3, seed=0)


@pytest.fixture(scope="module")
def components():
    return load_components("tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    return decode_image(SAMPLE.read_bytes())


def run_all(c, image, p: WanParams) -> dict[str, torch.Tensor]:
    out = {**text_encode(c, p), **image_encode(c, image, p), **vae_encode(c, image, p)}
    out.update(denoise(c, out, p))
    out.update(vae_decode(c, out, p))
    return out


@pytest.fixture(scope="module")
def outputs(components, image):
    return run_all(components, image, PARAMS)


def test_stage_outputs_have_expected_shapes_and_dtypes(outputs):
    expected = {
        "prompt_embeds": ((1, 512, 32), torch.float32),
        "negative_prompt_embeds": ((1, 512, 32), torch.float32),
        "image_embeds": ((1, 65, 16), torch.float32),
        "condition": ((1, 20, 5, 32, 32), torch.float32),
        "latents": ((1, 16, 5, 32, 32), torch.float32),
        "video": ((1, 3, 17, 256, 256), torch.float32),
    }
    assert set(outputs) == set(expected)
    for name, (shape, dtype) in expected.items():
        t = outputs[name]
        assert tuple(t.shape) == shape, name
        assert t.dtype == dtype, name
        assert t.device.type == "cpu" and t.is_contiguous(), name
        assert not t.is_inference(), name  # receivers may write into it
        assert torch.isfinite(t).all(), name
    # the mask channels: first latent frame kept, the rest to be generated
    mask = outputs["condition"][:, :4]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)


def test_the_default_resolution_runs_on_the_tiny_model(components, image):
    # 480x832 is 30x52 patches: the tiny DiT's rotary table once covered 32 positions per axis,
    # and the workflow's default job failed with a shape error in denoise
    p = replace(SMALL, height=480, width=832, num_frames=5, steps=1)
    out = run_all(components, image, p)
    assert tuple(out["video"].shape) == (1, 3, 5, 480, 832) and torch.isfinite(out["video"]).all()


def test_frames_from_video(outputs):
    frames = frames_from_video(outputs["video"])
    assert frames.shape == (17, 256, 256, 3)
    assert frames.dtype == np.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0


def test_stages_are_deterministic(components, image, outputs):
    again = run_all(components, image, PARAMS)
    for name, tensor in outputs.items():
        assert torch.equal(again[name], tensor), name


def test_tiny_components_are_identical_across_processes(components):
    """Each stage service builds its own tiny parts; they must be the same weights."""
    script = (
        "import hashlib, torch\n"
        "from stages.wan import load_components\n"
        "c = load_components('tiny', device='cpu')\n"
        "h = hashlib.sha256()\n"
        "for m in (c.text_encoder, c.image_encoder, c.vae, c.transformer):\n"
        "    for k, v in sorted(m.state_dict().items()):\n"
        "        h.update(k.encode()); h.update(v.numpy().tobytes())\n"
        "h.update(repr(c.tokenizer('A cat, é!').input_ids).encode())\n"
        "print(h.hexdigest())\n"
    )
    here = hashlib.sha256()
    for module in (components.text_encoder, components.image_encoder, components.vae, components.transformer):
        for k, v in sorted(module.state_dict().items()):
            here.update(k.encode())
            here.update(v.numpy().tobytes())
    here.update(repr(components.tokenizer("A cat, é!").input_ids).encode())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == here.hexdigest()


def test_no_guidance_means_no_negative_embeds(components, image):
    p = replace(SMALL, negative_prompt="", steps=2, guidance_scale=1.0)
    text = text_encode(components, p)
    assert set(text) == {"prompt_embeds"}
    latents = denoise(components, {**text, **image_encode(components, image, p), **vae_encode(components, image, p)}, p)
    assert tuple(latents["latents"].shape) == (1, 16, 2, 8, 8)


@pytest.fixture(scope="module")
def small_inputs(components, image):
    c, p = components, SMALL
    return {**text_encode(c, p), **image_encode(c, image, p), **vae_encode(c, image, p)}


def test_on_step_reports_every_step(components, small_inputs):
    calls: list[tuple[int, int]] = []
    denoise(components, small_inputs, SMALL, on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_should_stop_cancels_before_the_next_step(components, small_inputs):
    calls: list[tuple[int, int]] = []
    with pytest.raises(Cancelled):
        denoise(
            components,
            small_inputs,
            SMALL,
            on_step=lambda done, total: calls.append((done, total)),
            should_stop=lambda: len(calls) >= 1,
        )
    assert calls == [(1, 3)]


def test_denoise_leaves_the_shared_scheduler_alone(components, small_inputs):
    def state():
        s = components.scheduler
        return s.num_inference_steps, s.step_index, len(s.model_outputs), s.lower_order_nums

    before = state()
    first = denoise(components, small_inputs, SMALL)
    second = denoise(components, small_inputs, SMALL)
    assert torch.equal(first["latents"], second["latents"])
    assert state() == before


def test_denoise_rejects_inputs_that_do_not_fit(components, small_inputs):
    with pytest.raises(ValueError, match="condition"):
        denoise(components, small_inputs, replace(SMALL, height=128))
    missing = {k: v for k, v in small_inputs.items() if k != "negative_prompt_embeds"}
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        denoise(components, missing, SMALL)
    short = {**small_inputs, "prompt_embeds": small_inputs["prompt_embeds"][:, :16]}
    with pytest.raises(ValueError, match="max_sequence_length"):
        denoise(components, short, SMALL)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"height": 72}, "height"),
        ({"width": 100}, "width"),
        ({"num_frames": 16}, "num_frames"),
    ],
)
def test_resolution_is_checked_not_adjusted(components, image, overrides, field):
    p = WanParams.from_dict({**asdict(SMALL), **overrides})
    with pytest.raises(ValueError, match=f"^{field}:"):
        vae_encode(components, image, p)


def test_params_from_dict():
    full = {"prompt": "hi", "negative_prompt": "", "height": 64, "width": 64, "num_frames": 5,
            "steps": "6", "guidance_scale": 3, "seed": 5.0}
    p = WanParams.from_dict({**full, "unknown": [1]})
    assert p == WanParams(prompt="hi", negative_prompt="", height=64, width=64, num_frames=5, steps=6,
                          guidance_scale=3.0, seed=5)
    assert p.guidance_scale_2 is None and p.max_sequence_length == 512
    assert WanParams.from_dict({**full, "guidance_scale_2": "2.5"}).guidance_scale_2 == 2.5
    assert WanParams.from_dict({**full, "guidance_scale_2": None}).guidance_scale_2 is None
    # no job defaults here: every job field comes from the workflow's [params.*]
    for name in full:
        with pytest.raises(ValueError, match=f"^{name}: missing"):
            WanParams.from_dict({k: v for k, v in full.items() if k != name})
    for bad, field in [
        ({"steps": "four"}, "steps"),
        ({"steps": 0}, "steps"),
        ({"height": 1.5}, "height"),
        ({"guidance_scale": "nan"}, "guidance_scale"),
        ({"guidance_scale_2": "inf"}, "guidance_scale_2"),
        ({"guidance_scale_2": True}, "guidance_scale_2"),
        ({"seed": -1}, "seed"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"prompt": 3}, "prompt"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            WanParams.from_dict({**full, **bad})


def test_decode_image_rejects_garbage():
    good = SAMPLE.read_bytes()
    for data in (b"", b"definitely not an image", good[: len(good) // 3], b"\x89PNG\r\n\x1a\n" + b"\0" * 64):
        with pytest.raises(ValueError, match="^image:"):
            decode_image(data)


def test_decode_image_gives_rgb():
    buf = io.BytesIO()
    Image.new("RGBA", (40, 24), (10, 20, 30, 128)).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (40, 24)


def test_video_encode_makes_a_playable_mp4(outputs, tmp_path):
    data = video_encode(outputs["video"], fps=16)
    assert data[4:8] == b"ftyp"
    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    with imageio.v2.get_reader(str(path), "ffmpeg") as reader:
        meta = reader.get_meta_data()
        frames = np.stack([frame for frame in reader.iter_data()])
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert frames.shape == (17, 256, 256, 3)
    expected = (frames_from_video(outputs["video"]) * 255).astype(np.uint8)
    assert np.abs(frames.astype(np.float32) - expected).mean() < 8  # lossy, but the same picture


@pytest.fixture(scope="module")
def saved_model(components, tmp_path_factory):
    """The tiny model in the on-disk layout of Wan2.1-I2V-14B-480P-Diffusers."""
    path = tmp_path_factory.mktemp("wan-tiny")
    WanImageToVideoPipeline(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        image_encoder=components.image_encoder,
        image_processor=components.image_processor,
        transformer=components.transformer,
        vae=components.vae,
        scheduler=components.scheduler,
    ).save_pretrained(path)
    return path


def test_load_from_directory_matches_tiny(components, image, saved_model):
    def load(stage: str):
        c = load_components(str(saved_model), parts=STAGE_PARTS[stage], device="cpu")
        assert c.parts == STAGE_PARTS[stage]
        for part in ALL_PARTS:
            assert (getattr(c, part) is None) == (part not in STAGE_PARTS[stage]), part
        return c

    loaded = {**text_encode(load("text_encode"), SMALL), **image_encode(load("image_encode"), image, SMALL)}
    loaded.update(vae_encode(load("vae_encode"), image, SMALL))
    loaded.update(denoise(load("denoise"), loaded, SMALL))
    loaded.update(vae_decode(load("vae_decode"), loaded, SMALL))

    reference = run_all(components, image, SMALL)
    assert set(loaded) == set(reference)
    for name, tensor in reference.items():
        assert loaded[name].dtype == tensor.dtype, name
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_missing_model_path_is_a_clear_error(tmp_path, saved_model):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_components(str(missing), parts={"vae"}, device="cpu")
    partial = tmp_path / "partial"
    (partial / "vae").mkdir(parents=True)
    (partial / "vae" / "config.json").write_text((saved_model / "vae" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="'transformer'"):
        load_components(str(partial), parts={"vae"}, device="cpu")
    with pytest.raises(ValueError, match="^parts:"):
        load_components("tiny", parts={"unet"})


def test_stage_without_its_parts_is_refused(image):
    c = load_components("tiny", parts=STAGE_PARTS["vae_encode"], device="cpu")
    with pytest.raises(ValueError, match="text_encoder"):
        text_encode(c, SMALL)
