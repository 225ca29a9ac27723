"""Wan2.1 image-to-video split into stages: components (``models``) and pure compute (``compute``)."""

from .compute import (
    Cancelled,
    WanParams,
    check_params,
    decode_image,
    denoise,
    frames_from_video,
    image_encode,
    latent_shape,
    text_encode,
    vae_decode,
    vae_encode,
    video_encode,
)
from .models import ALL_PARTS, STAGE_PARTS, WanComponents, load_components

__all__ = [
    "ALL_PARTS",
    "STAGE_PARTS",
    "Cancelled",
    "WanComponents",
    "WanParams",
    "check_params",
    "decode_image",
    "denoise",
    "frames_from_video",
    "image_encode",
    "latent_shape",
    "load_components",
    "text_encode",
    "vae_decode",
    "vae_encode",
    "video_encode",
]
