"""What the Wan compute tests share: a diffusers pipeline run from WanParams, the comparison of
two videos, and a state's trip through the tensor codec."""

from __future__ import annotations

import numpy as np
import torch

from onepiece.demo import SAMPLE  # noqa: F401 - the image the demo turns into a video, for the tests too
from stages.wan import WanParams
from transports import codec

TOLERANCE = 1e-4  # max abs difference of the frames, float32


def run_pipeline(pipe, p: WanParams, **kwargs) -> np.ndarray:
    """The frames of diffusers' own pipeline for ``p`` (``image=`` for image-to-video)."""
    pipe.set_progress_bar_config(disable=True)
    if p.guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = p.guidance_scale_2
    out = pipe(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        height=p.height,
        width=p.width,
        num_frames=p.num_frames,
        num_inference_steps=p.steps,
        guidance_scale=p.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(p.seed),
        output_type="np",
        max_sequence_length=p.max_sequence_length,
        **kwargs,
    )
    return out.frames[0]


def through_the_wire(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encode the state with the transport codec and decode it from a fresh buffer, as a
    peer process receives it."""
    encoded = codec.encode({"kind": "denoise-state"}, state)
    payload = bytearray(encoded.nbytes)
    offset = 0
    for part in encoded.parts:
        payload[offset : offset + part.nbytes] = part
        offset += part.nbytes
    return codec.decode_tensors(codec.decode_meta(encoded.meta), payload)


def assert_same_video(got: np.ndarray, expected: np.ndarray, tolerance: float = TOLERANCE) -> float:
    """The split's frames equal the pipeline's within ``tolerance``; returns the difference."""
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    assert diff <= tolerance, f"split differs from the pipeline by {diff}"
    assert float(expected.std()) > 1e-3  # a degenerate video (e.g. all one value) would match trivially
    print(f"max abs difference to the pipeline: {diff:.3g} ({expected.shape[0]} frames "
          f"{expected.shape[1]}x{expected.shape[2]})")  # the figure, with pytest -s
    return diff
