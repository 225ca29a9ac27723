"""The pure compute of the Wan video stages.

diffusers' ``WanImageToVideoPipeline.__call__`` (Wan2.1 I2V, Wan2.2 A14B I2V)
and ``WanPipeline.__call__`` (Wan2.1 T2V, Wan2.2 A14B T2V) cut into one function
per model component, each reproducing the pipeline's operations in the same
order and dtypes, so that running the stages one after the other gives the
pipeline's output (``tests/stages/test_wan_equivalence.py``,
``tests/stages/test_wan_workflows_equivalence.py``).

A two-expert model (Wan2.2 A14B) denoises in two stages, one per expert: the
high-noise expert runs the steps at or above the boundary and returns a
*denoise state* (``STATE_PREFIX`` tensors: latents, step count, scheduler
memory), the low-noise expert continues from it. Any denoise can also stop at
a step boundary and hand such a state to another process; resuming it gives
bit-identical latents (``tests/stages/test_wan_state.py``).

Every stage takes its inputs on any device, moves them to the components' device
itself, runs under ``torch.inference_mode()`` and returns contiguous CPU tensors,
ready to be shipped to the next stage's process. Batch size is always 1.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import tempfile
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean, retrieve_latents
from diffusers.utils import export_to_video, is_ftfy_available
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .models import TEXT_CONTEXT_LENGTH, WanComponents


class Cancelled(Exception):
    """Raised by ``denoise`` when ``should_stop()`` asks it to stop."""


@dataclass(frozen=True)
class WanParams:
    """The request parameters of one generation (the pipeline's call arguments,
    with ``steps`` for ``num_inference_steps``).

    The job fields have no defaults here: they are declared once, in the
    workflow's ``[params.*]`` tables, and reach the stage filled in.
    ``guidance_scale_2`` is the low-noise expert's guidance (two-expert models
    only; ``None``: ``guidance_scale``). ``max_sequence_length`` is a fact of the
    model, not a job parameter.
    """

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    seed: int
    guidance_scale_2: float | None = None
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
        for name in ("guidance_scale", "guidance_scale_2"):
            scale = getattr(self, name)
            if scale is None and name == "guidance_scale_2":
                continue
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
                raise ValueError(f"{name}: must be a finite number, got {scale!r}")

    @property
    def do_classifier_free_guidance(self) -> bool:
        """The pipeline's rule: guidance (and so a negative prompt) only when
        ``guidance_scale`` is above 1, for both experts whatever ``guidance_scale_2``."""
        return self.guidance_scale > 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WanParams:
        """Build from e.g. decoded JSON: unknown keys are ignored, integral floats
        and numeric strings are accepted for numbers, ``None`` for an optional
        field; errors name the field (``"<field>: missing"`` for a required one)."""
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING:
                    raise ValueError(f"{f.name}: missing")
                continue
            value, kind = d[f.name], hints[f.name]
            optional = type(None) in typing.get_args(kind)
            if optional:
                if value is None:
                    kwargs[f.name] = None
                    continue
                kind = next(k for k in typing.get_args(kind) if k is not type(None))
            if kind is str or isinstance(value, bool):
                kwargs[f.name] = value  # validated (and rejected) by __post_init__
                continue
            try:
                number = float(value) if kind is float else _to_int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{f.name}: expected {kind.__name__}, got {value!r}") from None
            kwargs[f.name] = number
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


# -- the denoise state ---------------------------------------------------------

#: Every tensor of a denoise state is named with this prefix.
STATE_PREFIX = "state."
STATE_VERSION = 1

_K_VERSION = "state.version"
_K_LATENTS = "state.latents"
_K_STEP = "state.step"
_K_TOTAL = "state.total"
_K_STEPS = "state.steps"
_K_TIMESTEPS = "state.scheduler.timesteps"
_K_SIGMAS = "state.scheduler.sigmas"

# What UniPCMultistepScheduler carries from one step to the next (set_timesteps
# rebuilds the rest from the config), as (attribute, state key, kind). Each value
# may be None, so each has a presence flag, ``<key>.present``: one bool, or one
# per list slot. "tensor": the key holds it when present; "int": an int64 scalar
# (0 when absent); "tensors": ``<key>.<slot>`` per present slot; "ints": an int64
# vector, one per slot (0 when absent).
_UNIPC_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("model_outputs", "state.scheduler.model_outputs", "tensors"),
    ("timestep_list", "state.scheduler.timestep_list", "ints"),
    ("last_sample", "state.scheduler.last_sample", "tensor"),
    ("this_order", "state.scheduler.this_order", "int"),
    ("lower_order_nums", "state.scheduler.lower_order_nums", "int"),
    ("_step_index", "state.scheduler.step_index", "int"),
    ("_begin_index", "state.scheduler.begin_index", "int"),
)


def is_state(d: Mapping[str, Any]) -> bool:
    """Whether ``d`` (a denoise result, or a stage's inputs) holds a denoise state."""
    return any(isinstance(k, str) and k.startswith(STATE_PREFIX) for k in d)


def state_step(d: Mapping[str, torch.Tensor]) -> int:
    """The number of steps a state has done (``state.step``), counted over the
    whole schedule. Only that tensor is checked; ``check_state`` checks the rest."""
    step = _take(d, _K_STEP, torch.int64, ())
    if int(step) < 0:
        raise ValueError(f"{_K_STEP}: negative ({int(step)})")
    return int(step)


def _take(state: Mapping[str, Any], key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    t = state.get(key)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key}: missing from the denoise state")
    if t.dtype != dtype:
        raise ValueError(f"{key}: dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _check_state_scheduler(scheduler: Any) -> None:
    # Another scheduler keeps other memory between steps (and solver_p a whole
    # second scheduler's), which _UNIPC_FIELDS would silently drop.
    if type(scheduler) is not UniPCMultistepScheduler or scheduler.solver_p is not None:
        raise ValueError(
            f"scheduler: a denoise state is defined for UniPCMultistepScheduler without solver_p,"
            f" not {type(scheduler).__name__}"
        )


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy the loop can never write to, and receivers may (not an inference tensor)."""
    return t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _capture_state(scheduler: Any, latents: torch.Tensor, done: int, steps: int) -> dict[str, torch.Tensor]:
    """The state after ``done`` steps: everything a fresh scheduler lacks to continue exactly.

    No generator state: the seeded generator draws the initial noise only, and
    UniPC (a deterministic solver) never draws again.
    """
    _check_state_scheduler(scheduler)
    with torch.inference_mode(False):
        out = {
            _K_VERSION: torch.tensor(STATE_VERSION),
            _K_LATENTS: _owned(latents),
            _K_STEP: torch.tensor(done),
            _K_TOTAL: torch.tensor(len(scheduler.timesteps)),
            _K_STEPS: torch.tensor(steps),
            _K_TIMESTEPS: _owned(scheduler.timesteps),
            _K_SIGMAS: _owned(scheduler.sigmas),
        }
        for attr, key, kind in _UNIPC_FIELDS:
            value = getattr(scheduler, attr, None)  # this_order exists from the first step on
            if kind == "tensor":
                out[f"{key}.present"] = torch.tensor(value is not None)
                if value is not None:
                    out[key] = _owned(value)
            elif kind == "int":
                out[f"{key}.present"] = torch.tensor(value is not None)
                out[key] = torch.tensor(0 if value is None else int(value))
            elif kind == "tensors":
                out[f"{key}.present"] = torch.tensor([v is not None for v in value])
                out.update({f"{key}.{slot}": _owned(v) for slot, v in enumerate(value) if v is not None})
            else:
                out[f"{key}.present"] = torch.tensor([v is not None for v in value])
                out[key] = torch.tensor([0 if v is None else int(v) for v in value], dtype=torch.int64)
    return out


def _restore_state(
    scheduler: Any, state: Mapping[str, Any], shape: tuple[int, ...], p: WanParams, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Check ``state`` (from another process: trust nothing) against ``scheduler``,
    a fresh copy already set to ``p.steps``, and load it there.

    Returns the latents on ``device`` and the steps done. Raises ValueError naming
    the offending key for a missing, unknown, mis-shaped or inconsistent tensor.
    """
    _check_state_scheduler(scheduler)
    if not isinstance(state, Mapping):
        raise ValueError(f"state: expected a mapping of tensors, got {type(state).__name__}")
    seen: set[str] = set()

    def take(key: str, dtype: torch.dtype, shape_: tuple[int, ...]) -> torch.Tensor:
        seen.add(key)
        return _take(state, key, dtype, shape_)

    def take_int(key: str) -> int:
        return int(take(key, torch.int64, ()))

    if (version := take_int(_K_VERSION)) != STATE_VERSION:
        raise ValueError(f"{_K_VERSION}: {version}, this code reads version {STATE_VERSION}")
    if (steps := take_int(_K_STEPS)) != p.steps:
        raise ValueError(f"{_K_STEPS}: the state is of a {steps}-step run, this job has {p.steps} steps")
    total = len(scheduler.timesteps)
    if (state_total := take_int(_K_TOTAL)) != total:
        raise ValueError(f"{_K_TOTAL}: the state's schedule has {state_total} steps, this one {total}")
    step = take_int(_K_STEP)
    if not 0 <= step <= total:
        raise ValueError(f"{_K_STEP}: {step} is outside [0, {total}]")
    # the same schedule, i.e. the same scheduler config as the worker that made it
    if not torch.equal(take(_K_TIMESTEPS, torch.int64, (total,)), scheduler.timesteps.cpu()):
        raise ValueError(f"{_K_TIMESTEPS}: not this worker's schedule (another scheduler config)")
    if not torch.equal(take(_K_SIGMAS, torch.float32, tuple(scheduler.sigmas.shape)), scheduler.sigmas.cpu()):
        raise ValueError(f"{_K_SIGMAS}: not this worker's schedule (another scheduler config)")
    latents = take(_K_LATENTS, torch.float32, shape)

    order = scheduler.config.solver_order
    filled = min(step, order)  # UniPC's memory after `step` steps: the last `filled` slots
    presence: dict[str, Any] = {
        "model_outputs": [False] * (order - filled) + [True] * filled,
        "timestep_list": [False] * (order - filled) + [True] * filled,
        "last_sample": step > 0,
        "this_order": step > 0,
        "lower_order_nums": True,
        "_step_index": step > 0,
    }
    ranges = {"this_order": (1, order), "lower_order_nums": (filled, filled), "_step_index": (1, total),
              "_begin_index": (0, 0)}
    values: dict[str, Any] = {}
    for attr, key, kind in _UNIPC_FIELDS:
        if kind in ("tensor", "int"):
            present: Any = bool(take(f"{key}.present", torch.bool, ()))
        else:
            present = take(f"{key}.present", torch.bool, (order,)).tolist()
        if attr in presence and present != presence[attr]:
            raise ValueError(f"{key}.present: {present} does not fit a state at step {step}")
        if kind == "tensor":
            values[attr] = take(key, torch.float32, shape).to(device, copy=True) if present else None
        elif kind == "int":
            value = take_int(key)
            low, high = ranges[attr]
            if present and not low <= value <= high:
                raise ValueError(f"{key}: {value} is outside [{low}, {high}] for a state at step {step}")
            values[attr] = value if present else None
        elif kind == "tensors":
            values[attr] = [
                take(f"{key}.{slot}", torch.float32, shape).to(device, copy=True) if here else None
                for slot, here in enumerate(present)
            ]
        else:
            ints = take(key, torch.int64, (order,)).tolist()
            values[attr] = [
                torch.tensor(v, dtype=torch.int64, device=scheduler.timesteps.device) if here else None
                for v, here in zip(ints, present)
            ]
    unknown = sorted(k for k in state if k not in seen)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a key of a denoise state")
    for attr, value in values.items():
        setattr(scheduler, attr, value)
    return latents.to(device, copy=True), step


def _fresh_scheduler(c: WanComponents, p: WanParams) -> Any:
    # A private copy: UniPC keeps the previous model outputs between steps, and a
    # shared scheduler must not carry them from one request into another.
    scheduler = copy.deepcopy(c.scheduler)
    scheduler.set_timesteps(p.steps, device=c.device)
    return scheduler


def _expert_range(c: WanComponents, timesteps: torch.Tensor) -> range:
    """The pipeline's expert rule on a schedule: ``transformer`` (high) runs the
    steps with ``t >= boundary_ratio * num_train_timesteps``, ``transformer_2``
    (low) the others. The timesteps decrease, so the high steps come first."""
    total = len(timesteps)
    if c.expert is None:
        return range(total)
    if c.boundary_ratio is None:
        raise ValueError(f"components: the {c.expert}-noise expert has no boundary_ratio")
    boundary_timestep = c.boundary_ratio * c.scheduler.config.num_train_timesteps
    high = [bool(t >= boundary_timestep) for t in timesteps]
    first_low = high.index(False) if False in high else total
    if any(high[first_low:]):
        raise ValueError("scheduler: its timesteps cross the expert boundary more than once")
    return range(first_low) if c.expert == "high" else range(first_low, total)


def expert_steps(c: WanComponents, p: WanParams) -> range:
    """The step indices (0-based, over the whole schedule) this worker's
    transformer runs for ``p``: all of them for a one-DiT model, the steps at or
    above the boundary for a ``"high"`` expert, the rest for a ``"low"`` one."""
    _require(c, "scheduler")
    return _expert_range(c, _fresh_scheduler(c, p).timesteps)


def _resume(c: WanComponents, p: WanParams, scheduler: Any, state: Mapping[str, Any]) -> tuple[torch.Tensor, int]:
    latents, step = _restore_state(scheduler, state, latent_shape(c, p), p, c.device)
    run = _expert_range(c, scheduler.timesteps)
    if step < run.start:
        raise ValueError(
            f"{_K_STEP}: {step} steps done, but this {c.expert}-noise expert starts at step {run.start}:"
            " steps above the boundary remain for the high-noise expert"
        )
    if step > run.stop:
        raise ValueError(f"{_K_STEP}: {step} steps done, past this {c.expert}-noise expert's last step {run.stop}")
    return latents, step


def check_state(c: WanComponents, p: WanParams, state: Mapping[str, Any]) -> int:
    """Check that ``denoise(c, ..., p, state=state)`` would accept ``state`` and
    return its step, without running anything.

    Raises:
        ValueError: naming the key of a missing, unknown, mis-shaped or
            inconsistent tensor, a state of another job shape or schedule, or one
            outside this expert's steps.
    """
    _require(c, "scheduler")
    check_params(c, p)
    with torch.inference_mode():
        return _resume(c, p, _fresh_scheduler(c, p), state)[1]


def _offer_snapshot(
    snapshot: Callable[[int, Callable[[], dict[str, torch.Tensor]]], None],
    done: int,
    capture: Callable[[], dict[str, torch.Tensor]],
) -> None:
    """Call ``snapshot(done, make_state)``; ``make_state`` is valid during the call only,
    since the loop then moves the scheduler on."""
    live = True

    def make_state() -> dict[str, torch.Tensor]:
        if not live:
            raise RuntimeError("make_state: call it inside the snapshot callback, the loop has moved on")
        return capture()

    try:
        snapshot(done, make_state)
    finally:
        live = False


def denoise(
    c: WanComponents,
    inputs: Mapping[str, torch.Tensor],
    p: WanParams,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    snapshot: Callable[[int, Callable[[], dict[str, torch.Tensor]]], None] | None = None,
    yield_now: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the pipeline's denoising loop over the steps this worker's transformer
    covers (``expert_steps``): all of them for a one-DiT model, up to the boundary
    for a ``"high"`` expert, from the boundary for a ``"low"`` one.

    What the transformer is fed follows from its config, as in the pipelines:
    ``in_channels == z_dim`` is text-to-video (``WanPipeline``: the latents alone);
    ``2 * z_dim + 4`` is image-to-video (``WanImageToVideoPipeline``: latents
    concatenated with ``condition``), with CLIP ``image_embeds`` when the model has
    an ``image_dim`` (Wan2.1; Wan2.2 A14B has none).

    Args:
        inputs: ``prompt_embeds``, ``negative_prompt_embeds`` (when guidance > 1),
            and for image-to-video ``condition`` and (Wan2.1) ``image_embeds``, as
            the other stages return them.
        state: a denoise state to continue from (``STATE_PREFIX`` tensors, from
            another process: it is checked, see ``check_state``). ``None`` starts
            from ``torch.Generator("cpu").manual_seed(p.seed)``'s first draw, as
            the pipeline's ``prepare_latents`` does; a low-noise expert cannot
            start that way.
        on_step: called as ``on_step(done, total)`` after each step, ``done``
            counted from 1 over the whole schedule.
        should_stop: polled before each step; ``True`` raises ``Cancelled``.
        snapshot: called as ``snapshot(done, make_state)`` after each step that
            leaves this worker more to do; ``make_state()``, called during that
            call, returns the state at that boundary (fresh CPU copies), so the
            caller decides when a checkpoint is worth its cost.
        yield_now: polled at the same boundaries; ``True`` stops and returns the
            state, for another process to continue.

    Returns ``{"latents": [1, z_dim, latent frames, h/8, w/8]}`` float32 when the
    schedule is finished, else the state (a ``"high"`` expert at the boundary, or
    a yield): a flat dict of contiguous CPU tensors named ``state.*``.
    """
    _require(c, "transformer", "scheduler")
    check_params(c, p)
    if c.expert is None and p.guidance_scale_2 is not None:
        raise ValueError("guidance_scale_2: only a two-expert model (Wan2.2 A14B) has a low-noise expert to guide")
    transformer = c.transformer
    transformer_dtype = transformer.dtype
    shape = latent_shape(c, p)
    in_channels = transformer.config.in_channels
    i2v_channels = c.latent_channels + c.vae_scale_factor_temporal + c.latent_channels
    if in_channels not in (c.latent_channels, i2v_channels):
        raise ValueError(
            f"transformer: in_channels {in_channels} is neither T2V ({c.latent_channels}) nor I2V ({i2v_channels})"
        )
    i2v = in_channels == i2v_channels
    condition = None
    if i2v:
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
    guidance_scale = p.guidance_scale
    if c.expert == "low" and p.guidance_scale_2 is not None:
        guidance_scale = p.guidance_scale_2
    with torch.inference_mode():
        prompt_embeds = prompt_embeds.to(c.device, transformer_dtype)
        negative_prompt_embeds = None
        if cfg:
            negative_prompt_embeds = _input(inputs, "negative_prompt_embeds").to(c.device, transformer_dtype)
        image_embeds = None
        if i2v and transformer.config.image_dim is not None:
            image_embeds = _input(inputs, "image_embeds").to(c.device, transformer_dtype)
        if condition is not None:
            condition = condition.to(c.device, torch.float32)

        scheduler = _fresh_scheduler(c, p)
        timesteps = scheduler.timesteps
        total = len(timesteps)
        run = _expert_range(c, timesteps)
        if state is not None:
            latents, done = _resume(c, p, scheduler, state)
        elif run.start > 0:
            raise ValueError(f"state: the {c.expert}-noise expert continues the high-noise expert's state; none given")
        else:
            if not i2v:
                scheduler.set_begin_index(0)  # WanPipeline does; WanImageToVideoPipeline does not
            generator = torch.Generator("cpu").manual_seed(p.seed)
            latents = randn_tensor(shape, generator=generator, device=c.device, dtype=torch.float32)
            done = 0

        for i in range(done, run.stop):
            t = timesteps[i]
            if should_stop is not None and should_stop():
                raise Cancelled(f"cancelled before step {i + 1}/{total}")
            if i2v:
                latent_model_input = torch.cat([latents, condition], dim=1).to(transformer_dtype)
                cache_kwargs: dict[str, Any] = {}
            else:
                latent_model_input = latents.to(transformer_dtype)
                # what WanPipeline tells cache hooks (WanImageToVideoPipeline tells them nothing)
                cache_kwargs = {"step_index": i, "sigma": float(scheduler.sigmas[i]), "num_inference_steps": total}
            timestep = t.expand(latents.shape[0])
            with transformer.cache_context("cond", **cache_kwargs):
                noise_pred = transformer(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    encoder_hidden_states=prompt_embeds,
                    encoder_hidden_states_image=image_embeds,
                    attention_kwargs=None,
                    return_dict=False,
                )[0]
            if cfg:
                with transformer.cache_context("uncond", **cache_kwargs):
                    noise_uncond = transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=negative_prompt_embeds,
                        encoder_hidden_states_image=image_embeds,
                        attention_kwargs=None,
                        return_dict=False,
                    )[0]
                noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
            if i + 1 < run.stop:
                capture = functools.partial(_capture_state, scheduler, latents, i + 1, p.steps)
                if snapshot is not None:
                    _offer_snapshot(snapshot, i + 1, capture)
                if yield_now is not None and yield_now():
                    return capture()
        if run.stop < total:
            return _capture_state(scheduler, latents, run.stop, p.steps)
    return {"latents": _out(latents)}


def vae_decode(c: WanComponents, inputs: Mapping[str, torch.Tensor], p: WanParams,
               out: Callable[[tuple, torch.dtype], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """De-normalise the latents and decode them with the VAE.

    Returns ``{"video": [1, 3, num_frames, height, width]}`` in the VAE dtype
    (float32), values nominally in [-1, 1]: the raw decoder output, before the
    pipeline's postprocess. ``out(shape, dtype)`` gives the tensor the frames are
    copied into from the decoder's output (on CUDA, the one device-to-host
    copy): the worker's ``TaskContext.output``, memory the consumer reads.
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
    if out is None:
        return {"video": _out(video)}
    frames = out(tuple(video.shape), video.dtype)
    frames.copy_(video)  # outside inference_mode: a plain tensor, as _out makes
    return {"video": frames}


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
