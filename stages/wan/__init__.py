"""The Wan video models (Wan2.1 I2V/T2V, Wan2.2 A14B I2V/T2V) split into stages:
components (``models``) and pure compute (``compute``)."""

from .compute import (
    STATE_PREFIX,
    Cancelled,
    WanParams,
    check_params,
    check_state,
    decode_image,
    denoise,
    expert_steps,
    frames_from_video,
    image_encode,
    is_state,
    latent_shape,
    state_step,
    text_encode,
    vae_decode,
    vae_encode,
    video_encode,
)
from .models import ALL_PARTS, IDENTITIES, STAGE_PARTS, ModelIdentity, WanComponents, load_components

__all__ = [
    "ALL_PARTS",
    "IDENTITIES",
    "STAGE_PARTS",
    "STATE_PREFIX",
    "Cancelled",
    "ModelIdentity",
    "WanComponents",
    "WanParams",
    "check_params",
    "check_state",
    "decode_image",
    "denoise",
    "expert_steps",
    "frames_from_video",
    "image_encode",
    "is_state",
    "latent_shape",
    "load_components",
    "state_step",
    "text_encode",
    "vae_decode",
    "vae_encode",
    "video_encode",
]
