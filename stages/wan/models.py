"""The components of Wan2.1 image-to-video, loaded per stage.

Each stage service holds only the parts it runs (``STAGE_PARTS``). The parts are
exactly the modules ``diffusers.WanImageToVideoPipeline`` is built from, so the
split stages can reproduce the pipeline's arithmetic operation for operation.

``model="tiny"`` builds every part from small fixed-seed configs, fully offline,
so tests and demos run on a CPU in seconds. Any other value is a local diffusers
directory (e.g. ``Wan2.1-I2V-14B-480P-Diffusers``) read with
``local_files_only=True``.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.video_processor import VideoProcessor

ALL_PARTS: frozenset[str] = frozenset(
    {"tokenizer", "text_encoder", "image_processor", "image_encoder", "vae", "transformer", "scheduler"}
)

STAGE_PARTS: dict[str, frozenset[str]] = {
    "text_encode": frozenset({"tokenizer", "text_encoder"}),
    "image_encode": frozenset({"image_processor", "image_encoder"}),
    "vae_encode": frozenset({"vae"}),
    # The latent shape and scale factors denoise needs come from the VAE's
    # config (always read), not from the VAE weights.
    "denoise": frozenset({"transformer", "scheduler"}),
    "vae_decode": frozenset({"vae"}),
    "video_encode": frozenset(),
}

# Text length the Wan2.1 I2V attention processor assumes: it splits the
# cross-attention context as [image tokens | last 512 tokens = text].
TEXT_CONTEXT_LENGTH = 512

TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    # latents (z_dim) + first-frame mask (vae_scale_factor_temporal) + condition (z_dim)
    "in_channels": 16 + 4 + 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "image_dim": 16,
    # must equal the inner dim (heads * head_dim), as 5120 does in the 14B model
    "added_kv_proj_dim": 24,
    "rope_max_seq_len": 32,
}
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
TINY_IMAGE_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "projection_dim": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
}
# The scheduler the Wan2.1 I2V 480P Diffusers checkpoint ships.
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "num_train_timesteps": 1000,
    "flow_shift": 3.0,
}
TINY_SEED = 0


@dataclass(kw_only=True)
class WanComponents:
    """The loaded parts of a Wan2.1 I2V model plus the facts every stage needs.

    Parts that were not asked for are ``None``. ``dtype`` is the transformer's
    dtype, which is also the dtype of the embeddings shipped to denoise.
    """

    device: torch.device
    dtype: torch.dtype
    video_processor: VideoProcessor
    vae_scale_factor_temporal: int
    vae_scale_factor_spatial: int
    latent_channels: int
    patch_size: tuple[int, int, int]
    tokenizer: Any = None
    text_encoder: Any = None
    image_processor: Any = None
    image_encoder: Any = None
    vae: Any = None
    transformer: Any = None
    scheduler: Any = None
    parts: frozenset[str] = field(default_factory=frozenset)


def _init_value(cls: type, config: Mapping[str, Any], key: str) -> Any:
    """A config value, falling back to the constructor default as from_config would."""
    if key in config:
        return config[key]
    return inspect.signature(cls.__init__).parameters[key].default


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, tiny: bool) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" and not tiny else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype: unknown torch dtype {dtype!r}")
    return resolved


def build_tiny_tokenizer() -> Any:
    """A byte-level tokenizer built in code (no download) that pads, truncates and
    appends ``</s>`` the way the UMT5 tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TEXT_CONTEXT_LENGTH,
    )


def _build_tiny(name: str) -> Any:
    """One tiny part; the seed is reset per part so each is identical whichever
    other parts a process builds."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(TINY_SEED)
    if name == "tokenizer":
        return build_tiny_tokenizer()
    if name == "text_encoder":
        return UMT5EncoderModel(UMT5Config(vocab_size=len(build_tiny_tokenizer()), **TINY_TEXT_ENCODER_CONFIG))
    if name == "image_processor":
        size = TINY_IMAGE_ENCODER_CONFIG["image_size"]
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if name == "image_encoder":
        return CLIPVisionModel(CLIPVisionConfig(**TINY_IMAGE_ENCODER_CONFIG))
    if name == "vae":
        return AutoencoderKLWan(**TINY_VAE_CONFIG)
    if name == "transformer":
        return WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    if name == "scheduler":
        return UniPCMultistepScheduler(**TINY_SCHEDULER_CONFIG)
    raise AssertionError(name)


def _subfolder(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(f"model {str(root)!r} has no {name!r} subfolder (looked for {str(path)!r})")
    return path


def _read_config(root: Path, name: str, filename: str) -> dict[str, Any]:
    path = _subfolder(root, name) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model {str(root)!r}: missing {str(path)!r}")
    return json.loads(path.read_text())


def _load_part(root: Path, name: str, dtype: torch.dtype) -> Any:
    """One part from a local diffusers directory, as DiffusionPipeline.from_pretrained
    would resolve it, never touching the network."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    folder = _subfolder(root, name)
    if name == "tokenizer":
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if name == "text_encoder":
        return UMT5EncoderModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    if name == "image_processor":
        return CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    if name == "image_encoder":
        # float32, as Wan's model card loads it: the CLIP features are precision sensitive
        return CLIPVisionModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    if name == "vae":
        return AutoencoderKLWan.from_pretrained(
            root, subfolder="vae", dtype=torch.float32, local_files_only=True
        )
    if name == "transformer":
        return WanTransformer3DModel.from_pretrained(
            root, subfolder="transformer", dtype=dtype, local_files_only=True
        )
    if name == "scheduler":
        import diffusers

        class_name = _read_config(root, "scheduler", "scheduler_config.json").get("_class_name")
        cls = getattr(diffusers, str(class_name), None)
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            raise ValueError(f"model {str(root)!r}: unknown scheduler class {class_name!r}")
        return cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    raise AssertionError(name)


def load_components(
    model: str | os.PathLike[str] = "tiny",
    *,
    parts: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> WanComponents:
    """Load the parts of a Wan2.1 I2V model that a stage needs.

    Args:
        model: ``"tiny"`` for small random fixed-seed components built offline, or
            the path of a local diffusers directory with the subfolders tokenizer,
            text_encoder, image_processor, image_encoder, vae, transformer, scheduler.
        parts: names from ``ALL_PARTS`` (see ``STAGE_PARTS``); ``None`` loads all.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        dtype: dtype of the transformer and text encoder. Default bfloat16 on cuda
            for a real model, float32 otherwise. The VAE and the image encoder
            always run in float32, as Wan's model card recommends.

    Raises:
        ValueError: an unknown part or dtype.
        FileNotFoundError: ``model`` is not a directory or lacks a needed subfolder.
    """
    wanted = ALL_PARTS if parts is None else frozenset(parts)
    unknown = wanted - ALL_PARTS
    if unknown:
        raise ValueError(f"parts: unknown {sorted(unknown)}; expected some of {sorted(ALL_PARTS)}")
    tiny = model == "tiny"
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev, tiny)

    if tiny:
        vae_config: Mapping[str, Any] = TINY_VAE_CONFIG
        transformer_config: Mapping[str, Any] = TINY_TRANSFORMER_CONFIG
        loaded = {name: _build_tiny(name) for name in sorted(wanted)}
    else:
        root = Path(model)
        if not root.is_dir():
            raise FileNotFoundError(f"model directory {str(root)!r} does not exist")
        vae_config = _read_config(root, "vae", "config.json")
        transformer_config = _read_config(root, "transformer", "config.json")
        loaded = {name: _load_part(root, name, dt) for name in sorted(wanted)}

    for name, module in loaded.items():
        if not isinstance(module, torch.nn.Module):
            continue
        # A checkpoint is already in its dtype, with the modules diffusers keeps in
        # float32 (norms, rope, time embedder) left there; casting it again would
        # break that. Only the float32 tiny modules need casting.
        if tiny and name in ("text_encoder", "transformer") and dt != torch.float32:
            module.to(dtype=dt)
        module.to(device=dev).eval().requires_grad_(False)

    spatial = int(_init_value(AutoencoderKLWan, vae_config, "scale_factor_spatial"))
    return WanComponents(
        device=dev,
        # what the pipeline calls transformer_dtype: the dtype of its non-float32-kept weights
        dtype=loaded["transformer"].dtype if "transformer" in loaded else dt,
        video_processor=VideoProcessor(vae_scale_factor=spatial),
        vae_scale_factor_temporal=int(_init_value(AutoencoderKLWan, vae_config, "scale_factor_temporal")),
        vae_scale_factor_spatial=spatial,
        latent_channels=int(_init_value(AutoencoderKLWan, vae_config, "z_dim")),
        patch_size=tuple(_init_value(WanTransformer3DModel, transformer_config, "patch_size")),
        parts=wanted,
        **loaded,
    )
