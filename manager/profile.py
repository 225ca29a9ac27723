"""Stage profiles: what each stage of a workflow costs, read from a TOML file.

A profile (``stages/profiles/<name>.toml``) gives, per stage, a service-time
distribution (the same table a ``[stages.X.synthetic]`` service_time takes),
whether the stage needs a GPU, the time to load its model, the GPU memory
the loaded model holds, and the size of what it hands on. Optional parts:

* ``[stages.X.sp_efficiency]``: how a stage's time scales when it spans k
  GPUs (sequence parallelism): ``time(k) = time(1) / (k * efficiency(k))``;
* ``[classes.NAME.scale]``: job classes that multiply some stages' times
  (e.g. long videos);
* ``[monolithic]``: the one-process-per-GPU-group deployments the profile is
  compared against: either ``sp_degrees`` (one plain variant per GPU count),
  or named ``[monolithic.variants.NAME]`` tables, each with its GPU count
  ``sp`` and the models it keeps in host memory (``offload``) and copies in
  every job at ``h2d_gbps``; plus whole-pipeline ``load_s`` and which models
  every rank loads;
* ``gpu_memory_gb``: the memory of one GPU, which every variant's per-GPU peak
  is checked against.

Several stages may carry ``sp_efficiency`` (e.g. the two experts of Wan2.2
A14B); a pipeline on k GPUs divides each of them by its own speedup.

From a profile this module builds synthetic workflows for capacity runs: the
split workflow (the real DAG, every stage ``synthetic``) and the monolithic
one (ONE ``pipeline`` stage holding its GPUs from the first stage to the
last), and computes the expected per-job costs both ways. The Node Manager
can also read service and load times from it before it has measurements.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.workflow import SyntheticSpec, Workflow, load_workflow

from .packing import StageNeed

__all__ = ["PROFILES_DIR", "MonolithicVariant", "Profile", "ProfileError", "StageProfile", "available_profiles",
           "load_profile"]

PROFILES_DIR = Path(__file__).resolve().parents[1] / "stages" / "profiles"
PIPELINE_STAGE = "pipeline"

_STAGE_KEYS = {"gpu", "model", "model_id", "service_time", "load_s", "memory_gb", "peak_gb", "output_bytes",
               "sp_efficiency"}
_TOP_KEYS = {"name", "workflow", "description", "hardware", "gpu_memory_gb", "job", "stages", "classes", "monolithic"}
_MONO_KEYS = {"sp_degrees", "load_s", "replicated_per_gpu", "h2d_gbps", "variants"}
_VARIANT_KEYS = {"description", "sp", "offload"}

# The job parameters a synthetic workflow declares: Synthetic.run reads `steps` (progress
# reports per task) and `work` (per-stage time factors, how a job class is expressed).
SYNTHETIC_PARAMS = {
    "steps": {"type": "integer", "default": 1, "minimum": 1, "maximum": 1000},
    "work": {"type": "map", "minimum": 0.0, "maximum": 1000.0},
}


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
class MonolithicVariant:
    """One way to deploy the whole pipeline in one process per GPU group.

    ``sp`` GPUs per pipeline: with sp > 1 the models are sharded over the ranks (FSDP), except
    the profile's ``replicated_per_gpu`` ones, and every stage with an ``sp_efficiency`` table
    runs sequence-parallel. ``offload`` names model_ids that do not stay on the GPU: their
    weights live in host memory and are copied in for their stage, once per job (that is what
    holding two 14B experts on one GPU, one at a time, costs).
    """

    name: str
    sp: int = 1
    offload: tuple[str, ...] = ()
    description: str = ""

    @property
    def label(self) -> str:
        return f"monolithic {self.name}"


VariantKey = MonolithicVariant | int | str


@dataclass(frozen=True)
class Profile:
    name: str
    workflow: str
    description: str
    hardware: str
    job: Mapping[str, Any]
    stages: Mapping[str, StageProfile]
    classes: Mapping[str, Mapping[str, float]]  # class -> stage -> time factor
    variants: tuple[MonolithicVariant, ...] = (MonolithicVariant("sp=1"),)
    monolithic_load_s: float | None = None
    replicated_per_gpu: tuple[str, ...] = ()  # model_ids every rank of a multi-GPU pipeline loads
    h2d_gbps: float | None = None  # host -> GPU copy rate of offloaded weights, GB/s
    gpu_memory_gb: float | None = None  # one GPU's memory, what the peaks are checked against
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
    def parallel_stages(self) -> tuple[str, ...]:
        """The stages that sequence parallelism splits (those with an sp_efficiency table)."""
        return tuple(s.name for s in self.stages.values() if s.sp_efficiency)

    @property
    def sp_degrees(self) -> tuple[int, ...]:
        """GPUs per pipeline of each monolithic variant, in order."""
        return tuple(v.sp for v in self.variants)

    def stage_needs(self) -> dict[str, StageNeed]:
        """What one worker of each GPU stage holds on its GPU (resident and peak GB), for the
        Node Manager's memory-accounted GPU pool (``Manager(stage_needs=...)``)."""
        return {s: StageNeed(p.memory_gb, p.peak_gb) for s, p in self.stages.items() if p.gpu and p.peak_gb > 0}

    # -- split (OnePiece) costs ------------------------------------------------------
    def gpu_seconds_per_job(self, cls: str | None = None) -> float:
        return sum(self.mean_s(s, cls) for s, p in self.stages.items() if p.gpu)

    def cpu_seconds_per_job(self, cls: str | None = None) -> float:
        return sum(self.mean_s(s, cls) for s, p in self.stages.items() if not p.gpu)

    # -- monolithic costs --------------------------------------------------------------
    def variant(self, key: VariantKey) -> MonolithicVariant:
        """A monolithic variant: itself, by name, or (an int) the plain variant on that many
        GPUs: everything resident, nothing copied, which is what ``sp_degrees`` describes."""
        if isinstance(key, MonolithicVariant):
            return key
        if isinstance(key, int):
            return MonolithicVariant(f"sp={key}", sp=key)
        for v in self.variants:
            if v.name == key:
                return v
        raise ProfileError(f"{self.source}: no monolithic variant {key!r}; known: {[v.name for v in self.variants]}")

    def _models(self) -> dict[str, float]:
        """Distinct GPU models (by model_id) and the memory each holds."""
        out: dict[str, float] = {}
        for p in self.stages.values():
            if p.gpu:
                mid = p.model_id or p.name
                out[mid] = max(out.get(mid, 0.0), p.memory_gb)
        return out

    def _shard(self, mid: str, gb: float, sp: int) -> float:
        """What one rank of an sp-GPU pipeline holds of a model: all of it if replicated, else 1/sp."""
        return gb if mid in self.replicated_per_gpu else gb / sp

    def copy_s_per_job(self, v: VariantKey = 1) -> float:
        """Host -> GPU copies a job waits for: every offloaded model once (its shard, in parallel
        over the ranks), at ``h2d_gbps``."""
        v = self.variant(v)
        if not v.offload:
            return 0.0
        models = self._models()
        return sum(self._shard(mid, models[mid], v.sp) for mid in v.offload) / self.h2d_gbps

    def _pipeline_parts(self, v: VariantKey, cls: str | None) -> list[tuple[float, float]]:
        v = self.variant(v)
        parts = []
        for s, p in self.stages.items():
            mean = self.mean_s(s, cls)
            if s in self.parallel_stages:
                mean /= p.speedup(v.sp)
            elif v.sp != 1 and not self.parallel_stages:
                raise ProfileError(f"{self.source}: no stage has an sp_efficiency table, so {v.sp} GPUs is undefined")
            parts.append((mean, p.cv))
        copy = self.copy_s_per_job(v)
        if copy:
            parts.append((copy, 0.0))
        return parts

    def pipeline_mean_s(self, v: VariantKey = 1, cls: str | None = None) -> float:
        """Expected time one monolithic pipeline spends on a job (every stage in order, plus the
        variant's weight copies)."""
        return sum(m for m, _ in self._pipeline_parts(v, cls))

    def pipeline_cv(self, v: VariantKey = 1, cls: str | None = None) -> float:
        """cv of the sum of independent stage times (variances add; copies are constant)."""
        parts = self._pipeline_parts(v, cls)
        mean = sum(m for m, _ in parts)
        return 0.0 if mean == 0 else math.sqrt(sum((m * c) ** 2 for m, c in parts)) / mean

    def monolithic_gpu_seconds_per_job(self, v: VariantKey = 1, cls: str | None = None) -> float:
        """GPU slot-seconds one job holds in a monolithic pipeline (its GPUs x its time)."""
        return self.variant(v).sp * self.pipeline_mean_s(v, cls)

    def monolithic_load_time(self, v: VariantKey = 1) -> float:
        """Whole-pipeline load: the profile's ``load_s``, else the sum of the distinct models'.
        The same for every variant: an offloaded model is still read from disk once."""
        if self.monolithic_load_s is not None:
            return self.monolithic_load_s
        loads: dict[str, float] = {}
        for p in self.stages.values():
            if p.gpu:
                mid = p.model_id or p.name
                loads[mid] = max(loads.get(mid, 0.0), p.load_s)
        return sum(loads.values())

    def monolithic_memory_gb(self, v: VariantKey = 1) -> float:
        """Model memory one pipeline holds on its GPUs at its peak: one copy of every resident
        model (sharded across ranks when sp > 1), a copy per extra rank of the replicated ones,
        and the largest offloaded model (the one copied in at the time)."""
        v = self.variant(v)
        models = self._models()
        resident = {mid: gb for mid, gb in models.items() if mid not in v.offload}
        extra = sum(gb for mid, gb in resident.items() if mid in self.replicated_per_gpu)
        visiting = max((models[mid] for mid in v.offload), default=0.0)
        return sum(resident.values()) + (v.sp - 1) * extra + visiting

    def monolithic_peak_gb(self, v: VariantKey = 1) -> float:
        """Peak memory of one GPU of the pipeline: the resident weights of a rank, plus, for the
        stage that needs most, its offloaded model's shard (if any) and its working set (split
        over the ranks for a sequence-parallel stage)."""
        v = self.variant(v)
        models = self._models()
        resident = sum(self._shard(mid, gb, v.sp) for mid, gb in models.items() if mid not in v.offload)
        worst = 0.0
        for s, p in self.stages.items():
            if not p.gpu:
                continue
            mid = p.model_id or p.name
            visiting = self._shard(mid, models[mid], v.sp) if mid in v.offload else 0.0
            work = max(0.0, p.peak_gb - p.memory_gb) / (v.sp if s in self.parallel_stages else 1)
            worst = max(worst, visiting + work)
        return resident + worst

    def fits(self, v: VariantKey = 1) -> bool:
        """The variant's per-GPU peak fits ``gpu_memory_gb`` (True when the profile gives none)."""
        return self.gpu_memory_gb is None or self.monolithic_peak_gb(v) <= self.gpu_memory_gb

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
        profile's ``load_s`` (real seconds) as a stage option, and each GPU stage its
        ``memory_gb``/``peak_gb`` (what a Node Manager with ``gpu_memory_gb`` packs GPU workers
        by). Returns a workflow table for
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
            if p.gpu and p.peak_gb > 0:
                table.update(memory_gb=p.memory_gb, peak_gb=p.peak_gb)
            stages[s] = table
        return self._with_params({"name": name or f"{self.name}_split", "description": f"{wf.description} "
                                  f"(synthetic, profile {self.name})", "result": wf.result, "stages": stages})

    def monolithic_workflow(self, v: VariantKey = 1, *, name: str | None = None) -> dict:
        """ONE ``pipeline`` stage (gpu, ``sp`` slots) whose time is the variant's pipeline time:
        the stage times, the parallel ones divided by their speedup, plus its weight copies;
        lognormal with the sum's mean and cv."""
        v = self.variant(v)
        table = {"kind": "synthetic", "gpu": True, "after": [], "outputs": [], "progress": False,
                 "load_s": self.monolithic_load_time(v), "slots": v.sp,
                 "synthetic": {"service_time": {"dist": "lognormal", "mean": self.pipeline_mean_s(v),
                                                "cv": self.pipeline_cv(v)}, "output_bytes": 0}}
        slug = v.name.replace("=", "")
        return self._with_params({"name": name or f"{self.name}_mono_{slug}",
                                  "description": f"monolithic {self.workflow}, {v.name} on {v.sp} GPU(s) "
                                  f"(synthetic, profile {self.name})",
                                  "result": PIPELINE_STAGE, "stages": {PIPELINE_STAGE: table}})

    @staticmethod
    def _with_params(wf: dict) -> dict:
        """Declare the synthetic job parameters, once stages.workflow knows ``[params.*]`` tables
        (``Workflow.params``); before that a workflow table with them would be refused."""
        if "params" in {f.name for f in dataclasses.fields(Workflow)}:
            wf["params"] = {k: dict(v) for k, v in SYNTHETIC_PARAMS.items()}
        return wf

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
    if not isinstance(mono, Mapping):
        raise fail("[monolithic] must be a table")
    bad = set(mono) - _MONO_KEYS
    if bad:
        raise fail(f"[monolithic]: unknown key(s) {sorted(bad)}")
    if "sp_degrees" in mono and "variants" in mono:
        raise fail("[monolithic]: give sp_degrees or variants, not both")
    models = {p.model_id or p.name for p in stages.values() if p.gpu}
    par = [s for s in stages.values() if s.sp_efficiency]

    def check_sp(k: Any, what: str) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise fail(f"{what}: sp must be a GPU count >= 1, not {k!r}")
        if k > 1 and (not par or any(k not in s.sp_efficiency for s in par)):
            raise fail(f"{what}: sp_degree {k} has no sp_efficiency entry in every parallel stage")
        return k

    variants: list[MonolithicVariant] = []
    for vname, vt in (mono.get("variants") or {}).items():
        what = f"[monolithic.variants.{vname}]"
        if not isinstance(vt, Mapping):
            raise fail(f"{what} must be a table")
        bad = set(vt) - _VARIANT_KEYS
        if bad:
            raise fail(f"{what}: unknown key(s) {sorted(bad)}")
        offload = vt.get("offload", [])
        if not isinstance(offload, list) or any(m not in models for m in offload):
            raise fail(f"{what}: offload must list GPU model_ids of this profile ({sorted(models)}), not {offload!r}")
        variants.append(MonolithicVariant(str(vname), check_sp(vt.get("sp", 1), what), tuple(offload),
                                          str(vt.get("description", ""))))
    if not variants:
        variants = [MonolithicVariant(f"sp={k}", check_sp(k, "[monolithic]")) for k in mono.get("sp_degrees", [1])]

    def positive(v: Any, what: str) -> float | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise fail(f"{what} must be a number > 0, not {v!r}")
        return float(v)

    h2d = positive(mono.get("h2d_gbps"), "[monolithic] h2d_gbps")
    if h2d is None and any(v.offload for v in variants):
        raise fail("[monolithic]: a variant offloads models, so h2d_gbps (host -> GPU GB/s) is needed")
    return Profile(name=str(data.get("name", default_name or "profile")), workflow=str(data.get("workflow", "")),
                   description=str(data.get("description", "")), hardware=str(data.get("hardware", "")),
                   job=dict(data.get("job", {})), stages=stages, classes=classes, variants=tuple(variants),
                   monolithic_load_s=positive(mono.get("load_s"), "[monolithic] load_s"),
                   replicated_per_gpu=tuple(mono.get("replicated_per_gpu", [])), h2d_gbps=h2d,
                   gpu_memory_gb=positive(data.get("gpu_memory_gb"), "gpu_memory_gb"), source=source)
