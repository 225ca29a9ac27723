"""The components of the Wan video models, loaded per stage.

Each stage service holds only the parts it runs: the parts of the model
*identity* its workflow stage declares (``IDENTITIES``: ``model = "umt5-xxl"``,
``"wan2.2-i2v-a14b-high"``, ...), or of a stage kind (``STAGE_PARTS``). The parts
are exactly the modules diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline``
are built from, so the split stages can reproduce the pipelines' arithmetic
operation for operation.

``model="tiny"`` builds every part from small fixed-seed configs, fully offline,
so tests and demos run on a CPU in seconds; parts that identities share (the
text encoder, the VAE) are the same tiny weights whichever identity loads them.
Any other value is a local diffusers directory (e.g.
``Wan2.1-I2V-14B-480P-Diffusers``, ``Wan2.1-T2V-14B-Diffusers``,
``Wan2.2-I2V-A14B-Diffusers``) read with ``local_files_only=True``.
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
    # positions per axis the rotary table covers, as in the 14B model: the workflow allows 1280 px
    # (80 patches) and 161 frames (41 latent frames); at 32, a 480x832 job (52 patches) failed
    "rope_max_seq_len": 1024,
}
# Text-to-video DiTs take the latents alone and no image tokens.
TINY_T2V_TRANSFORMER_CONFIG: dict[str, Any] = {
    **TINY_TRANSFORMER_CONFIG,
    "in_channels": 16,
    "image_dim": None,
    "added_kv_proj_dim": None,
}
# Wan2.2 A14B I2V experts: the Wan2.1 I2V input layout (latents + mask +
# condition) but no CLIP image tokens, as in Wan2.2-I2V-A14B's transformer config.
TINY_WAN22_I2V_TRANSFORMER_CONFIG: dict[str, Any] = {
    **TINY_TRANSFORMER_CONFIG,
    "image_dim": None,
    "added_kv_proj_dim": None,
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
# Wan2.2 A14B: the flow shifts of Wan's reference configs (wan/configs/
# wan_i2v_A14B.py and wan_t2v_A14B.py: sample_shift 5.0 and 12.0). The
# scheduler_config.json of the Diffusers conversions was not checked against
# them; a real directory's own scheduler config is always what gets loaded.
TINY_WAN22_I2V_SCHEDULER_CONFIG: dict[str, Any] = {**TINY_SCHEDULER_CONFIG, "flow_shift": 5.0}
TINY_WAN22_T2V_SCHEDULER_CONFIG: dict[str, Any] = {**TINY_SCHEDULER_CONFIG, "flow_shift": 12.0}
TINY_SEED = 0

# The tiny DiTs: (config, seed). Every DiT has a seed of its own, so the two
# experts of a Wan2.2 model are different networks.
TINY_TRANSFORMERS: dict[str, tuple[Mapping[str, Any], int]] = {
    "wan2.1-i2v": (TINY_TRANSFORMER_CONFIG, TINY_SEED),
    "wan2.1-t2v": (TINY_T2V_TRANSFORMER_CONFIG, 1),
    "wan2.2-i2v-high": (TINY_WAN22_I2V_TRANSFORMER_CONFIG, 2),
    "wan2.2-i2v-low": (TINY_WAN22_I2V_TRANSFORMER_CONFIG, 3),
    "wan2.2-t2v-high": (TINY_T2V_TRANSFORMER_CONFIG, 4),
    "wan2.2-t2v-low": (TINY_T2V_TRANSFORMER_CONFIG, 5),
}
TINY_SCHEDULERS: dict[str, Mapping[str, Any]] = {
    "wan2.1": TINY_SCHEDULER_CONFIG,
    "wan2.2-i2v": TINY_WAN22_I2V_SCHEDULER_CONFIG,
    "wan2.2-t2v": TINY_WAN22_T2V_SCHEDULER_CONFIG,
}

EXPERTS = ("high", "low")


@dataclass(frozen=True)
class ModelIdentity:
    """What a workflow stage's ``model = "<identity>"`` names.

    Attributes:
        parts: the parts a worker of this identity holds.
        tiny_transformer, tiny_scheduler: keys of ``TINY_TRANSFORMERS`` /
            ``TINY_SCHEDULERS`` for the tiny build (``None``: no such part).
        tiny_boundary_ratio: the tiny two-expert model's ``boundary_ratio``
            (a directory's comes from its ``model_index.json``).
        expert: ``"high"`` (diffusers' ``transformer``: the steps whose timestep
            is at or above the boundary) or ``"low"`` (``transformer_2``: the
            rest) for one expert of a two-expert model, else ``None``.
        subfolders: the subfolder of a local diffusers directory holding a part,
            where it is not the part's own name.
    """

    parts: frozenset[str]
    tiny_transformer: str | None = None
    tiny_scheduler: str | None = None
    tiny_boundary_ratio: float | None = None
    expert: str | None = None
    subfolders: Mapping[str, str] = field(default_factory=dict)

    def subfolder(self, part: str) -> str:
        return self.subfolders.get(part, part)


_DIT = frozenset({"transformer", "scheduler"})


def _expert(family: str, expert: str, boundary_ratio: float) -> ModelIdentity:
    return ModelIdentity(
        parts=_DIT,
        tiny_transformer=f"{family}-{expert}",
        tiny_scheduler=family,
        tiny_boundary_ratio=boundary_ratio,
        expert=expert,
        subfolders={"transformer": "transformer" if expert == "high" else "transformer_2"},
    )


# Wan2.2's boundaries (Wan's reference configs: i2v_A14B.boundary 0.900,
# t2v_A14B.boundary 0.875; the Diffusers conversions' model_index.json has them).
IDENTITIES: dict[str, ModelIdentity] = {
    "umt5-xxl": ModelIdentity(parts=frozenset({"tokenizer", "text_encoder"})),
    "clip-vit-h-14": ModelIdentity(parts=frozenset({"image_processor", "image_encoder"})),
    "wan2.1-vae": ModelIdentity(parts=frozenset({"vae"})),
    "wan2.1-i2v-14b": ModelIdentity(parts=_DIT, tiny_transformer="wan2.1-i2v", tiny_scheduler="wan2.1"),
    "wan2.1-t2v-14b": ModelIdentity(parts=_DIT, tiny_transformer="wan2.1-t2v", tiny_scheduler="wan2.1"),
    "wan2.2-i2v-a14b-high": _expert("wan2.2-i2v", "high", 0.900),
    "wan2.2-i2v-a14b-low": _expert("wan2.2-i2v", "low", 0.900),
    "wan2.2-t2v-a14b-high": _expert("wan2.2-t2v", "high", 0.875),
    "wan2.2-t2v-a14b-low": _expert("wan2.2-t2v", "low", 0.875),
}

# identity=None: the whole Wan2.1 I2V pipeline, as load_components always loaded it.
_WAN21_I2V_PIPELINE = ModelIdentity(parts=ALL_PARTS, tiny_transformer="wan2.1-i2v", tiny_scheduler="wan2.1")


@dataclass(kw_only=True)
class WanComponents:
    """The loaded parts of a Wan model plus the facts every stage needs.

    Parts that were not asked for are ``None``. ``dtype`` is the transformer's
    dtype, which is also the dtype of the embeddings shipped to denoise.
    ``identity`` is the identity loaded (``None``: the whole Wan2.1 I2V model).
    For one expert of a two-expert model (Wan2.2 A14B), ``expert`` says which
    (``"high"``/``"low"``) ``transformer`` is and ``boundary_ratio`` is the
    model's; both are ``None`` otherwise.
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
    identity: str | None = None
    boundary_ratio: float | None = None
    expert: str | None = None


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


def _build_tiny(name: str, identity: ModelIdentity) -> Any:
    """One tiny part; the seed is reset per part so each is identical whichever
    other parts a process builds. Only the DiT and the scheduler depend on the
    identity: every identity holding the text encoder or the VAE gets the same."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    if name == "transformer":
        config, seed = TINY_TRANSFORMERS[str(identity.tiny_transformer)]
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config)
    if name == "scheduler":
        return UniPCMultistepScheduler(**TINY_SCHEDULERS[str(identity.tiny_scheduler)])
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


def _load_part(root: Path, name: str, subfolder: str, dtype: torch.dtype) -> Any:
    """One part from ``subfolder`` of a local diffusers directory, as
    DiffusionPipeline.from_pretrained would resolve it, never touching the network."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    folder = _subfolder(root, subfolder)
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
        return WanTransformer3DModel.from_pretrained(root, subfolder=subfolder, dtype=dtype, local_files_only=True)
    if name == "scheduler":
        import diffusers

        class_name = _read_config(root, "scheduler", "scheduler_config.json").get("_class_name")
        cls = getattr(diffusers, str(class_name), None)
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
            raise ValueError(f"model {str(root)!r}: unknown scheduler class {class_name!r}")
        return cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    raise AssertionError(name)


def _resolve_identity(identity: str | None) -> ModelIdentity:
    if identity is None:
        return _WAN21_I2V_PIPELINE
    found = IDENTITIES.get(identity)
    if found is None:
        raise ValueError(f"identity: unknown {identity!r}; expected one of {sorted(IDENTITIES)}")
    return found


def _boundary_ratio(root: Path, identity: ModelIdentity, name: str | None, wanted: frozenset[str]) -> float | None:
    """The directory's ``boundary_ratio`` (``model_index.json``), which a
    two-expert identity needs and any other identity must not meet: holding one
    expert as a whole DiT would silently run it over every step."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        if identity.expert is not None:
            raise FileNotFoundError(f"model {str(root)!r}: missing {str(index_path)!r} (boundary_ratio of {name!r})")
        return None
    ratio = json.loads(index_path.read_text()).get("boundary_ratio")
    if identity.expert is None:
        if ratio is not None and "transformer" in wanted:
            raise ValueError(f"identity: {name!r} is one DiT, but {str(root)!r} is a two-expert model")
        return None
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise ValueError(
            f"identity: {name!r} needs a two-expert model; {str(index_path)!r} has boundary_ratio {ratio!r}"
        )
    return float(ratio)


def load_components(
    model: str | os.PathLike[str] = "tiny",
    *,
    identity: str | None = None,
    parts: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> WanComponents:
    """Load the parts of a Wan model that a stage needs.

    Args:
        model: ``"tiny"`` for small random fixed-seed components built offline, or
            the path of a local diffusers directory (subfolders tokenizer,
            text_encoder, image_processor, image_encoder, vae, transformer,
            transformer_2, scheduler, as the identity needs them).
        identity: a key of ``IDENTITIES`` (a workflow stage's ``model``): load its
            parts. ``None``: the whole Wan2.1 I2V model (every part of ``ALL_PARTS``).
        parts: names from ``ALL_PARTS`` (see ``STAGE_PARTS``) to load only some of
            the identity's parts; ``None`` loads all of them.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        dtype: dtype of the transformer and text encoder. Default bfloat16 on cuda
            for a real model, float32 otherwise. The VAE and the image encoder
            always run in float32, as Wan's model card recommends.

    Raises:
        ValueError: an unknown identity, part or dtype, a part the identity does
            not hold, or a directory of the wrong kind for the identity.
        FileNotFoundError: ``model`` is not a directory or lacks a needed subfolder.
    """
    ident = _resolve_identity(identity)
    wanted = ident.parts if parts is None else frozenset(parts)
    unknown = wanted - ALL_PARTS
    if unknown:
        raise ValueError(f"parts: unknown {sorted(unknown)}; expected some of {sorted(ALL_PARTS)}")
    foreign = wanted - ident.parts
    if foreign:
        raise ValueError(f"parts: {sorted(foreign)} are not parts of identity {identity!r}")
    tiny = model == "tiny"
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev, tiny)
    # The tiny DiTs share their patch size; a VAE or text worker needs it too (check_params).
    transformer_key = ident.tiny_transformer or _WAN21_I2V_PIPELINE.tiny_transformer

    if tiny:
        vae_config: Mapping[str, Any] = TINY_VAE_CONFIG
        transformer_config: Mapping[str, Any] = TINY_TRANSFORMERS[str(transformer_key)][0]
        boundary_ratio = ident.tiny_boundary_ratio
        loaded = {name: _build_tiny(name, ident) for name in sorted(wanted)}
    else:
        root = Path(model)
        if not root.is_dir():
            raise FileNotFoundError(f"model directory {str(root)!r} does not exist")
        vae_config = _read_config(root, "vae", "config.json")
        transformer_config = _read_config(root, ident.subfolder("transformer"), "config.json")
        boundary_ratio = _boundary_ratio(root, ident, identity, wanted)
        loaded = {name: _load_part(root, name, ident.subfolder(name), dt) for name in sorted(wanted)}

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
        identity=identity,
        boundary_ratio=boundary_ratio,
        expert=ident.expert,
        **loaded,
    )
