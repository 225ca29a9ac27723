"""The denoise state handoff: a denoise stopped at any step boundary and resumed
in another components object (as another process would, after the state crossed
the transport codec) gives latents bit-identical (torch.equal) to an
uninterrupted run; so do snapshots; and a state that does not fit is refused with
a ValueError naming the key."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from stages.wan import (
    STATE_PREFIX,
    WanParams,
    check_state,
    decode_image,
    denoise,
    expert_steps,
    image_encode,
    is_state,
    load_components,
    state_step,
    text_encode,
    vae_encode,
)

from .wan_helpers import SAMPLE, through_the_wire

P = WanParams(prompt="a boat on a lake", negative_prompt="blurry", height=32, width=48, num_frames=5, steps=7,
              guidance_scale=4.0, guidance_scale_2=3.0, seed=31)
P21 = replace(P, guidance_scale_2=None)  # a one-DiT model takes no guidance_scale_2
# (identity, params) of each denoise stage under test
STAGES = {
    "wan2.1-i2v-14b": P21,
    "wan2.2-i2v-a14b-high": P,
    "wan2.2-i2v-a14b-low": P,
    "wan2.2-t2v-a14b-high": P,
    "wan2.2-t2v-a14b-low": P,
}


def fresh(identity: str):
    """A new components object, as a new worker process loads it."""
    return load_components("tiny", identity=identity, device="cpu")


@pytest.fixture(scope="module")
def inputs():
    image = decode_image(SAMPLE.read_bytes())
    whole = load_components("tiny", device="cpu")
    i2v = {**text_encode(whole, P21), **image_encode(whole, image, P21), **vae_encode(whole, image, P21)}
    return {"i2v": i2v, "t2v": text_encode(whole, P21)}


def inputs_of(identity: str, inputs):
    return inputs["t2v" if "t2v" in identity else "i2v"]


@pytest.fixture(scope="module")
def reference(inputs):
    """Uninterrupted runs: each stage's output, and the state the high experts hand on."""
    out = {"wan2.1-i2v-14b": denoise(fresh("wan2.1-i2v-14b"), inputs["i2v"], P21)}
    for family in ("wan2.2-i2v-a14b", "wan2.2-t2v-a14b"):
        handed = denoise(fresh(f"{family}-high"), inputs_of(family, inputs), P)
        out[f"{family}-high"] = handed
        out[f"{family}-low"] = denoise(fresh(f"{family}-low"), inputs_of(family, inputs), P, state=handed)
    return out


def start_state(identity: str, reference):
    """What a stage starts from: nothing, or (a low expert) its high expert's state."""
    return reference[identity.replace("-low", "-high")] if identity.endswith("-low") else None


def assert_same_output(got, expected):
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_experts_split_the_schedule():
    for family in ("wan2.2-i2v-a14b", "wan2.2-t2v-a14b"):
        high, low = expert_steps(fresh(f"{family}-high"), P), expert_steps(fresh(f"{family}-low"), P)
        assert high.start == 0 and high.stop == low.start and low.stop == P.steps
        assert 0 < high.stop < P.steps, family
    assert expert_steps(fresh("wan2.1-i2v-14b"), P21) == range(P.steps)


def test_reference_outputs(reference):
    for identity, out in reference.items():
        if identity.endswith("-high"):
            assert is_state(out) and "latents" not in out
            assert all(k.startswith(STATE_PREFIX) for k in out)
            assert state_step(out) == expert_steps(fresh(identity), P).stop
            assert all(t.device.type == "cpu" and t.is_contiguous() and not t.is_inference() for t in out.values())
        else:
            assert set(out) == {"latents"} and not is_state(out)


@pytest.mark.parametrize("identity", list(STAGES))
def test_yield_at_every_boundary_resumes_bit_identically(identity, inputs, reference):
    p, x = STAGES[identity], inputs_of(identity, inputs)
    run = expert_steps(fresh(identity), p)
    assert len(run) >= 2  # there is a boundary inside this stage's run
    for k in range(run.start + 1, run.stop):
        progress: list[int] = []
        yielded = denoise(fresh(identity), x, p, state=start_state(identity, reference),
                          on_step=lambda done, total: progress.append(done),
                          yield_now=lambda: progress[-1] == k)
        assert is_state(yielded) and state_step(yielded) == k
        assert progress == list(range(run.start + 1, k + 1))
        resumed_progress: list[tuple[int, int]] = []
        resumed = denoise(fresh(identity), x, p, state=through_the_wire(yielded),
                          on_step=lambda done, total: resumed_progress.append((done, total)))
        assert resumed_progress == [(done, p.steps) for done in range(k + 1, run.stop + 1)]
        assert_same_output(resumed, reference[identity])


@pytest.mark.parametrize("identity", list(STAGES))
def test_snapshots_resume_bit_identically(identity, inputs, reference):
    p, x = STAGES[identity], inputs_of(identity, inputs)
    run = expert_steps(fresh(identity), p)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    makers = []

    def snapshot(done, make_state):
        makers.append(make_state)
        snapshots[done] = make_state()

    out = denoise(fresh(identity), x, p, state=start_state(identity, reference), snapshot=snapshot)
    assert_same_output(out, reference[identity])
    # offered at every boundary that leaves this stage more to do
    assert sorted(snapshots) == list(range(run.start + 1, run.stop))
    with pytest.raises(RuntimeError, match="make_state"):
        makers[0]()  # the loop has moved on: it would be another step's state
    for k, state in snapshots.items():
        assert state_step(state) == k
        # resumed after the run finished: the snapshot aliases nothing the loop wrote
        assert_same_output(denoise(fresh(identity), x, p, state=through_the_wire(state)), reference[identity])


@pytest.fixture(scope="module")
def mid_state(inputs):
    """A Wan2.1 state after 2 of 7 steps, and components to check it against."""
    c = fresh("wan2.1-i2v-14b")
    state = denoise(c, inputs["i2v"], P21, yield_now=lambda: True)
    assert state_step(state) == 1
    state = denoise(c, inputs["i2v"], P21, state=state, yield_now=lambda: True)
    assert state_step(state) == 2 and check_state(c, P21, state) == 2
    return c, state


@pytest.mark.parametrize(
    "key, tamper",
    [
        ("state.latents", lambda s: s["state.latents"][:, :, :1].contiguous()),
        ("state.latents", lambda s: s["state.latents"].double()),
        ("state.step", lambda s: torch.tensor(8)),
        ("state.step", lambda s: torch.tensor(-1)),
        ("state.step", lambda s: torch.tensor(2.0)),
        ("state.step", lambda s: None),
        ("state.total", lambda s: torch.tensor(9)),
        ("state.steps", lambda s: torch.tensor(9)),
        ("state.version", lambda s: torch.tensor(2)),
        ("state.scheduler.timesteps", lambda s: s["state.scheduler.timesteps"] + 1),
        ("state.scheduler.last_sample", lambda s: None),
        ("state.scheduler.model_outputs.1", lambda s: None),
        ("state.scheduler.model_outputs.0", lambda s: s["state.scheduler.model_outputs.0"][0]),
        ("state.scheduler.model_outputs.present", lambda s: torch.tensor([False, True])),
        ("state.scheduler.lower_order_nums", lambda s: torch.tensor(1)),
        ("state.scheduler.step_index", lambda s: torch.tensor(99)),
        ("state.scheduler.this_order.present", lambda s: torch.tensor(False)),
        ("state.unexpected", lambda s: torch.zeros(1)),
    ],
)
def test_tampered_state_is_refused_naming_the_key(mid_state, inputs, key, tamper):
    c, state = mid_state
    bad = dict(state)
    value = tamper(state)
    if value is None:
        del bad[key]
    else:
        bad[key] = value
    with pytest.raises(ValueError, match=f"^{key.replace('.', chr(92) + '.')}:"):
        check_state(c, P21, bad)
    with pytest.raises(ValueError, match=f"^{key.replace('.', chr(92) + '.')}:"):
        denoise(c, inputs["i2v"], P21, state=bad)


def test_state_of_another_job_or_expert_is_refused(mid_state, inputs, reference):
    c, state = mid_state
    other = replace(P21, steps=6)
    with pytest.raises(ValueError, match=r"^state\.steps:"):
        check_state(c, other, state)
    with pytest.raises(ValueError, match=r"^state\.latents:"):
        check_state(c, replace(P21, height=48), state)
    # another scheduler config (Wan2.2's flow shift): another schedule
    with pytest.raises(ValueError, match=r"^state\.scheduler\.timesteps:"):
        check_state(fresh("wan2.2-i2v-a14b-low"), P, reference["wan2.2-i2v-a14b-high"] | {
            "state.scheduler.timesteps": state["state.scheduler.timesteps"]})
    # a low expert needs the high expert's hand-off, and only once the boundary is reached
    low = fresh("wan2.2-i2v-a14b-low")
    with pytest.raises(ValueError, match="^state:"):
        denoise(low, inputs["i2v"], P)
    early = denoise(fresh("wan2.2-i2v-a14b-high"), inputs["i2v"], P, yield_now=lambda: True)
    assert state_step(early) == 1
    with pytest.raises(ValueError, match=r"^state\.step:.*above the boundary"):
        denoise(low, inputs["i2v"], P, state=early)
    # a high expert does not take a state past its boundary
    late = denoise(low, inputs["i2v"], P, state=reference["wan2.2-i2v-a14b-high"], yield_now=lambda: True)
    assert state_step(late) == expert_steps(low, P).start + 1
    with pytest.raises(ValueError, match=r"^state\.step:"):
        check_state(fresh("wan2.2-i2v-a14b-high"), P, late)
    # guidance_scale_2 is for two-expert models only, as in the pipelines
    with pytest.raises(ValueError, match="^guidance_scale_2:"):
        denoise(c, inputs["i2v"], P, state=state)
