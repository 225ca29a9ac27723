"""Workflows as data: a DAG of stages and the job parameters, read from a TOML file.

A workflow file names its stages, what each one runs (``kind``) with which
weights (``model``), which stages it waits for (``after``) and the tensors it
hands on (``outputs``), and declares the parameters a job takes. The broker
only ever looks at this file, so a new workflow (text-to-video, a phase-split
denoise) is a new file, not a broker change::

    name = "wan_i2v"
    description = "Wan2.1 image-to-video"
    result = "video_encode"        # the stage whose DONE carries the job's result

    [stages.denoise]
    kind = "denoise"               # implementation a worker runs (default: the stage name)
    model = "wan2.1-i2v-14b"       # the weights it holds (default "": none, or not named)
    gpu = true                     # default false
    after = ["text_encode", "image_encode", "vae_encode"]   # default [] (a root)
    outputs = ["latents"]          # default []
    progress = true                # reports per-step progress, default false
    # any other key (e.g. a [stages.denoise.synthetic] table) lands in `options`

    [params.steps]                 # one table per job parameter (see stages/params.py)
    type = "integer"               # string, integer, number, boolean, image or map
    default = 40                   # or required = true
    minimum = 1
    maximum = 100
    description = "Denoising steps."

The ``[params.NAME]`` tables are the one declaration of a job's parameters:
REST validation and its messages, the OpenAPI document, ``GET /v1/workflows``,
the options of ``onepiece submit`` and the values the stages receive all come
from them (:meth:`Workflow.resolve_params` fills the defaults, so a stage sees
every declared value). A workflow without ``[params]`` accepts no parameters.
An ``image`` param is the job's input image: it travels in the job's payload,
not among the parameters.

Bare names resolve to the files shipped in ``stages/workflows/``.

Rules checked at load time, each failure a :class:`WorkflowError` naming the
file and the stage or param: at least one stage; every ``after`` names a known
stage, not itself, without repeats; no cycles; ``result`` names a stage that no
other stage waits for; every stage feeds the result (a stage that does not
would be cancelled when the job ends, so it could never be useful); synthetic
stages carry a valid ``synthetic`` table; every param is a valid declaration
(a known type and keys, a default within its bounds, not both required and
defaulted) with an identifier for a name. Fan-out (one stage feeding several)
and fan-in (several feeding one) are both allowed.

An optional ``[slo]`` table declares the latency objective the workflow's jobs
are served to (``p95_s``: seconds from submission to result, and a
``description`` of the job it is meant for); the broker counts every succeeded
job as within or past it in ``/metrics`` (``onepiece_slo_jobs_total``).

The workflows one broker serves share one namespace of stages, checked by
:func:`check_shared`: a stage name names one (kind, model) and one worker of it
serves every workflow that uses it.
"""
from __future__ import annotations

import math
import random
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import DeclarationError, Image, Param, ParamError, param_from_table, show

__all__ = [
    "Slo",
    "StageSpec",
    "SyntheticSpec",
    "Workflow",
    "WorkflowError",
    "available_workflows",
    "check_shared",
    "load_workflow",
    "loads_workflow",
    "workflow_from_dict",
]

WORKFLOWS_DIR = Path(__file__).resolve().parent / "workflows"

_STAGE_KEYS = {"kind", "model", "after", "outputs", "gpu", "progress"}
_TOP_KEYS = {"name", "description", "result", "stages", "params", "slo"}
_WORKFLOW_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
RESERVED_PARAMS = frozenset({"workflow"})  # the REST body's own field


class WorkflowError(ValueError):
    """A workflow file that cannot be used; the message names file and stage."""


@dataclass(frozen=True)
class StageSpec:
    """One stage of a workflow. Treat ``options`` as read-only.

    ``model`` names the weights the stage holds ("" where it holds none); the
    stage's name stands for its (kind, model) in every workflow a broker serves.
    """

    name: str
    kind: str
    after: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    gpu: bool = False
    progress: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    model: str = ""

    @property
    def synthetic(self) -> SyntheticSpec | None:
        """The parsed ``[stages.X.synthetic]`` table, or None if absent."""
        table = self.options.get("synthetic")
        return None if table is None else SyntheticSpec.from_mapping(table)


@dataclass(frozen=True)
class Workflow:
    """A validated DAG of stages and its job parameters; ``stages`` is in topological order,
    ``params`` in file order."""

    name: str
    description: str
    stages: Mapping[str, StageSpec]
    result: str
    source: str = "<dict>"
    params: Mapping[str, Param] = field(default_factory=dict)
    slo: Slo | None = None  # the latency objective its jobs are served to, if it declares one

    def images(self) -> list[str]:
        """The names of the image params: what a job carries in its payload."""
        return [name for name, p in self.params.items() if isinstance(p, Image)]

    def models(self) -> list[str]:
        """The models the stages hold, each once, in stage order."""
        return list(dict.fromkeys(s.model for s in self.stages.values() if s.model))

    def resolve_params(self, raw: Mapping[str, Any], *, form: bool = False) -> dict[str, Any]:
        """The job parameters of a submission, checked and with every default filled.

        ``raw`` holds JSON values (with ``form``, multipart text is parsed too);
        None counts as left out. Image params are checked by the caller and
        are not in the result: their bytes travel in the job's payload. A param
        neither given, required nor defaulted is absent. Resolving the result
        again gives it back unchanged (a random seed is drawn once). Raises
        :class:`ParamError` naming the param: ``unknown_field`` for a name
        this workflow does not declare, ``missing`` for a required one left
        out, ``invalid`` for a value out of its bounds or of the wrong type.
        """
        unknown = sorted(str(k) for k in raw if k not in self.params)
        if unknown:
            named = ", ".join(map(show, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            accepted = ", ".join(self.params) or f"none ({self.name!r} declares no parameters)"
            raise ParamError(unknown[0][:100], f"unknown field{'s' if len(unknown) > 1 else ''} {named} for workflow"
                             f" {self.name!r}; accepted: {accepted}", reason="unknown_field")
        out: dict[str, Any] = {}
        for name, param in self.params.items():
            if isinstance(param, Image):
                continue
            value = raw.get(name)
            if value is None:
                if param.required:
                    raise ParamError(name, f"{name} is required by workflow {self.name!r}", reason="missing")
                value = param.make_default()
                if value is not None:
                    out[name] = value
                continue
            try:
                out[name] = param.parse(value, form)
            except ParamError as exc:
                raise ParamError(exc.field, f"{exc.message} (workflow {self.name!r})", exc.reason) from None
        return out

    def roots(self) -> list[str]:
        """Stages that wait for nothing, in file order."""
        return [s.name for s in self.stages.values() if not s.after]

    def downstream(self, stage: str) -> list[str]:
        """Stages that consume ``stage``'s outputs, in topological order."""
        self._known(stage)
        return [s.name for s in self.stages.values() if stage in s.after]

    def upstream(self, stage: str) -> tuple[str, ...]:
        """Stages whose outputs ``stage`` consumes, in the file's order."""
        return self._known(stage).after

    def _known(self, stage: str) -> StageSpec:
        try:
            return self.stages[stage]
        except KeyError:
            raise KeyError(f"workflow {self.name!r} has no stage {stage!r}") from None


# -- synthetic stages --------------------------------------------------------

_DISTS = ("constant", "uniform", "lognormal", "exponential")


@dataclass(frozen=True)
class SyntheticSpec:
    """Cost model of a synthetic stage: a service-time distribution and an output size.

    ``mean`` is in seconds. ``cv`` (coefficient of variation) shapes the
    lognormal; ``low``/``high`` bound the uniform (its mean is their midpoint).
    """

    dist: str = "constant"
    mean: float = 0.0
    cv: float = 0.3
    low: float = 0.0
    high: float = 0.0
    output_bytes: int = 0

    def sample(self, rng: random.Random) -> float:
        """One service time in seconds, never negative."""
        if self.dist == "constant":
            return self.mean
        if self.dist == "uniform":
            return rng.uniform(self.low, self.high)
        if self.mean == 0.0:
            return 0.0
        if self.dist == "exponential":
            return rng.expovariate(1.0 / self.mean)
        # lognormal parametrised by its own mean and cv, not by the normal's mu/sigma
        sigma2 = math.log1p(self.cv * self.cv)
        mu = math.log(self.mean) - sigma2 / 2.0
        return rng.lognormvariate(mu, math.sqrt(sigma2))

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> SyntheticSpec:
        """Parse a ``synthetic`` table; raises ValueError with the offending key."""
        if not isinstance(table, Mapping):
            raise ValueError("synthetic must be a table")
        unknown = set(table) - {"service_time", "output_bytes"}
        if unknown:
            raise ValueError(f"unknown synthetic key(s) {sorted(unknown)}")
        st = table.get("service_time", {"dist": "constant", "mean": 0.0})
        if isinstance(st, (int, float)) and not isinstance(st, bool):
            st = {"dist": "constant", "mean": st}
        if not isinstance(st, Mapping):
            raise ValueError("synthetic.service_time must be a table or a number of seconds")
        unknown = set(st) - {"dist", "mean", "cv", "low", "high"}
        if unknown:
            raise ValueError(f"unknown service_time key(s) {sorted(unknown)}")
        dist = st.get("dist", "constant")
        if dist not in _DISTS:
            raise ValueError(f"service_time.dist must be one of {list(_DISTS)}, not {dist!r}")

        def number(key: str, default: float) -> float:
            value = st.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"service_time.{key} must be a number >= 0, not {value!r}")
            return float(value)

        if dist == "uniform":
            if "low" not in st or "high" not in st:
                raise ValueError("a uniform service_time needs low and high")
            low, high = number("low", 0.0), number("high", 0.0)
            if low > high:
                raise ValueError(f"service_time.low ({low}) is above high ({high})")
            mean = (low + high) / 2.0
        else:
            if "mean" not in st:
                raise ValueError(f"a {dist} service_time needs mean")
            low = high = 0.0
            mean = number("mean", 0.0)
        out = table.get("output_bytes", 0)
        if isinstance(out, bool) or not isinstance(out, int) or out < 0:
            raise ValueError(f"synthetic.output_bytes must be an integer >= 0, not {out!r}")
        return cls(dist, mean, number("cv", 0.3), low, high, out)


# -- loading -----------------------------------------------------------------


def available_workflows() -> dict[str, Path]:
    """The shipped workflows, by file stem."""
    return {p.stem: p for p in sorted(WORKFLOWS_DIR.glob("*.toml"))}


def load_workflow(path_or_name: str | Path) -> Workflow:
    """Load a workflow from a path, or by bare name from ``stages/workflows/``."""
    text = str(path_or_name)
    is_path = isinstance(path_or_name, Path) or "/" in text or "\\" in text or text.endswith(".toml")
    if is_path:
        path = Path(path_or_name)
    else:
        shipped = available_workflows()
        if text not in shipped:
            raise WorkflowError(
                f"unknown workflow {text!r}; shipped workflows: {', '.join(shipped) or 'none'}"
                " (or pass a path to a .toml file)"
            )
        path = shipped[text]
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot read workflow file: {exc.strerror or exc}") from exc
    return loads_workflow(raw, source=str(path), default_name=path.stem)


def loads_workflow(text: str, source: str = "<string>", default_name: str | None = None) -> Workflow:
    """Parse and validate workflow TOML text; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        hint = ""
        if "twice" in str(exc):  # tomllib's words for a repeated [stages.NAME] table
            hint = " (each stage name may be declared only once)"
        raise WorkflowError(f"{source}: invalid TOML: {exc}{hint}") from exc
    return workflow_from_dict(data, source=source, default_name=default_name)


def workflow_from_dict(
    data: Mapping[str, Any], source: str = "<dict>", default_name: str | None = None
) -> Workflow:
    """Validate an already-parsed workflow table and build a :class:`Workflow`."""

    def fail(msg: str, stage: str | None = None) -> WorkflowError:
        where = f"{source}: stage {stage!r}: " if stage is not None else f"{source}: "
        return WorkflowError(where + msg)

    if not isinstance(data, Mapping):
        raise fail("a workflow must be a table")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise fail(f"unknown top-level key(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise fail("missing 'name' (a non-empty string)")
    if not _WORKFLOW_NAME.fullmatch(name):
        raise fail(f"'name' {name!r} may hold only letters, digits, '.', '_' and '-': it is part of URLs and"
                   " of the OpenAPI document")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("'description' must be a string")
    raw_stages = data.get("stages")
    if raw_stages is None or (isinstance(raw_stages, Mapping) and not raw_stages):
        raise fail("no stages: add at least one [stages.NAME] table")
    if not isinstance(raw_stages, Mapping):
        raise fail("'stages' must be a table of [stages.NAME] tables")

    specs: dict[str, StageSpec] = {}
    for sname, table in raw_stages.items():
        if not isinstance(table, Mapping):
            raise fail("must be a table", sname)
        specs[sname] = _stage(sname, table, fail)

    for spec in specs.values():
        for up in spec.after:
            if up == spec.name:
                raise fail("lists itself in 'after'", spec.name)
            if up not in specs:
                raise fail(f"'after' names unknown stage {up!r}; known stages: {sorted(specs)}", spec.name)

    order = _topological(specs, fail)

    result = data.get("result")
    if not isinstance(result, str) or not result:
        raise fail("missing 'result': the stage whose output is the job's result")
    if result not in specs:
        raise fail(f"result stage {result!r} is not a stage; known stages: {sorted(specs)}")
    consumers = [s.name for s in specs.values() if result in s.after]
    if consumers:
        raise fail(f"the result stage is waited for by {consumers}; the result must be a final stage", result)
    feeds = {result}
    for sname in reversed(order):
        if sname in feeds:
            feeds.update(specs[sname].after)
    for sname in order:
        if sname not in feeds:
            raise fail(f"does not lead to the result stage {result!r}, so its work could never be used", sname)

    return Workflow(
        name=name,
        description=description,
        stages={s: specs[s] for s in order},
        result=result,
        source=source,
        params=_params(data.get("params", {}), source),
        slo=_slo(data.get("slo"), source),
    )


@dataclass(frozen=True)
class Slo:
    """A workflow's latency objective: ``p95_s`` seconds from submission to result, met when
    95 % of its jobs (of the job size the workflow's ``description`` says) end within it.

    The broker counts each succeeded job as within or past it (``/metrics``); a capacity
    policy can use it as its target.
    """

    p95_s: float
    description: str = ""

    def met(self, latency_s: float) -> bool:
        return latency_s <= self.p95_s


_SLO_KEYS = {"p95_s", "description"}


def _slo(table: Any, source: str) -> Slo | None:
    """The ``[slo]`` table: ``p95_s`` (seconds, > 0) and an optional ``description``."""
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise WorkflowError(f"{source}: 'slo' must be a table ([slo] with p95_s = seconds)")
    unknown = set(table) - _SLO_KEYS
    if unknown:
        raise WorkflowError(f"{source}: slo: unknown key(s) {sorted(unknown)}; expected {sorted(_SLO_KEYS)}")
    p95 = table.get("p95_s")
    if isinstance(p95, bool) or not isinstance(p95, (int, float)) or not math.isfinite(p95) or p95 <= 0:
        raise WorkflowError(f"{source}: slo: 'p95_s' must be a number of seconds > 0, not {show(p95)}")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise WorkflowError(f"{source}: slo: 'description' must be a string")
    return Slo(float(p95), description)


def _params(tables: Any, source: str) -> dict[str, Param]:
    """The ``[params.NAME]`` tables, each a checked declaration."""
    if not isinstance(tables, Mapping):
        raise WorkflowError(f"{source}: 'params' must be a table of [params.NAME] tables")
    out: dict[str, Param] = {}
    for pname, table in tables.items():
        where = f"{source}: param {pname!r}: "
        if not _PARAM_NAME.fullmatch(pname):
            raise WorkflowError(where + "a param name is an identifier of up to 64 characters (letters, digits, _)")
        if pname in RESERVED_PARAMS:
            raise WorkflowError(where + f"{pname!r} is reserved: the REST API's body uses it to name the workflow")
        try:
            out[pname] = param_from_table(pname, table)
        except DeclarationError as exc:
            raise WorkflowError(where + str(exc)) from None
    return out


def _stage(name: str, table: Mapping[str, Any], fail) -> StageSpec:
    kind = table.get("kind", name)
    if not isinstance(kind, str) or not kind:
        raise fail("'kind' must be a non-empty string", name)

    def names(key: str) -> tuple[str, ...]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail(f"{key!r} must be a list of names, not {value!r}", name)
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise fail(f"{key!r} repeats {dupes}", name)
        return tuple(value)

    def flag(key: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise fail(f"{key!r} must be true or false, not {value!r}", name)
        return value

    model = table.get("model", "")
    if not isinstance(model, str):
        raise fail(f"'model' must be a string, not {model!r}", name)
    options = {k: v for k, v in table.items() if k not in _STAGE_KEYS}
    spec = StageSpec(name, kind, names("after"), names("outputs"), flag("gpu"), flag("progress"), options, model)
    if kind == "synthetic" or "synthetic" in options:
        try:
            SyntheticSpec.from_mapping(options.get("synthetic", {}))
        except ValueError as exc:
            raise fail(str(exc), name) from None
    return spec


def _topological(specs: Mapping[str, StageSpec], fail) -> list[str]:
    """Kahn's algorithm, stable in file order; a cycle is reported as a path."""
    pending = {s: len(spec.after) for s, spec in specs.items()}
    order: list[str] = []
    ready = [s for s, n in pending.items() if n == 0]
    while ready:
        s = ready.pop(0)
        order.append(s)
        for t, spec in specs.items():
            if s in spec.after:
                pending[t] -= 1
                if pending[t] == 0:
                    ready.append(t)
    if len(order) == len(specs):
        return order
    # walk 'after' edges among the leftovers until a stage repeats: that is a cycle
    left = [s for s in specs if s not in order]
    path, seen = [left[0]], {left[0]: 0}
    while True:
        nxt = next(u for u in specs[path[-1]].after if u in left)
        if nxt in seen:
            cycle = path[seen[nxt]:] + [nxt]
            # edges point from consumer to producer; print them in data-flow order
            raise fail("cycle: " + " -> ".join(reversed(cycle)), cycle[-1])
        seen[nxt] = len(path)
        path.append(nxt)


# -- the workflows of one broker ------------------------------------------------------

_SHARED = ("kind", "model", "outputs", "gpu", "progress", "options")


def check_shared(workflows: Mapping[str, Workflow]) -> None:
    """Refuse workflows that cannot be served together; WorkflowError names both sides.

    A stage name is global across the workflows one broker serves: one worker
    of a stage serves every workflow that uses it, so each workflow's stage of
    that name must be the same stage (kind, model, outputs, gpu, progress and
    options such as the synthetic table; only ``after`` may differ). And a
    (kind, model) is one stage: two stages that run the same kind with the
    same non-empty model must share a name, else two workers would each hold
    the same weights.
    """
    by_name: dict[str, tuple[Workflow, StageSpec]] = {}
    by_model: dict[tuple[str, str], tuple[Workflow, StageSpec]] = {}
    for wf in workflows.values():
        for spec in wf.stages.values():
            if spec.name in by_name:
                other_wf, other = by_name[spec.name]
                for key in _SHARED:
                    mine, theirs = getattr(spec, key), getattr(other, key)
                    if mine != theirs:
                        raise WorkflowError(
                            f"{wf.source}: stage {spec.name!r}: its {key} {mine!r} differs from {theirs!r} in stage"
                            f" {other.name!r} of workflow {other_wf.name!r} ({other_wf.source}); a stage name is"
                            " shared by every workflow a broker serves and one worker serves it for all of them:"
                            " make them the same or give this stage another name")
            else:
                by_name[spec.name] = (wf, spec)
            if not spec.model:
                continue
            key = (spec.kind, spec.model)
            if key in by_model and by_model[key][1].name != spec.name:
                other_wf, other = by_model[key]
                raise WorkflowError(
                    f"{wf.source}: stage {spec.name!r}: runs kind {spec.kind!r} with model {spec.model!r} like stage"
                    f" {other.name!r} of workflow {other_wf.name!r} ({other_wf.source}); name it {other.name!r} so"
                    " that one worker serves both")
            by_model.setdefault(key, (wf, spec))
