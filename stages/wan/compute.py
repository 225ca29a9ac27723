"""The pure compute of the Wan2.1 image-to-video stages.

``diffusers.WanImageToVideoPipeline.__call__`` cut into one function per model
component, each reproducing the pipeline's operations in the same order and
dtypes, so that running the stages one after the other gives the pipeline's
output (``tests/stages/test_wan_equivalence.py``).

Every stage takes its inputs on any device, moves them to the components' device
itself, runs under ``torch.inference_mode()`` and returns contiguous CPU tensors,
ready to be shipped to the next stage's process. Batch size is always 1.
"""

from __future__ import annotations

import copy
import io
import math
import tempfile
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean, retrieve_latents
from diffusers.utils import export_to_video, is_ftfy_available
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .models import TEXT_CONTEXT_LENGTH, WanComponents


class Cancelled(Exception):
    """Raised by ``denoise`` when ``should_stop()`` asks it to stop."""


@dataclass(frozen=True)
class WanParams:
    """The request parameters of one image-to-video generation (the pipeline's call
    arguments, with ``steps`` for ``num_inference_steps``)."""

    prompt: str
    negative_prompt: str = ""
    height: int = 256
    width: int = 256
    num_frames: int = 17
    steps: int = 4
    guidance_scale: float = 5.0
    seed: int = 0
    max_sequence_length: int = TEXT_CONTEXT_LENGTH

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a string")
        for name in ("height", "width", "num_frames", "steps", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed: must be an integer in [0, 2**64), got {self.seed!r}")
        scale = self.guidance_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"guidance_scale: must be a finite number, got {self.guidance_scale!r}")

    @property
    def do_classifier_free_guidance(self) -> bool:
        """The pipeline's rule: guidance (and so a negative prompt) only above 1."""
        return self.guidance_scale > 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WanParams:
        """Build from e.g. decoded JSON: unknown keys are ignored, integral floats
        and numeric strings are accepted for numbers; errors name the field."""
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value, kind = d[f.name], hints[f.name]
            if kind is str or isinstance(value, bool):
                kwargs[f.name] = value  # validated (and rejected) by __post_init__
                continue
            try:
                number = float(value) if kind is float else _to_int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{f.name}: expected {kind.__name__}, got {value!r}") from None
            kwargs[f.name] = number
        if "prompt" not in kwargs:
            raise ValueError("prompt: missing")
        return cls(**kwargs)


def _to_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value)


def check_params(c: WanComponents, p: WanParams) -> None:
    """Reject a resolution the pipeline would silently round (it only logs a
    warning), naming the field."""
    multiple_h = c.vae_scale_factor_spatial * c.patch_size[1]
    multiple_w = c.vae_scale_factor_spatial * c.patch_size[2]
    if p.height % multiple_h:
        raise ValueError(f"height: {p.height} is not a multiple of {multiple_h}")
    if p.width % multiple_w:
        raise ValueError(f"width: {p.width} is not a multiple of {multiple_w}")
    if p.num_frames % c.vae_scale_factor_temporal != 1:
        raise ValueError(f"num_frames: {p.num_frames} is not of the form {c.vae_scale_factor_temporal}k+1")


def latent_shape(c: WanComponents, p: WanParams) -> tuple[int, int, int, int, int]:
    """Shape of the denoised latents: (1, z_dim, latent frames, latent h, latent w)."""
    return (
        1,
        c.latent_channels,
        (p.num_frames - 1) // c.vae_scale_factor_temporal + 1,
        p.height // c.vae_scale_factor_spatial,
        p.width // c.vae_scale_factor_spatial,
    )


def _out(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    # Outside inference_mode a clone is a plain tensor: receivers may then update
    # it in place, which PyTorch forbids on inference tensors.
    if t.is_inference() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _require(c: WanComponents, *names: str) -> None:
    missing = [n for n in names if getattr(c, n) is None]
    if missing:
        raise ValueError(f"components: {', '.join(missing)} not loaded")


def decode_image(data: bytes) -> PIL.Image.Image:
    """Decode an uploaded image to RGB, honouring EXIF orientation as
    ``diffusers.utils.load_image`` does.

    Raises:
        ValueError: ``"image: ..."`` when the bytes are not a decodable image.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ValueError("image: empty or not bytes")
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            return PIL.ImageOps.exif_transpose(img).convert("RGB")
    # Pillow's decoders raise many exception types on hostile or truncated input
    # (OSError, SyntaxError, struct.error, DecompressionBombError, ...).
    except Exception as e:
        raise ValueError(f"image: cannot decode ({type(e).__name__}: {e})") from e


def _t5_prompt_embeds(c: WanComponents, prompt: str, max_sequence_length: int) -> torch.Tensor:
    # WanImageToVideoPipeline._get_t5_prompt_embeds for one prompt, one video.
    text_inputs = c.tokenizer(
        [prompt_clean(prompt)],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    text_input_ids, mask = text_inputs.input_ids, text_inputs.attention_mask
    seq_lens = mask.gt(0).sum(dim=1).long()
    prompt_embeds = c.text_encoder(text_input_ids.to(c.device), mask.to(c.device)).last_hidden_state
    prompt_embeds = prompt_embeds.to(dtype=c.text_encoder.dtype, device=c.device)
    prompt_embeds = [u[:v] for u, v in zip(prompt_embeds, seq_lens)]
    prompt_embeds = torch.stack(
        [torch.cat([u, u.new_zeros(max_sequence_length - u.size(0), u.size(1))]) for u in prompt_embeds], dim=0
    )
    return prompt_embeds.to(c.dtype)


def text_encode(c: WanComponents, p: WanParams) -> dict[str, torch.Tensor]:
    """Encode the prompt (and, when guidance is on, the negative prompt) with UMT5.

    Returns ``{"prompt_embeds", "negative_prompt_embeds"?}``, each
    ``[1, max_sequence_length, text_dim]`` in the transformer dtype (``c.dtype``).
    """
    _require(c, "tokenizer", "text_encoder")
    if not is_ftfy_available():
        raise ImportError("text_encode needs ftfy, as WanImageToVideoPipeline does (pip install ftfy)")
    with torch.inference_mode():
        out = {"prompt_embeds": _t5_prompt_embeds(c, p.prompt, p.max_sequence_length)}
        if p.do_classifier_free_guidance:
            out["negative_prompt_embeds"] = _t5_prompt_embeds(c, p.negative_prompt, p.max_sequence_length)
    return {k: _out(v) for k, v in out.items()}


def _check_image(image: Any) -> None:
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"image: expected a PIL image, got {type(image).__name__}")


def image_encode(c: WanComponents, image: PIL.Image.Image, p: WanParams) -> dict[str, torch.Tensor]:
    """CLIP-encode the conditioning image (penultimate hidden state, as the pipeline).

    Returns ``{"image_embeds": [1, clip tokens, clip hidden size]}`` in ``c.dtype``.
    ``p`` is unused (CLIP has its own fixed input size); it keeps the stage
    signatures uniform.
    """
    _require(c, "image_processor", "image_encoder")
    _check_image(image)
    with torch.inference_mode():
        inputs = c.image_processor(images=image, return_tensors="pt").to(c.device)
        image_embeds = c.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
        image_embeds = image_embeds.to(c.dtype)
    return {"image_embeds": _out(image_embeds)}


def _latents_mean_std(vae: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    z_dim = vae.config.z_dim
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(device, dtype)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(device, dtype)
    return latents_mean, latents_std


def vae_encode(c: WanComponents, image: PIL.Image.Image, p: WanParams) -> dict[str, torch.Tensor]:
    """Build the I2V condition: the first-frame mask concatenated with the
    normalised VAE latents of [image, black frames...], as ``prepare_latents`` does.

    Returns ``{"condition": [1, temporal factor + z_dim, latent frames, h/8, w/8]}`` float32.
    """
    _require(c, "vae")
    _check_image(image)
    check_params(c, p)
    height, width, num_frames = p.height, p.width, p.num_frames
    _, _, _, latent_height, latent_width = latent_shape(c, p)
    temporal = c.vae_scale_factor_temporal
    with torch.inference_mode():
        pixels = c.video_processor.preprocess(image, height=height, width=width).to(c.device, dtype=torch.float32)
        pixels = pixels.unsqueeze(2)
        video_condition = torch.cat(
            [pixels, pixels.new_zeros(pixels.shape[0], pixels.shape[1], num_frames - 1, height, width)], dim=2
        )
        video_condition = video_condition.to(device=c.device, dtype=c.vae.dtype)
        latents_mean, latents_std = _latents_mean_std(c.vae, c.device, torch.float32)
        latent_condition = retrieve_latents(c.vae.encode(video_condition), sample_mode="argmax")
        latent_condition = latent_condition.to(device=c.device, dtype=torch.float32)
        latent_condition = (latent_condition - latents_mean) * latents_std

        mask_lat_size = torch.ones(1, 1, num_frames, latent_height, latent_width)
        mask_lat_size[:, :, list(range(1, num_frames))] = 0
        first_frame_mask = torch.repeat_interleave(mask_lat_size[:, :, 0:1], dim=2, repeats=temporal)
        mask_lat_size = torch.concat([first_frame_mask, mask_lat_size[:, :, 1:, :]], dim=2)
        mask_lat_size = mask_lat_size.view(1, -1, temporal, latent_height, latent_width).transpose(1, 2)
        mask_lat_size = mask_lat_size.to(latent_condition.device)
        condition = torch.concat([mask_lat_size, latent_condition], dim=1)
    return {"condition": _out(condition)}


def _input(inputs: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    value = inputs.get(name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: missing input tensor")
    return value


def denoise(
    c: WanComponents,
    inputs: Mapping[str, torch.Tensor],
    p: WanParams,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the pipeline's denoising loop from seeded noise.

    Args:
        inputs: ``prompt_embeds``, ``negative_prompt_embeds`` (when guidance > 1),
            ``image_embeds`` and ``condition`` as the other stages return them.
        on_step: called as ``on_step(done, total)`` after each step.
        should_stop: polled before each step; ``True`` raises ``Cancelled``.

    Returns ``{"latents": [1, z_dim, latent frames, h/8, w/8]}`` float32. The noise is
    ``torch.Generator("cpu").manual_seed(p.seed)``'s first draw, as the pipeline's
    ``prepare_latents`` makes it from such a generator.
    """
    _require(c, "transformer", "scheduler")
    check_params(c, p)
    transformer = c.transformer
    transformer_dtype = transformer.dtype
    shape = latent_shape(c, p)
    expected_condition = (1, c.vae_scale_factor_temporal + c.latent_channels, *shape[2:])
    condition = _input(inputs, "condition")
    if tuple(condition.shape) != expected_condition:
        raise ValueError(f"condition: shape {tuple(condition.shape)} != {expected_condition} for these params")
    prompt_embeds = _input(inputs, "prompt_embeds")
    if transformer.config.added_kv_proj_dim is not None and prompt_embeds.shape[1] != TEXT_CONTEXT_LENGTH:
        # The I2V attention takes the last 512 context tokens as text; any other
        # length would silently mix image and text tokens.
        raise ValueError(f"max_sequence_length: this model needs {TEXT_CONTEXT_LENGTH}, got {prompt_embeds.shape[1]}")
    cfg = p.do_classifier_free_guidance
    with torch.inference_mode():
        prompt_embeds = prompt_embeds.to(c.device, transformer_dtype)
        negative_prompt_embeds = None
        if cfg:
            negative_prompt_embeds = _input(inputs, "negative_prompt_embeds").to(c.device, transformer_dtype)
        image_embeds = _input(inputs, "image_embeds").to(c.device, transformer_dtype)
        condition = condition.to(c.device, torch.float32)

        # A private copy: UniPC keeps the previous model outputs between steps, and a
        # shared scheduler must not carry them from one request into another.
        scheduler = copy.deepcopy(c.scheduler)
        scheduler.set_timesteps(p.steps, device=c.device)
        timesteps = scheduler.timesteps
        generator = torch.Generator("cpu").manual_seed(p.seed)
        latents = randn_tensor(shape, generator=generator, device=c.device, dtype=torch.float32)

        total = len(timesteps)
        for i, t in enumerate(timesteps):
            if should_stop is not None and should_stop():
                raise Cancelled(f"cancelled before step {i + 1}/{total}")
            latent_model_input = torch.cat([latents, condition], dim=1).to(transformer_dtype)
            timestep = t.expand(latents.shape[0])
            with transformer.cache_context("cond"):
                noise_pred = transformer(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    encoder_hidden_states=prompt_embeds,
                    encoder_hidden_states_image=image_embeds,
                    attention_kwargs=None,
                    return_dict=False,
                )[0]
            if cfg:
                with transformer.cache_context("uncond"):
                    noise_uncond = transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=negative_prompt_embeds,
                        encoder_hidden_states_image=image_embeds,
                        attention_kwargs=None,
                        return_dict=False,
                    )[0]
                    noise_pred = noise_uncond + p.guidance_scale * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
    return {"latents": _out(latents)}


def vae_decode(c: WanComponents, inputs: Mapping[str, torch.Tensor], p: WanParams) -> dict[str, torch.Tensor]:
    """De-normalise the latents and decode them with the VAE.

    Returns ``{"video": [1, 3, num_frames, height, width]}`` in the VAE dtype
    (float32), values nominally in [-1, 1]: the raw decoder output, before the
    pipeline's postprocess.
    """
    _require(c, "vae")
    latents = _input(inputs, "latents")
    expected = latent_shape(c, p)
    if tuple(latents.shape) != expected:
        raise ValueError(f"latents: shape {tuple(latents.shape)} != {expected} for these params")
    with torch.inference_mode():
        latents = latents.to(device=c.device, dtype=c.vae.dtype)
        latents_mean, latents_std = _latents_mean_std(c.vae, latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        video = c.vae.decode(latents, return_dict=False)[0]
    return {"video": _out(video)}


def frames_from_video(video: torch.Tensor) -> np.ndarray:
    """The pipeline's ``output_type="np"`` frames of batch 0: float32 ``[F, H, W, 3]`` in [0, 1]."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video: expected [B, 3, F, H, W], got {tuple(video.shape)}")
    # postprocess does not depend on the VAE scale factor; any VideoProcessor will do
    return VideoProcessor().postprocess_video(video, output_type="np")[0]


def video_encode(video: torch.Tensor, *, fps: int = 16) -> bytes:
    """Encode the decoded video as an H.264 (yuv420p) mp4, exactly as
    ``diffusers.utils.export_to_video`` would write the pipeline's frames."""
    frames = frames_from_video(video)
    with tempfile.TemporaryDirectory(prefix="wan-video-") as tmp:
        path = Path(tmp) / "video.mp4"
        export_to_video(list(frames), str(path), fps=fps)
        return path.read_bytes()
