"""Wan2.1 I2V 14B 480P stage by stage on this GPU, against the profile the capacity model uses,
and what the small stages cost each other when they share one GPU.

bench/elastic.py simulates capacity from ``stages/profiles/wan_i2v_480p.toml``. Its
decomposition rests on two things a GPU has to confirm: that the DiT is nearly all of a job's
GPU time (so splitting can free at most the rest), and that the small stages packed on one GPU
barely slow each other down. This measures both on the real architectures:

- **Models.** diffusers' ``WanTransformer3DModel`` and ``AutoencoderKLWan``, and transformers'
  UMT5 encoder and CLIP vision tower, at the configs of Wan2.1-I2V-14B-480P (16.4B-parameter
  DiT, UMT5-XXL, ViT-H/14, the Wan-VAE), built with random weights on the device. Nothing is
  downloaded, and a stage's time does not depend on its weights' values (they are drawn like
  trained ones: not zeros, which run faster).
- **Dtypes** as the pipeline runs them: bf16 DiT and encoders, fp32 VAE.
- **The job** is the profile's: 480x832, 81 frames, 40 steps with CFG (two DiT forwards per
  step), prompts of 512 tokens.
- **Times.** Per task, in seconds: text_encode encodes the prompt and the negative prompt; the
  DiT's per-job time is 2 x 40 timed forwards.
- **Memory.** Per stage, in GB: ``resident`` is what the loaded model holds (what a worker
  reports at start), ``peak`` is the most one task held.
- **Co-location** (``--colocate SECONDS``). The four small GPU stages (or the ``--together``
  ones, e.g. ``denoise,vae_decode``) run as processes on one GPU, all busy at once for that long:
  the worst case of packing. The slowdown is each
  stage's mean time together over its time alone; the sum of alone/together is the work the
  shared GPU did, in units of one stage busy alone (1.0: equal time slices and no overlap, what
  bench/elastic_sim.py assumes).

Ratios: each stage's measured time over the profile's, and the DiT's share of a job's GPU time,
measured against the profile's. ``--tiny`` runs the same code with the tiny configs and shapes on
whatever device is there (a check that the script works; its figures mean nothing).

    python bench/gpu_stages.py --json gpu.json --colocate 30     # ~3 min on an H200
    python bench/gpu_stages.py --tiny                             # seconds, CPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from manager.profile import load_profile  # noqa: E402
from stages.wan import models as wan_models  # noqa: E402

PROFILE = "wan_i2v_480p"
SMALL = ("text_encode", "image_encode", "vae_encode", "vae_decode")
STAGES = ("text_encode", "image_encode", "vae_encode", "denoise", "vae_decode")

# Wan2.1-I2V-14B-480P-Diffusers' configs (transformer/config.json, text_encoder/config.json,
# image_encoder/config.json; the VAE is AutoencoderKLWan's default config), as the profile's
# sources [G2], [W2], [T5], [W3] describe them.
DIT_CONFIG = {
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 36,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": 1280,
    "added_kv_proj_dim": 5120, "rope_max_seq_len": 1024,
}
UMT5_CONFIG = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}
CLIP_CONFIG = {
    "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1024, "num_hidden_layers": 32,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu",
}
VAE_CONFIG: dict = {}  # AutoencoderKLWan() is Wan2.1's VAE


@dataclass(frozen=True)
class Shapes:
    height: int
    width: int
    frames: int
    steps: int
    text_tokens: int
    image_size: int

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8


FULL = Shapes(height=480, width=832, frames=81, steps=40, text_tokens=512, image_size=224)
TINY = Shapes(height=64, width=64, frames=5, steps=2, text_tokens=16, image_size=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights drawn like trained ones (small, not zero): a matrix product of zeros runs faster."""
    device = next(module.parameters()).device
    if device.type == "meta":  # checking shapes only
        return module
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
    return module


def build(stage: str, device: torch.device, tiny: bool) -> tuple[torch.nn.Module, Callable[[], object]]:
    """The stage's model on ``device`` and a function that runs one of its tasks (one DiT forward
    for denoise)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    s = TINY if tiny else FULL
    bf16 = torch.float32 if tiny or device.type == "cpu" else torch.bfloat16
    t, h, w = s.latent
    with torch.device(device):
        if stage == "text_encode":
            cfg = UMT5Config(**(wan_models.TINY_TEXT_ENCODER_CONFIG if tiny else UMT5_CONFIG))
            model = _randomize(UMT5EncoderModel(cfg), 1).to(bf16).eval()
            ids = torch.randint(2, cfg.vocab_size, (1, s.text_tokens))
            mask = torch.ones_like(ids)
            return model, lambda: [model(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2)]
        if stage == "image_encode":
            cfg = CLIPVisionConfig(**(wan_models.TINY_IMAGE_ENCODER_CONFIG if tiny else CLIP_CONFIG))
            model = _randomize(CLIPVisionModel(cfg), 2).to(bf16).eval()
            pixels = torch.randn(1, 3, s.image_size, s.image_size, dtype=bf16)
            return model, lambda: model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        if stage in ("vae_encode", "vae_decode"):
            model = _randomize(AutoencoderKLWan(**(wan_models.TINY_VAE_CONFIG if tiny else VAE_CONFIG)), 3).eval()
            if stage == "vae_encode":  # the first frame and zeros: the I2V condition video
                video = torch.zeros(1, 3, s.frames, s.height, s.width)
                video[:, :, 0] = torch.rand(1, 3, s.height, s.width) * 2 - 1
                return model, lambda: model.encode(video).latent_dist.mode()
            latents = torch.randn(1, model.config.z_dim, t, h, w)
            return model, lambda: model.decode(latents, return_dict=False)[0]
        if stage == "denoise":
            cfg = dict(wan_models.TINY_TRANSFORMER_CONFIG if tiny else DIT_CONFIG)
            model = _randomize(WanTransformer3DModel(**cfg), 4).to(bf16).eval()
            x = torch.randn(1, cfg["in_channels"], t, h, w, dtype=bf16)
            text = torch.randn(1, s.text_tokens, cfg["text_dim"], dtype=bf16)
            image = torch.randn(1, 257, cfg["image_dim"], dtype=bf16)
            step = torch.tensor([500.0])
            return model, lambda: model(hidden_states=x, timestep=step, encoder_hidden_states=text,
                                        encoder_hidden_states_image=image, return_dict=False)[0]
    raise ValueError(f"unknown stage {stage!r}")


def _timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, its device work included."""
    t0 = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - t0


def time_task(run: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call, after one untimed warm-up call."""
    with torch.inference_mode():
        _timed(run, device)
        return [_timed(run, device) for _ in range(repeats)]


def measure(stage: str, device: torch.device, tiny: bool, repeats: int) -> dict:
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    model, run = build(stage, device, tiny)
    _sync(device)
    built_s = time.perf_counter() - t0
    out: dict = {"params": sum(p.numel() for p in model.parameters()), "build_s": round(built_s, 2)}
    if device.type == "cuda":
        out["resident_gb"] = round((torch.cuda.memory_allocated(device) - base) / 1e9, 3)
        torch.cuda.reset_peak_memory_stats(device)
    times = time_task(run, device, repeats)
    if device.type == "cuda":
        out["peak_gb"] = round((torch.cuda.max_memory_allocated(device) - base) / 1e9, 3)
    out["times_s"] = [round(x, 4) for x in times]
    call = statistics.median(times)
    s = TINY if tiny else FULL
    out["call_s"] = call  # one task (one DiT forward for denoise)
    out["task_s"] = call * 2 * s.steps if stage == "denoise" else call
    del model, run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _colocated(stage: str, device: str, tiny: bool, seconds: float, barrier, results) -> None:
    """One process of the co-location run: build, warm up, wait for the others, then loop."""
    dev = torch.device(device)
    try:
        model, run = build(stage, dev, tiny)
        with torch.inference_mode():
            _timed(run, dev)
            barrier.wait(timeout=600)
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end:
                times.append(_timed(run, dev))
        results.put((stage, times, None))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        barrier.abort()
        results.put((stage, [], f"{type(exc).__name__}: {exc}"))


def colocate(stages: tuple[str, ...], device: str, tiny: bool, seconds: float) -> dict:
    """Every stage in its own process on one device, all busy at once for ``seconds``."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(stages)), ctx.Queue()
    procs = [ctx.Process(target=_colocated, args=(s, device, tiny, seconds, barrier, results)) for s in stages]
    for p in procs:
        p.start()
    got: dict = {}
    try:
        for _ in stages:
            stage, times, error = results.get(timeout=600 + seconds)
            got[stage] = {"error": error} if error else {"times_s": [round(x, 4) for x in times],
                                                         "call_s": statistics.mean(times) if times else None}
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    return got


def report(device: torch.device, tiny: bool, measured: dict, together: dict | None) -> dict:
    profile = load_profile(PROFILE)
    gpu_stages = [s for s in STAGES if profile.stages[s].gpu]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{PROFILE} on {name} ({'TINY configs: the figures mean nothing' if tiny else 'real architectures'}),"
          f" torch {torch.__version__}")
    print(f"{'stage':<13}{'params':>10}{'measured s':>12}{'profile s':>11}{'ratio':>8}"
          f"{'resident GB':>13}{'profile GB':>12}{'peak GB':>9}{'profile peak':>14}")
    for s in STAGES:
        m, p = measured.get(s), profile.stages[s]
        if m is None:
            continue
        ratio = m["task_s"] / p.mean_s if p.mean_s else float("nan")
        m["profile_s"], m["ratio"] = p.mean_s, round(ratio, 3)
        print(f"{s:<13}{m['params'] / 1e9:>9.3f}B{m['task_s']:>12.3f}{p.mean_s:>11.2f}{ratio:>7.3f}x"
              f"{m.get('resident_gb', float('nan')):>13.2f}{p.memory_gb:>12.1f}{m.get('peak_gb', float('nan')):>9.2f}"
              f"{p.peak_gb:>14.1f}")
    out: dict = {"device": name, "tiny": tiny, "torch": torch.__version__, "stages": measured}
    if all(s in measured for s in gpu_stages):
        gpu_s = sum(measured[s]["task_s"] for s in gpu_stages)
        share = measured["denoise"]["task_s"] / gpu_s
        p_share = profile.mean_s("denoise") / sum(profile.mean_s(s) for s in gpu_stages)
        out.update(gpu_s_per_job=round(gpu_s, 2), dit_share=round(share, 4), profile_dit_share=round(p_share, 4))
        print(f"GPU-seconds per job: measured {gpu_s:.1f}, profile {sum(profile.mean_s(s) for s in gpu_stages):.1f}")
        print(f"DiT share of a job's GPU time: measured {share:.4f}, profile {p_share:.4f}"
              f" (so splitting frees at most {1 - share:.4f} of it)")
    if together:
        print(f"\nCo-location: {', '.join(together)} as processes on one GPU, all busy at once")
        print(f"{'stage':<13}{'alone s':>10}{'together s':>12}{'slowdown':>10}{'calls':>7}  (a call: a task,"
              f" or one DiT forward)")
        for s, t in together.items():
            alone = measured.get(s, {}).get("call_s")
            if t.get("error"):
                print(f"{s:<13}  failed: {t['error']}")
                continue
            if alone and t["call_s"]:
                t["slowdown"] = round(t["call_s"] / alone, 3)
            print(f"{s:<13}{alone or float('nan'):>10.3f}{t['call_s'] or float('nan'):>12.3f}"
                  f"{t.get('slowdown', float('nan')):>9.3f}x{len(t['times_s']):>7}")
        shares = [1 / t["slowdown"] for t in together.values() if t.get("slowdown")]
        if len(shares) == len(together):
            out["colocated_throughput"] = round(sum(shares), 3)
            print(f"together the GPU did {sum(shares):.3f}x the work of one stage busy alone (sum of alone/together;"
                  f" 1.0 = equal time slices, no overlap)")
        out["colocated"] = together
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny configs and shapes: checks the script")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per stage after a warm-up")
    ap.add_argument("--colocate", type=float, default=0.0, metavar="SECONDS",
                    help="run the small stages together on one GPU for this long (0: skip)")
    ap.add_argument("--together", default=",".join(SMALL), metavar="STAGES",
                    help="the stages the co-location run puts on one GPU (default: the four small ones; "
                         "denoise,vae_decode: a small stage beside a busy DiT)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        ap.error("the real architectures need a CUDA device (--tiny runs anywhere)")
    stages = tuple(s for s in args.stages.split(",") if s)
    if unknown := set(stages) - set(STAGES):
        ap.error(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    measured = {}
    for s in stages:
        measured[s] = measure(s, device, args.tiny, args.repeats)
        print(f"  {s}: {measured[s]['times_s']} s per call (built in {measured[s]['build_s']} s)", flush=True)
    group = tuple(s for s in args.together.split(",") if s)
    if args.colocate > 0 and (len(group) < 2 or not set(group) <= set(stages)):
        ap.error("--together needs two or more of the measured --stages")
    together = colocate(group, str(device), args.tiny, args.colocate) if args.colocate > 0 else None
    out = report(device, args.tiny, measured, together)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
