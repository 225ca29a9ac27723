"""Sequence parallelism of the Wan DiT (stages.wan.parallel) with real processes:
``k`` spawned ranks joined by gloo on 127.0.0.1 each run ``compute.denoise`` with a
``SequenceParallel`` transformer, and every rank's final latents equal the plain
(k=1) run in this process within 1e-4 (float32, tiny models).

The ranks of one launch run several jobs in a row (a spawn costs seconds of
imports on 2 cores); every launch is bounded by a deadline and its processes are
killed at the end, so a hang fails the test instead of hanging it. The figures
(max abs differences, timings) print with ``pytest -s``.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel

from onepiece.ports import free_port

from stages.wan import (
    WanParams,
    decode_image,
    denoise,
    expert_steps,
    image_encode,
    load_components,
    text_encode,
    vae_encode,
)
from stages.wan.models import TINY_TRANSFORMER_CONFIG
from stages.wan.parallel import SequenceParallel, check_split, process_group, sequence_length

from .wan_helpers import SAMPLE

TOLERANCE = 1e-4
# 32x32 px, 5 frames: 2 latent frames of 4x4 -> 2 x 2 x 2 = 8 tokens after patchify
P = WanParams(prompt="a boat on a lake", negative_prompt="blurry", height=32, width=32, num_frames=5, steps=3,
              guidance_scale=4.0, seed=5)
P22 = replace(P, steps=4, guidance_scale_2=3.0)  # 4 steps: the tiny Wan2.2 I2V high expert runs 2, the low 2
ODD = replace(P, height=16, width=48, num_frames=1)  # 1 latent frame of 2x6 -> 1 x 1 x 3 = 3 tokens
# The tiny Wan2.1 I2V DiT with 8 heads (2 in TINY_TRANSFORMER_CONFIG), so k=4 and k=8 divide them.
HEADS8_CONFIG = {**TINY_TRANSFORMER_CONFIG, "num_attention_heads": 8, "attention_head_dim": 6, "added_kv_proj_dim": 48}
HEADS8_SEED = 11
GROUP_TIMEOUT = timedelta(seconds=20)  # bounds every collective of the ranks
DEAD_PEER_BOUND_S = 30.0  # a survivor of a dead rank must have raised by then
HUNG_PEER_TIMEOUT = timedelta(seconds=4)  # the group timeout of the hung-peer test
HANG_S = 8.0  # how long its rank 1 hangs (then exits): well past that timeout


def _heads8() -> WanTransformer3DModel:
    torch.manual_seed(HEADS8_SEED)
    return WanTransformer3DModel(**HEADS8_CONFIG).eval().requires_grad_(False)


def _dit(identity: str):
    return load_components("tiny", identity=identity, device="cpu")


def _per_token_inputs(inputs: dict) -> dict[str, torch.Tensor]:
    """A Wan2.2 TI2V-style call: one timestep per token ([1, S])."""
    hidden = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    return {"hidden_states": hidden, "timestep": torch.linspace(999.0, 500.0, 8)[None],
            "encoder_hidden_states": inputs["t2v"]["prompt_embeds"]}


# ---- what the ranks run (in spawned processes): job(rank, k, inputs) -> results ----

def _job_k2(rank: int, k: int, inputs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    c = _dit("wan2.1-i2v-14b")
    with SequenceParallel(c.transformer):
        out["i2v"] = denoise(c, inputs["i2v"], P)["latents"]
    c = _dit("wan2.1-t2v-14b")
    with SequenceParallel(c.transformer):
        start = time.perf_counter()
        out["t2v"] = denoise(c, inputs["t2v"], P)["latents"]
        out["t2v_s"] = time.perf_counter() - start
        try:
            SequenceParallel(c.transformer)
        except ValueError as e:
            out["twice_error"] = str(e)
        with torch.inference_mode():
            out["per_token"] = c.transformer(**_per_token_inputs(inputs), return_dict=False)[0]
        start = time.perf_counter()
        try:
            denoise(c, inputs["t2v"], ODD)
        except ValueError as e:
            out["odd_error"] = str(e)
        out["odd_s"] = time.perf_counter() - start
    # the group is still in step after the refusal: no rank entered a collective
    ones = torch.ones(1)
    dist.all_reduce(ones)
    out["after_refusal"] = float(ones)
    high, low = _dit("wan2.2-i2v-a14b-high"), _dit("wan2.2-i2v-a14b-low")
    with SequenceParallel(high.transformer):
        out["w22_state"] = denoise(high, inputs["i2v"], P22)
    with SequenceParallel(low.transformer):
        out["w22"] = denoise(low, inputs["i2v"], P22, state=out["w22_state"])["latents"]
    return out


def _job_heads8(rank: int, k: int, inputs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    c = _dit("wan2.1-t2v-14b")  # 2 heads
    try:
        SequenceParallel(c.transformer)
    except ValueError as e:
        out["heads_error"] = str(e)
    c = _dit("wan2.1-i2v-14b")
    c.transformer = _heads8()
    start = time.perf_counter()
    with SequenceParallel(c.transformer):
        out["latents"] = denoise(c, inputs["i2v"], P)["latents"]
    out["denoise_s"] = time.perf_counter() - start
    return out


def _failing_peer(hang_s: float):
    """A job whose rank 1 stops in the first self-attention of the first forward
    (dies at once, or hangs ``hang_s`` first) while rank 0 goes on into the
    exchange with it; rank 0 reports what it raised and when."""

    def job(rank: int, k: int, inputs: dict) -> dict[str, Any]:
        c = _dit("wan2.1-t2v-14b")
        SequenceParallel(c.transformer)
        if rank == 1:
            c.transformer.blocks[0].attn1.register_forward_pre_hook(lambda *_: (time.sleep(hang_s), os._exit(3)))
        start = time.perf_counter()
        try:
            denoise(c, inputs["t2v"], P)
        except Exception as e:  # noqa: BLE001 - whatever the backend raises, as long as it raises
            return {"error": f"{type(e).__name__}: {e}", "elapsed_s": time.perf_counter() - start}
        return {"error": None, "elapsed_s": time.perf_counter() - start}

    return job


JOBS = {"k2": _job_k2, "heads8": _job_heads8, "dead_peer": _failing_peer(0.0), "hung_peer": _failing_peer(HANG_S)}
# the process-group timeout of each job (default GROUP_TIMEOUT): short where it is what the test waits for
JOB_TIMEOUTS = {"hung_peer": HUNG_PEER_TIMEOUT}


def _rank_main(rank: int, k: int, port: int, job: str, folder: str) -> None:
    """One spawned rank: join the group, run the job, save its results before the
    group is torn down (a dead peer may make the teardown fail)."""
    torch.set_num_threads(1)  # k ranks share 2 cores
    try:
        inputs = torch.load(Path(folder) / "inputs.pt")
        timeout = JOB_TIMEOUTS.get(job, GROUP_TIMEOUT)
        with process_group(rank, k, init_method=f"tcp://127.0.0.1:{port}", timeout=timeout):
            results = JOBS[job](rank, k, inputs)
            torch.save(results, Path(folder) / f"{job}.k{k}.{rank}.pt")
    except BaseException:
        (Path(folder) / f"{job}.k{k}.{rank}.err").write_text(traceback.format_exc())
        raise
    # End the way a worker ends after its group (stages.wan.group: os._exit): after a
    # peer died or an operation timed out, gloo's threads can make the interpreter's
    # C++ teardown abort (SIGABRT, "terminate called without an active exception"),
    # which says nothing about the job, whose results are saved above.
    os._exit(0)


def launch(job: str, k: int, folder: Path, deadline_s: float) -> tuple[list[dict[str, Any] | None], list[int | None]]:
    """Run ``job`` on ``k`` spawned ranks; kill whatever is alive at the deadline.
    Returns each rank's results (None where it saved none) and exit codes."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, k, port, job, str(folder))) for r in range(k)]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(max(0.0, start + deadline_s - time.monotonic()))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    print(f"{job} on {k} ranks: {time.monotonic() - start:.1f} s wall (spawn + imports + job)")
    files = [folder / f"{job}.k{k}.{r}.pt" for r in range(k)]
    results = [torch.load(f, weights_only=False) if f.exists() else None for f in files]
    return results, [proc.exitcode for proc in procs]


def _errors(job: str, folder: Path, k: int) -> str:
    return "\n".join(p.read_text() for r in range(k) if (p := folder / f"{job}.k{k}.{r}.err").exists())


def launch_ok(job: str, k: int, folder: Path, deadline_s: float) -> list[dict[str, Any]]:
    results, codes = launch(job, k, folder, deadline_s)
    assert codes == [0] * k, f"{job}: exit codes {codes} (-9: killed at the deadline)\n{_errors(job, folder, k)}"
    return results  # type: ignore[return-value]


def assert_close(name: str, got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    diff = float((got.double() - expected.double()).abs().max())
    print(f"{name}: max abs difference to k=1: {diff:.3g}")
    assert diff <= TOLERANCE, f"{name}: differs from k=1 by {diff}"
    assert float(expected.std()) > 1e-3
    return diff


# ---- the plain (k=1) references, computed here ----

@pytest.fixture(scope="module")
def inputs():
    image = decode_image(SAMPLE.read_bytes())
    whole = load_components("tiny", device="cpu")
    i2v = {**text_encode(whole, P), **image_encode(whole, image, P), **vae_encode(whole, image, P)}
    return {"i2v": i2v, "t2v": text_encode(whole, P)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, inputs) -> Path:
    path = tmp_path_factory.mktemp("wan_parallel")
    torch.save(inputs, path / "inputs.pt")
    return path


@pytest.fixture(scope="module")
def k2(folder):
    return launch_ok("k2", 2, folder, deadline_s=90)


# ---- tests ----

def test_check_split_names_the_numbers():
    check_split(4, 40, 32760)
    with pytest.raises(ValueError, match=r"3 ranks do not divide the model's 40 attention heads"):
        check_split(3, 40)
    with pytest.raises(ValueError, match=r"4 ranks do not divide the 6 tokens"):
        check_split(4, 8, 6)
    with pytest.raises(ValueError, match="at least 1"):
        check_split(0, 8)


def test_sequence_length_is_tokens_after_patchify():
    c = _dit("wan2.1-t2v-14b")
    assert sequence_length(c.transformer, (1, 16, 21, 60, 104)) == 21 * 30 * 52  # 480x832, 81 frames


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", ["i2v", "t2v"])
def test_k2_wan21_matches_plain(k2, inputs, kind):
    c = _dit(f"wan2.1-{kind}-14b")
    start = time.perf_counter()
    expected = denoise(c, inputs[kind], P)["latents"]
    if kind == "t2v":
        print(f"wan2.1 t2v denoise: k=1 {time.perf_counter() - start:.3f} s, k=2 {k2[0]['t2v_s']:.3f} s")
    for rank, res in enumerate(k2):
        assert_close(f"wan2.1 {kind} k=2 rank {rank}", res[kind], expected)
    assert torch.equal(k2[0][kind], k2[1][kind])  # every rank holds the same latents


@pytest.mark.timeout(150)
def test_k2_wan22_experts_hand_off_state(k2, inputs):
    high, low = _dit("wan2.2-i2v-a14b-high"), _dit("wan2.2-i2v-a14b-low")
    assert len(expert_steps(high, P22)) and len(expert_steps(low, P22))  # both experts run
    plain_state = denoise(high, inputs["i2v"], P22)
    expected = denoise(low, inputs["i2v"], P22, state=plain_state)["latents"]
    par_state = k2[0]["w22_state"]
    assert par_state.keys() == plain_state.keys()
    assert torch.equal(par_state["state.latents"], k2[1]["w22_state"]["state.latents"])
    for rank, res in enumerate(k2):  # parallel high -> parallel low
        assert_close(f"wan2.2 high k=2 -> low k=2, rank {rank}", res["w22"], expected)
    mixed = denoise(low, inputs["i2v"], P22, state=par_state)["latents"]  # parallel high -> plain low
    assert_close("wan2.2 high k=2 -> low k=1", mixed, expected)


@pytest.mark.timeout(150)
def test_k2_per_token_timestep(k2, inputs):
    c = _dit("wan2.1-t2v-14b")
    with torch.inference_mode():
        expected = c.transformer(**_per_token_inputs(inputs), return_dict=False)[0]
    for rank, res in enumerate(k2):
        assert_close(f"per-token timestep k=2 rank {rank}", res["per_token"], expected)


@pytest.mark.timeout(150)
def test_k2_refuses_an_indivisible_sequence_and_a_second_split_before_any_collective(k2):
    for res in k2:
        assert "2 ranks do not divide the 3 tokens" in res["odd_error"]
        assert res["odd_s"] < 5  # refused at once, not after a collective timed out
        assert res["after_refusal"] == 2.0
        assert "already split" in res["twice_error"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("k", [4, 8])
def test_heads8_model_matches_plain(folder, inputs, k):
    c = _dit("wan2.1-i2v-14b")
    c.transformer = _heads8()
    start = time.perf_counter()
    expected = denoise(c, inputs["i2v"], P)["latents"]
    plain_s = time.perf_counter() - start
    results = launch_ok("heads8", k, folder, deadline_s=120)
    for rank, res in enumerate(results):
        assert f"{k} ranks do not divide the model's 2 attention heads" in res["heads_error"]
        assert_close(f"8-head I2V k={k} rank {rank}", res["latents"], expected)
    print(f"8-head I2V denoise: k=1 {plain_s:.2f} s, k={k} {max(r['denoise_s'] for r in results):.2f} s")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("job, bound_s", [("dead_peer", DEAD_PEER_BOUND_S),
                                          ("hung_peer", HUNG_PEER_TIMEOUT.total_seconds() + 5)])
def test_a_failing_rank_makes_the_survivor_raise_within_the_bound(folder, job, bound_s):
    """A rank that dies (its sockets close) or hangs (the group timeout fires) mid-forward:
    the other raises within the bound, tears its group down, reports, and its process ends
    (with os._exit, as a worker does: -9 would be a hang killed at the deadline)."""
    results, codes = launch(job, 2, folder, deadline_s=90)
    assert codes == [0, 3], f"exit codes {codes}\n{_errors(job, folder, 2)}"
    survivor = results[0]
    print(f"{job}: survivor raised after {survivor['elapsed_s']:.2f} s (exit {codes[0]}): {survivor['error']}")
    assert survivor["error"] is not None
    assert survivor["elapsed_s"] < bound_s
