"""Stage profiles: what each stage of a workflow costs, read from a TOML file.

A profile (``stages/profiles/<name>.toml``) gives, per stage, a service-time
distribution (the same table a ``[stages.X.synthetic]`` service_time takes),
whether the stage needs a GPU, the time to load its model, the GPU memory
the loaded model holds, and the size of what it hands on. Optional parts:

* ``[stages.X.sp_efficiency]``: how a stage's time scales when it spans k
  GPUs (sequence parallelism): ``time(k) = time(1) / (k * efficiency(k))``;
* ``[classes.NAME.scale]``: job classes that multiply some stages' times
  (e.g. long videos);
* ``[monolithic]``: the one-process-per-GPU-group deployment the profile is
  compared against (``sp_degrees``, whole-pipeline ``load_s``, which models
  every rank loads).

From a profile this module builds synthetic workflows for capacity runs: the
split workflow (the real DAG, every stage ``synthetic``) and the monolithic
one (ONE ``pipeline`` stage holding its GPUs from the first stage to the
last), and computes the expected per-job costs both ways. The Node Manager
can also read service and load times from it before it has measurements.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.workflow import SyntheticSpec, Workflow, load_workflow

__all__ = ["PROFILES_DIR", "Profile", "ProfileError", "StageProfile", "available_profiles", "load_profile"]

PROFILES_DIR = Path(__file__).resolve().parents[1] / "stages" / "profiles"
PIPELINE_STAGE = "pipeline"

_STAGE_KEYS = {"gpu", "model", "model_id", "service_time", "load_s", "memory_gb", "peak_gb", "output_bytes",
               "sp_efficiency"}
_TOP_KEYS = {"name", "workflow", "description", "hardware", "job", "stages", "classes", "monolithic"}


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names file and stage."""


@dataclass(frozen=True)
class StageProfile:
    name: str
    gpu: bool
    service: SyntheticSpec  # service_time distribution and output_bytes
    load_s: float = 0.0
    memory_gb: float = 0.0
    peak_gb: float = 0.0
    model: str = ""
    model_id: str = ""
    sp_efficiency: Mapping[int, float] = field(default_factory=dict)

    @property
    def mean_s(self) -> float:
        return self.service.mean

    @property
    def cv(self) -> float:
        """Coefficient of variation of one task's time."""
        s = self.service
        if s.dist == "constant":
            return 0.0
        if s.dist == "exponential":
            return 1.0
        if s.dist == "uniform":
            return 0.0 if s.mean == 0 else (s.high - s.low) / math.sqrt(12) / s.mean
        return s.cv

    def speedup(self, k: int) -> float:
        """How much faster the stage runs on ``k`` GPUs than on one."""
        if k == 1:
            return 1.0
        if k not in self.sp_efficiency:
            raise ProfileError(f"stage {self.name!r} has no sp_efficiency for {k} GPUs "
                               f"(known: {sorted(self.sp_efficiency)})")
        return k * self.sp_efficiency[k]


@dataclass(frozen=True)
class Profile:
    name: str
    workflow: str
    description: str
    hardware: str
    job: Mapping[str, Any]
    stages: Mapping[str, StageProfile]
    classes: Mapping[str, Mapping[str, float]]  # class -> stage -> time factor
    sp_degrees: tuple[int, ...] = (1,)
    monolithic_load_s: float | None = None
    replicated_per_gpu: tuple[str, ...] = ()  # model_ids every rank of a multi-GPU pipeline loads
    source: str = "<dict>"

    # -- per stage / per class ------------------------------------------------------
    def scale(self, stage: str, cls: str | None = None) -> float:
        if cls is None or (cls == "standard" and cls not in self.classes):
            return 1.0
        if cls not in self.classes:
            raise ProfileError(f"{self.source}: unknown job class {cls!r}; known: {sorted(self.classes)}")
        return float(self.classes[cls].get(stage, 1.0))

    def mean_s(self, stage: str, cls: str | None = None) -> float:
        return self.stages[stage].mean_s * self.scale(stage, cls)

    @property
    def parallel_stage(self) -> str | None:
        """The stage that sequence parallelism splits (the one with an sp_efficiency table)."""
        found = [s.name for s in self.stages.values() if s.sp_efficiency]
        return found[0] if found else None

    # -- split (OnePiece) costs ------------------------------------------------------
    def gpu_seconds_per_job(self, cls: str | None = None) -> float:
        return sum(self.mean_s(s, cls) for s, p in self.stages.items() if p.gpu)

    def cpu_seconds_per_job(self, cls: str | None = None) -> float:
        return sum(self.mean_s(s, cls) for s, p in self.stages.items() if not p.gpu)

    # -- monolithic costs --------------------------------------------------------------
    def _pipeline_parts(self, sp: int, cls: str | None) -> list[tuple[float, float]]:
        par = self.parallel_stage
        if sp != 1 and par is None:
            raise ProfileError(f"{self.source}: no stage has an sp_efficiency table, so sp_degree {sp} is undefined")
        parts = []
        for s, p in self.stages.items():
            mean = self.mean_s(s, cls)
            if s == par:
                mean /= p.speedup(sp)
            parts.append((mean, p.cv))
        return parts

    def pipeline_mean_s(self, sp: int = 1, cls: str | None = None) -> float:
        """Expected time one monolithic pipeline spends on a job (every stage in order)."""
        return sum(m for m, _ in self._pipeline_parts(sp, cls))

    def pipeline_cv(self, sp: int = 1, cls: str | None = None) -> float:
        """cv of the sum of independent stage times (variances add)."""
        parts = self._pipeline_parts(sp, cls)
        mean = sum(m for m, _ in parts)
        return 0.0 if mean == 0 else math.sqrt(sum((m * c) ** 2 for m, c in parts)) / mean

    def monolithic_gpu_seconds_per_job(self, sp: int = 1, cls: str | None = None) -> float:
        """GPU slot-seconds one job holds in a monolithic pipeline of ``sp`` GPUs."""
        return sp * self.pipeline_mean_s(sp, cls)

    def monolithic_load_time(self) -> float:
        if self.monolithic_load_s is not None:
            return self.monolithic_load_s
        loads: dict[str, float] = {}
        for p in self.stages.values():
            if p.gpu:
                mid = p.model_id or p.name
                loads[mid] = max(loads.get(mid, 0.0), p.load_s)
        return sum(loads.values())

    def _models(self) -> dict[str, float]:
        """Unique GPU models (by model_id) and the memory each holds."""
        out: dict[str, float] = {}
        for p in self.stages.values():
            if p.gpu:
                mid = p.model_id or p.name
                out[mid] = max(out.get(mid, 0.0), p.memory_gb)
        return out

    def monolithic_memory_gb(self, sp: int = 1) -> float:
        """Model memory one monolithic pipeline of ``sp`` GPUs holds: one copy of every model
        (sharded across ranks when sp > 1), plus a copy per extra rank of the replicated ones."""
        models = self._models()
        extra = sum(gb for mid, gb in models.items() if mid in self.replicated_per_gpu)
        return sum(models.values()) + (sp - 1) * extra

    # -- synthetic workflows ------------------------------------------------------------
    def check_workflow(self, wf: Workflow) -> None:
        """Every stage of ``wf`` has an entry here, with the same gpu flag."""
        missing = [s for s in wf.stages if s not in self.stages]
        if missing:
            raise ProfileError(f"{self.source}: no entry for stage(s) {missing} of workflow {wf.name!r}")
        for s, spec in wf.stages.items():
            if spec.gpu != self.stages[s].gpu:
                raise ProfileError(f"{self.source}: stage {s!r} has gpu={self.stages[s].gpu} here but "
                                   f"gpu={spec.gpu} in workflow {wf.name!r}")

    def split_workflow(self, base: Workflow | str | None = None, *, name: str | None = None,
                       bytes_scale: float = 1.0) -> dict:
        """The workflow's own DAG with every stage ``synthetic`` and costed from this profile.

        ``bytes_scale`` multiplies the output sizes (a capacity run that shrinks times by a
        factor may shrink the bytes it moves by the same factor). Each stage carries the
        profile's ``load_s`` (real seconds) as a stage option. Returns a workflow table for
        :func:`stages.workflow.workflow_from_dict`.
        """
        wf = load_workflow(base or self.workflow) if not isinstance(base, Workflow) else base
        self.check_workflow(wf)
        stages = {}
        for s, spec in wf.stages.items():
            p = self.stages[s]
            table: dict[str, Any] = {"kind": "synthetic", "gpu": spec.gpu, "after": list(spec.after),
                                     "outputs": list(spec.outputs), "progress": spec.progress,
                                     "load_s": p.load_s, "synthetic": self._synthetic(p.mean_s, p, bytes_scale)}
            stages[s] = table
        return {"name": name or f"{self.name}_split", "description": f"{wf.description} (synthetic, profile "
                f"{self.name})", "result": wf.result, "stages": stages}

    def monolithic_workflow(self, sp: int = 1, *, name: str | None = None) -> dict:
        """ONE ``pipeline`` stage (gpu) whose time is the sum of the stage times, the parallel
        stage divided by its speedup on ``sp`` GPUs; lognormal with the sum's mean and cv."""
        mean = self.pipeline_mean_s(sp)
        cv = self.pipeline_cv(sp)
        table = {"kind": "synthetic", "gpu": True, "after": [], "outputs": [], "progress": False,
                 "load_s": self.monolithic_load_time(), "slots": sp,
                 "synthetic": {"service_time": {"dist": "lognormal", "mean": mean, "cv": cv}, "output_bytes": 0}}
        return {"name": name or f"{self.name}_mono_sp{sp}",
                "description": f"monolithic {self.workflow} on {sp} GPU(s) (synthetic, profile {self.name})",
                "result": PIPELINE_STAGE, "stages": {PIPELINE_STAGE: table}}

    @staticmethod
    def _synthetic(mean: float, p: StageProfile, bytes_scale: float) -> dict:
        st = dict(dist=p.service.dist)
        if p.service.dist == "uniform":
            st.update(low=p.service.low, high=p.service.high)
        else:
            st.update(mean=mean, cv=p.service.cv)
        return {"service_time": st, "output_bytes": int(round(p.service.output_bytes * bytes_scale))}


# -- loading --------------------------------------------------------------------------

def available_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.toml"))}


def load_profile(path_or_name: str | Path) -> Profile:
    """Load a profile from a path, or by bare name from ``stages/profiles/``."""
    text = str(path_or_name)
    if isinstance(path_or_name, Path) or "/" in text or text.endswith(".toml"):
        path = Path(path_or_name)
    else:
        known = available_profiles()
        if text not in known:
            raise ProfileError(f"unknown profile {text!r}; shipped: {', '.join(known) or 'none'}")
        path = known[text]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from exc
    return profile_from_dict(data, source=str(path), default_name=path.stem)


def profile_from_dict(data: Mapping[str, Any], source: str = "<dict>", default_name: str | None = None) -> Profile:
    def fail(msg: str, stage: str | None = None) -> ProfileError:
        return ProfileError(f"{source}: " + (f"stage {stage!r}: " if stage else "") + msg)

    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise fail(f"unknown top-level key(s) {sorted(unknown)}")
    raw = data.get("stages")
    if not isinstance(raw, Mapping) or not raw:
        raise fail("no stages: add [stages.NAME] tables")
    stages: dict[str, StageProfile] = {}
    for sname, t in raw.items():
        if not isinstance(t, Mapping):
            raise fail("must be a table", sname)
        bad = set(t) - _STAGE_KEYS
        if bad:
            raise fail(f"unknown key(s) {sorted(bad)}", sname)
        if not isinstance(t.get("gpu"), bool):
            raise fail("'gpu' must be true or false", sname)
        if "service_time" not in t:
            raise fail("missing service_time", sname)
        try:
            spec = SyntheticSpec.from_mapping({"service_time": t["service_time"],
                                               "output_bytes": t.get("output_bytes", 0)})
        except ValueError as exc:
            raise fail(str(exc), sname) from None

        def num(key: str) -> float:
            v = t.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise fail(f"{key} must be a number >= 0, not {v!r}", sname)
            return float(v)

        eff: dict[int, float] = {}
        for k, v in (t.get("sp_efficiency") or {}).items():
            try:
                ki = int(k)
            except ValueError:
                raise fail(f"sp_efficiency keys are GPU counts, not {k!r}", sname) from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1.5 or ki < 1:
                raise fail(f"sp_efficiency[{k}] must be in (0, 1.5], not {v!r}", sname)
            eff[ki] = float(v)
        stages[sname] = StageProfile(sname, t["gpu"], spec, num("load_s"), num("memory_gb"), num("peak_gb"),
                                     str(t.get("model", "")), str(t.get("model_id", "")), eff)
    if sum(1 for s in stages.values() if s.sp_efficiency) > 1:
        raise fail("only one stage may carry an sp_efficiency table")

    classes: dict[str, dict[str, float]] = {}
    for cname, ct in (data.get("classes") or {}).items():
        if not isinstance(ct, Mapping):
            raise fail(f"class {cname!r} must be a table")
        scale = ct.get("scale", {})
        for s, f in scale.items():
            if s not in stages:
                raise fail(f"class {cname!r} scales unknown stage {s!r}")
            if isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0:
                raise fail(f"class {cname!r}: scale of {s!r} must be a number > 0, not {f!r}")
        classes[cname] = {s: float(f) for s, f in scale.items()}

    mono = data.get("monolithic") or {}
    sp_degrees = tuple(int(k) for k in mono.get("sp_degrees", [1]))
    par = [s for s in stages.values() if s.sp_efficiency]
    for k in sp_degrees:
        if k < 1 or (k > 1 and (not par or k not in par[0].sp_efficiency)):
            raise fail(f"monolithic sp_degree {k} has no sp_efficiency entry")
    load = mono.get("load_s")
    return Profile(name=str(data.get("name", default_name or "profile")), workflow=str(data.get("workflow", "")),
                   description=str(data.get("description", "")), hardware=str(data.get("hardware", "")),
                   job=dict(data.get("job", {})), stages=stages, classes=classes, sp_degrees=sp_degrees,
                   monolithic_load_s=None if load is None else float(load),
                   replicated_per_gpu=tuple(mono.get("replicated_per_gpu", [])), source=source)
