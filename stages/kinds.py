"""Stage kinds: what a worker runs for one task, chosen by the workflow's ``kind``.

A kind loads its model once (:meth:`StageKind.load`) and then runs tasks
(:meth:`StageKind.run`) in a worker thread, so the event loop keeps serving
heartbeats and the data plane while a GPU computes. The Wan kinds are thin
wrappers over :mod:`stages.wan.compute`, the same arithmetic as diffusers'
``WanImageToVideoPipeline``; ``synthetic`` spends a sampled time and emits
filler tensors, for capacity tests on machines without GPUs.
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from onepiece.results import ResultStore

from .workflow import StageSpec

log = logging.getLogger("onepiece.stage")


class StageCancelled(Exception):
    """The task was cancelled while it ran."""


class StageFailed(Exception):
    """The task cannot succeed with these inputs (not worth retrying elsewhere)."""


class CancelFlag:
    """Set once by the worker's loop, read by the stage's thread: ``set``, ``is_set`` and
    ``wait`` as on a ``threading.Event``.

    Every task has one and nearly none is ever waited on with a timeout, so the
    Event (a Condition, which is Python code to build) is made only when a wait
    must block; a zero-cost task pays for a lock alone.
    """

    __slots__ = ("_flag", "_event", "_lock")

    def __init__(self):
        self._flag = False
        self._event: threading.Event | None = None
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            self._flag = True
            event = self._event
        if event is not None:
            event.set()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the flag is set, waiting up to ``timeout`` seconds (None: until it is)."""
        if self._flag:
            return True
        if timeout is not None and timeout <= 0:
            return False
        with self._lock:
            if self._flag:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)


def _never() -> bool:
    return False


@dataclass
class TaskContext:
    """What a stage's run gets besides its input tensors.

    The step-boundary hooks (used by kinds whose work is a sequence of steps, e.g.
    denoise; others ignore them): ``resume`` is a state to continue from (its
    tensors' names start with ``state.``; None: start from the beginning), one the
    stage's :meth:`StageKind.resumable` has accepted (the worker asks it first);
    ``snapshot(done, make_state)`` is called after each step and calls
    ``make_state()`` when the worker wants a checkpoint; ``yield_now()`` is
    polled at each step boundary: True asks the stage to stop there and return
    its state (a draining worker hands the task off).

    ``output(shape, dtype)`` gives a tensor for an output the stage is about to
    write: where the worker can, memory the likely consumer has granted
    (``Sender.allocate``), so the output's bytes are written once, where they
    are read; else an ordinary empty tensor.
    """

    job: str
    stage: str
    params: dict
    payload: dict | None
    results: ResultStore  # where a result stage stores the job's result (onepiece/results.py)
    on_progress: Callable[[int, int], None] = lambda step, total: None
    cancelled: CancelFlag = field(default_factory=CancelFlag)
    resume: dict[str, torch.Tensor] | None = None
    snapshot: Callable[[int, Callable[[], dict[str, torch.Tensor]]], None] | None = None
    yield_now: Callable[[], bool] = _never
    output: Callable[[tuple, torch.dtype], torch.Tensor] = lambda shape, dtype: torch.empty(shape, dtype=dtype)


@dataclass
class StageOutput:
    tensors: dict[str, torch.Tensor]
    result: dict | None = None  # the job's result, from the workflow's result stage
    # the stage stopped at this step boundary because ctx.yield_now() asked: ``tensors`` is its state
    handoff_step: int | None = None


def _cuda_resident_gb(device: str | None) -> float | None:
    """GB this process holds on its CUDA device (the loaded model, this rank's share of a group),
    or None off CUDA. No GPU here: measured only where one is (a lent GPU runs it)."""
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        return None
    try:
        return round(torch.cuda.memory_allocated(torch.device(device or "cuda")) / 1e9, 3)
    except RuntimeError:  # a device this process cannot use: nothing to report
        return None


class StageKind(abc.ABC):
    """One stage implementation, loaded once per worker process."""

    #: run() takes microseconds and never blocks: the worker calls it on its event loop, not in a thread
    inline = False

    def __init__(self, spec: StageSpec, *, model: str = "tiny", device: str | None = None,
                 dtype: str | None = None):
        self.spec, self.model, self.device, self.dtype = spec, model, device, dtype
        self.load_s = 0.0

    def load(self) -> None:
        """Load the model (timed; the Node Manager counts it as cold-start cost)."""

    @abc.abstractmethod
    def run(self, inputs: dict[str, torch.Tensor], ctx: TaskContext) -> StageOutput:
        """Run one task; called in a worker thread."""

    def info(self) -> dict:
        info = {"kind": self.spec.kind, "model": self.model, "load_s": round(self.load_s, 3)}
        memory = _cuda_resident_gb(self.device)
        if memory is not None:  # measured on CUDA: the Node Manager packs by it when it is above the declared
            info["memory_gb"] = memory
        return info

    def resumable(self, state: dict[str, torch.Tensor], params: dict) -> int | None:
        """The step a checkpoint ``state`` (from another worker) lets this stage resume from, or
        None if it cannot use it. Cheap (the worker asks before it says STARTED); kinds without
        step-boundary state take none."""
        return None


class _Wan(StageKind):
    """Shared loading for the Wan kinds: the parts of the model identity the stage declares
    (``model`` in the workflow), from ``tiny`` or a local diffusers directory."""

    def load(self) -> None:
        from .wan.models import load_components

        t0 = time.perf_counter()
        self.components = load_components(self.model, identity=self.spec.model or None,
                                           device=self.device, dtype=self.dtype)
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict:
        return {**super().info(), "identity": self.spec.model}

    def params(self, ctx: TaskContext):
        from .wan.compute import WanParams

        try:
            return WanParams.from_dict(ctx.params)
        except (TypeError, ValueError) as exc:
            raise StageFailed(f"bad parameters: {exc}") from exc

    def image(self, ctx: TaskContext):
        from .wan.compute import decode_image

        data = (ctx.payload or {}).get("image")
        if not isinstance(data, bytes):
            raise StageFailed("this stage needs the job's input image and got none")
        try:
            return decode_image(data)
        except ValueError as exc:
            raise StageFailed(str(exc)) from exc


class TextEncode(_Wan):
    def run(self, inputs, ctx):
        from .wan.compute import text_encode

        return StageOutput(text_encode(self.components, self.params(ctx)))


class ImageEncode(_Wan):
    def run(self, inputs, ctx):
        from .wan.compute import image_encode

        return StageOutput(image_encode(self.components, self.image(ctx), self.params(ctx)))


class VaeEncode(_Wan):
    def run(self, inputs, ctx):
        from .wan.compute import vae_encode

        return StageOutput(vae_encode(self.components, self.image(ctx), self.params(ctx)))


class Denoise(_Wan):
    """The denoising loop of the expert (or the whole DiT) this worker holds.

    Its state crosses workers at step boundaries: a Wan2.2 low-noise expert starts
    from the state its high-noise stage hands on (an input named ``state.*``); a
    checkpoint (``ctx.resume``, already accepted by :meth:`resumable`) from a worker
    that died or drained is taken instead when it is further along. A handed-on state
    this code refuses (from a peer that lies, or another version) fails the task: a
    low-noise expert has nothing else to start from.

    With ``sp > 1`` the worker is rank 0 of a group of ``sp`` processes that split
    each forward's tokens (``stages.wan.group``): the followers start at load, every
    task runs on all ranks, and a lost group fails the task (retryable) and ends
    the worker process. ``sp=1`` runs the loop here alone, as it always did.
    """

    def __init__(self, spec, *, sp: int = 1, **kw):
        super().__init__(spec, **kw)
        if sp != 1:  # sp=1 imports nothing more than it always did
            from .wan.group import check_sp

            check_sp(sp)
        self.sp = sp
        self.group = None  # the DenoiseGroup, once loaded with sp > 1

    def load(self) -> None:
        if self.sp == 1:
            return super().load()
        from .wan.group import DenoiseGroup

        t0 = time.perf_counter()
        self.group = DenoiseGroup(self.sp, model=self.model, identity=self.spec.model or None,
                                  device=self.device, dtype=self.dtype)
        self.components = self.group.start()
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict:
        """Adds ``sp`` and, for a group, ``ranks``: its followers' pids (rank 1 first)."""
        info = {**super().info(), "sp": self.sp}
        if self.group is not None:
            info["ranks"] = self.group.pids
        return info

    def resumable(self, state, params):
        from .wan.compute import WanParams, check_state

        try:
            return check_state(self.components, WanParams.from_dict(params), state)
        except ValueError as exc:
            log.warning("%s: a checkpoint is unusable (%s); starting without it", self.spec.name, exc)
            return None

    def run(self, inputs, ctx):
        from .wan.compute import STATE_PREFIX, Cancelled, check_state, denoise, expert_steps, is_state, state_step

        conditioning = {k: v for k, v in inputs.items() if not k.startswith(STATE_PREFIX)}
        handed = {k: v for k, v in inputs.items() if k.startswith(STATE_PREFIX)} or None
        p = self.params(ctx)
        state = ctx.resume
        if handed is not None:
            try:
                at = check_state(self.components, p, handed)
            except ValueError as exc:
                raise StageFailed(f"the state handed on is unusable: {exc}") from exc
            if state is None or at > state_step(state):
                state = handed
        try:
            hooks = dict(state=state, on_step=ctx.on_progress, should_stop=ctx.cancelled.is_set,
                         snapshot=ctx.snapshot, yield_now=ctx.yield_now)
            if self.group is None:
                out = denoise(self.components, conditioning, p, **hooks)
            else:
                out = self.group.denoise(self.components, conditioning, ctx.params, **hooks)
        except Cancelled as exc:
            raise StageCancelled(str(exc)) from exc
        if is_state(out):
            done = state_step(out)
            if done < expert_steps(self.components, p).stop:  # stopped early: yield_now asked for it
                return StageOutput(out, handoff_step=done)
        return StageOutput(out)


class VaeDecode(_Wan):
    def run(self, inputs, ctx):
        from .wan.compute import vae_decode

        return StageOutput(vae_decode(self.components, inputs, self.params(ctx), out=ctx.output))


class VideoEncode(StageKind):
    """Frames to mp4 on the CPU, stored as the job's result; holds no GPU."""

    def run(self, inputs, ctx):
        from .wan.compute import video_encode

        video = inputs.get("video")
        if video is None:
            raise StageFailed("video_encode needs a 'video' input")
        fps = ctx.params.get("fps")
        if not isinstance(fps, int):
            raise StageFailed(f"video_encode needs the job parameter fps (an integer), got {fps!r}: "
                              "declare [params.fps] in the workflow")
        data = video_encode(video, fps=fps)
        # whole or not at all; the key names it inside the store, where the broker finds it. A
        # StoreError (the store unreachable) is retried like any other failure, elsewhere or later
        stored = ctx.results.put(ctx.job, "mp4", data, "video/mp4")
        _, _, frames, height, width = video.shape
        return StageOutput({}, {**stored, "bytes": len(data), "frames": int(frames), "height": int(height),
                                "width": int(width), "content_type": "video/mp4"})


class Synthetic(StageKind):
    """Spends a time drawn from the workflow's distribution, emits filler of the configured size."""

    def __init__(self, spec, **kw):
        super().__init__(spec, **kw)
        self.synthetic = spec.synthetic
        if self.synthetic is None:
            raise ValueError(f"stage {spec.name} is synthetic but has no [stages.{spec.name}.synthetic] table")
        self.rng = random.Random(os.getpid() ^ time.time_ns())
        scale = float(os.environ.get("ONEPIECE_TIME_SCALE", "1") or 1)
        self.time_scale = scale
        st = self.synthetic
        # zero service time and small filler: nothing to wait for, run on the event loop
        self.inline = st.dist == "constant" and st.mean == 0.0 and not spec.progress and st.output_bytes <= 65536

    def resumable(self, state, params):
        """A step-wise synthetic stage's state is its step count (``state.step``)."""
        step = state.get("state.step")
        steps = max(1, int(params.get("steps", 1)))
        if self.spec.progress and isinstance(step, torch.Tensor) and step.numel() == 1 and 0 <= int(step) <= steps:
            return int(step)
        return None

    def load(self) -> None:
        """Stand in for a model load: the stage table's ``load_s``, scaled like the service times."""
        t0 = time.perf_counter()
        time.sleep(float(self.spec.options.get("load_s", 0.0) or 0.0) * self.time_scale)
        self.load_s = time.perf_counter() - t0

    def run(self, inputs, ctx):
        # A job may scale a stage's work, e.g. {"work": {"denoise": 2}} for a video twice as long.
        work = ctx.params.get("work")
        factor = float(work.get(self.spec.name, 1.0)) if isinstance(work, dict) else 1.0
        seconds = self.synthetic.sample(self.rng) * self.time_scale * factor
        steps = max(1, int(ctx.params.get("steps", 1))) if self.spec.progress else 1
        # A step-wise synthetic stage keeps the step-boundary contract of denoise: its state
        # is the step count, so checkpoints, resumes and handoffs can be exercised without a model.
        first = 0 if ctx.resume is None else int(ctx.resume["state.step"])  # resumable() accepted it
        for step in range(first, steps):
            if ctx.cancelled.wait(seconds / steps):
                raise StageCancelled("cancelled")
            if self.spec.progress:
                ctx.on_progress(step + 1, steps)
                state = lambda done=step + 1: {"state.step": torch.tensor(done, dtype=torch.int64)}  # noqa: E731
                if ctx.snapshot is not None:
                    ctx.snapshot(step + 1, state)
                if step + 1 < steps and ctx.yield_now():
                    return StageOutput(state(), handoff_step=step + 1)
        n = self.synthetic.output_bytes
        tensors = {name: ctx.output((n,), torch.uint8).fill_(7) for name in self.spec.outputs}
        result = None if self.spec.outputs else {"synthetic": True, "seconds": seconds}
        return StageOutput(tensors, result)


KINDS: dict[str, str] = {
    "text_encode": "stages.kinds:TextEncode",
    "image_encode": "stages.kinds:ImageEncode",
    "vae_encode": "stages.kinds:VaeEncode",
    "denoise": "stages.kinds:Denoise",
    "vae_decode": "stages.kinds:VaeDecode",
    "video_encode": "stages.kinds:VideoEncode",
    "synthetic": "stages.kinds:Synthetic",
}


def make_stage(spec: StageSpec, *, sp: int = 1, **options: Any) -> StageKind:
    """Instantiate the kind a workflow names for ``spec`` (import on demand). ``sp``
    (the worker's sequence-parallel size) goes to the denoise kind alone: a worker's
    settings apply to whatever stage it serves, and only denoise splits."""
    try:
        target = KINDS[spec.kind]
    except KeyError:
        raise ValueError(f"stage {spec.name}: unknown kind {spec.kind!r}; known: {', '.join(KINDS)}") from None
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if issubclass(cls, Denoise):
        options["sp"] = sp
    return cls(spec, **options)
