"""Workflows as data: a DAG of stages read from a TOML file.

A workflow file names its stages, what each one runs (``kind``), which
stages it waits for (``after``) and the tensors it hands on (``outputs``).
The broker only ever looks at this graph, so a new workflow (text-to-video,
a phase-split denoise) is a new file, not a broker change::

    name = "wan_i2v"
    description = "Wan2.1 image-to-video"
    result = "video_encode"        # the stage whose DONE carries the job's result

    [stages.denoise]
    kind = "denoise"               # implementation a worker runs (default: the stage name)
    gpu = true                     # default false
    after = ["text_encode", "image_encode", "vae_encode"]   # default [] (a root)
    outputs = ["latents"]          # default []
    progress = true                # reports per-step progress, default false
    # any other key (e.g. a [stages.denoise.synthetic] table) lands in `options`

Bare names resolve to the files shipped in ``stages/workflows/``.

Rules checked at load time, each failure a :class:`WorkflowError` naming the
file and the stage: at least one stage; every ``after`` names a known stage,
not itself, without repeats; no cycles; ``result`` names a stage that no
other stage waits for; every stage feeds the result (a stage that does not
would be cancelled when the job ends, so it could never be useful); synthetic
stages carry a valid ``synthetic`` table. Fan-out (one stage feeding several)
and fan-in (several feeding one) are both allowed.
"""

from __future__ import annotations

import math
import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "StageSpec",
    "SyntheticSpec",
    "Workflow",
    "WorkflowError",
    "available_workflows",
    "load_workflow",
    "loads_workflow",
    "workflow_from_dict",
]

WORKFLOWS_DIR = Path(__file__).resolve().parent / "workflows"

_STAGE_KEYS = {"kind", "after", "outputs", "gpu", "progress"}
_TOP_KEYS = {"name", "description", "result", "stages"}


class WorkflowError(ValueError):
    """A workflow file that cannot be used; the message names file and stage."""


@dataclass(frozen=True)
class StageSpec:
    """One stage of a workflow. Treat ``options`` as read-only."""

    name: str
    kind: str
    after: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    gpu: bool = False
    progress: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def synthetic(self) -> SyntheticSpec | None:
        """The parsed ``[stages.X.synthetic]`` table, or None if absent."""
        table = self.options.get("synthetic")
        return None if table is None else SyntheticSpec.from_mapping(table)


@dataclass(frozen=True)
class Workflow:
    """A validated DAG of stages; ``stages`` is in topological order."""

    name: str
    description: str
    stages: Mapping[str, StageSpec]
    result: str
    source: str = "<dict>"

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
    )


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

    options = {k: v for k, v in table.items() if k not in _STAGE_KEYS}
    spec = StageSpec(name, kind, names("after"), names("outputs"), flag("gpu"), flag("progress"), options)
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
