"""Discrete-event model of a GPU pool serving workflows, driven by the Node Manager's own policy.

What is simulated and what is real. The *decisions* are the real code: every control period
the model builds :class:`manager.policy.StageSignals` from its state and asks the real
:class:`manager.policy.ProportionalPolicy` (with the latency objectives of
:mod:`manager.slo`); GPU placement is the real :class:`manager.packing.GpuPool`. What is
modelled is the hardware and the workers: a task takes a lognormal time with the stage
profile's mean and cv (``stages/profiles/*.toml``, cited there), divided by ``k x efficiency(k)``
on a worker of width k; workers busy on the same GPU share it in equal parts (processor sharing:
n busy workers each progress at 1/n, a wide worker at its busiest GPU's pace; bench/gpu_stages.py
measured four small stages busy at once on one H200 each 2.0-4.1x slower, together 1.25x the work
of one alone, and a VAE decode beside a busy DiT each about 2x slower, together 0.935x: equal parts
is within 7 % either way); a worker holds its GPUs from its start to its exit and serves only after
its model's ``load_s``; a drained worker of a step-wise stage (a denoiser) stops at its next
step boundary and hands the rest of the task on (the handoff of ``broker/core.py``, measured
at 32 ms in ``bench/handoff.py``, modelled as free), any other drained worker first finishes
its task. Arrivals come from a trace (``bench/elastic.py``). Deterministic for a seed.

A *deployment* is a set of stages (a monolithic one has one ``pipeline`` stage per workflow,
whose time is the profile's whole-pipeline time), each fixed (``static``) or under the policy.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from manager.packing import GpuPool, StageNeed, Worker as Seat, capacity, declared_need
from manager.policy import Change, PolicyConfig, ProportionalPolicy, StageSignals
from manager.profile import Profile
from stages.workflow import SyntheticSpec, load_workflow

__all__ = ["Deployment", "Result", "SimStage", "SimWorkflow", "monolithic", "simulate", "split"]

HANDOFF_S = 0.032  # bench/handoff.py: checkpoint + ship + rebind of a denoise state


@dataclass(frozen=True)
class SimStage:
    name: str
    gpu: bool
    mean_s: Mapping[str, float]  # "workflow:class" -> mean seconds of a task on one slot
    cv: float
    load_s: float
    need: StageNeed | None  # per GPU (per rank for a wide worker); None: CPU stage
    efficiency: Mapping[int, float] = field(default_factory=lambda: {1: 1.0})
    steps: int = 0  # > 0: step-wise (hands off at a step boundary when drained)
    width: int = 1  # the width workers start at (a monolithic sp=8 pipeline: 8)

    def mean(self, workflow: str, cls: str = "standard") -> float:
        return self.mean_s[f"{workflow}:{cls}"]

    @property
    def standard_s(self) -> float:
        """A standard job's task time on one slot (the longest, for a stage workflows share)."""
        return max(m for k, m in self.mean_s.items() if k.endswith(":standard"))

    def service(self, workflow: str, cls: str, width: int, rng: random.Random) -> float:
        mean = self.mean(workflow, cls) / (width * self.efficiency.get(width, 1.0))
        return SyntheticSpec("lognormal", mean, self.cv).sample(rng)


@dataclass(frozen=True)
class SimWorkflow:
    name: str
    stages: Mapping[str, tuple[str, ...]]  # stage -> its upstream stages (names in the deployment)
    result: str
    slo_s: float


@dataclass
class Deployment:
    name: str
    stages: dict[str, SimStage]
    workflows: dict[str, SimWorkflow]
    static: dict[str, int] | None = None  # fixed workers per stage (None: the policy decides)
    policy: PolicyConfig | None = None
    gpus: int = 64  # the pool's GPUs
    gpu_memory_gb: float = 80.0
    packed: bool = True  # small stages share GPUs (memory and load permitting)
    cpu_slots: int = 256
    # the declared compute (``gpu_load``) a GPU's workers may sum to: 1.0 gives a DiT (load 1.0) its
    # GPU to itself; above it, small stages may also sit beside a DiT (memory permitting)
    max_load: float = 1.0


def split(profiles: Sequence[Profile], *, packed: bool = True, elastic: bool = True, prefix: bool = False,
          fuse_experts: bool = False) -> tuple[dict[str, SimStage], dict[str, SimWorkflow]]:
    """The stages of the workflows of ``profiles`` as separate services (shared by name across
    workflows unless ``prefix``), each GPU stage holding what its workflow declares (the Node
    Manager's packing input); ``packed=False``: every GPU worker takes a whole GPU; ``elastic``:
    DiT stages may widen (their sp_efficiency); ``fuse_experts``: a workflow's step-wise stages
    become one stage holding every expert."""
    stages: dict[str, SimStage] = {}
    flows: dict[str, SimWorkflow] = {}
    for prof in profiles:
        wf = load_workflow(prof.workflow)
        classes = sorted(set(prof.classes) | {"standard"})
        steps = int(prof.job.get("steps", 40))
        experts = [s for s in wf.stages if prof.stages[s].sp_efficiency]
        fused = experts if fuse_experts and len(experts) > 1 else []

        def rename(s: str) -> str:
            s = f"{wf.name}.experts" if s in fused else s
            return f"{wf.name}.{s}" if prefix else s

        after: dict[str, tuple[str, ...]] = {}
        for s, spec in wf.stages.items():
            key = rename(s)
            ups = tuple(dict.fromkeys(rename(u) for u in spec.after if rename(u) != key))
            after[key] = after.get(key, ()) + tuple(u for u in ups if u not in after.get(key, ()))
            if key in stages and s in fused:
                continue  # the fused experts: built with the first one
            group = [prof.stages[e] for e in fused] if s in fused else [prof.stages[s]]
            mean = {f"{wf.name}:{c}": sum(prof.mean_s(p.name, c) for p in group) for c in classes}
            p = group[0]
            if s in fused:
                memory = sum(q.memory_gb for q in group)
                need = StageNeed(memory, memory + max(q.peak_gb - q.memory_gb for q in group), 1.0)
            elif spec.gpu:
                need = declared_need(s, spec.options)
                need = need if packed else replace(need, load=1.0)
            else:
                need = None
            old = stages.get(key)
            if old is not None:  # a stage workflows share: one service, the classes of every workflow
                stages[key] = replace(old, mean_s={**old.mean_s, **mean}, cv=max(old.cv, p.cv),
                                      load_s=max(old.load_s, p.load_s))
                continue
            stages[key] = SimStage(key, spec.gpu, mean, max(q.cv for q in group), sum(q.load_s for q in group), need,
                                   dict(p.sp_efficiency) if (elastic and p.sp_efficiency) else {1: 1.0},
                                   steps=steps if p.sp_efficiency else 0)
        slo = wf.slo.p95_s if wf.slo else 600.0
        flows[wf.name] = SimWorkflow(wf.name, after, rename(wf.result), slo)
    return stages, flows


def monolithic(profiles: Sequence[Profile], variants: Mapping[str, object]) -> tuple[dict[str, SimStage],
                                                                                     dict[str, SimWorkflow]]:
    """One ``<workflow>.pipeline`` stage per workflow: the variant's whole-pipeline time on its
    sp GPUs (held from the first stage to the last), its whole-pipeline load."""
    stages, flows = {}, {}
    for prof in profiles:
        v = prof.variant(variants[prof.workflow])
        classes = sorted(set(prof.classes) | {"standard"})
        key = f"{prof.workflow}.pipeline"
        mean = {f"{prof.workflow}:{c}": prof.pipeline_mean_s(v, c) * v.sp for c in classes}  # on one slot: / sp below
        need = StageNeed(prof.monolithic_memory_gb(v) / v.sp, prof.monolithic_peak_gb(v), 1.0)
        stages[key] = SimStage(key, True, mean, prof.pipeline_cv(v), prof.monolithic_load_time(v), need,
                               {v.sp: 1.0}, steps=0, width=v.sp)
        wf = load_workflow(prof.workflow)
        flows[prof.workflow] = SimWorkflow(prof.workflow, {key: ()}, key, wf.slo.p95_s if wf.slo else 600.0)
    return stages, flows


# == the model ===================================================================================


@dataclass
class _Task:
    job: "_Job"
    stage: str
    left: float = 1.0  # fraction of the task still to do (a handed-off denoise resumes)
    queued_at: float = 0.0


@dataclass
class _Job:
    id: int
    workflow: str
    cls: str
    t0: float
    done: set = field(default_factory=set)
    started: set = field(default_factory=set)
    end: float | None = None


@dataclass(eq=False)
class _W:
    id: int
    stage: str
    width: int
    seats: list
    ready_at: float
    state: str = "loading"  # loading | idle | busy | gone
    draining: bool = False
    replace: bool = False  # of an old width: drain once a new-width worker is up
    task: _Task | None = None
    t_start: float = 0.0
    gen: int = 0  # invalidates a stale completion or handoff event
    gpus: tuple[int, ...] = ()  # the GPUs its seats are on (for the whole of its life)
    total: float = 0.0  # seconds the current task takes on a GPU of its own
    work: float = 0.0  # ... of which still to do, as of ``mark``
    mark: float = 0.0
    rate: float = 1.0  # its share of its GPUs now (1 / the busy workers on the busiest one)
    stop_at: float | None = None  # drained mid-task: hand off when ``work`` comes down to this
    stop_left: float = 0.0  # ... with this fraction of the task left


@dataclass
class Result:
    name: str
    horizon_s: float
    gpu_seconds: float  # GPU-seconds held (a shared GPU once)
    latencies: dict[str, list[float]]  # workflow -> end-to-end seconds of finished jobs
    unfinished: dict[str, int]
    slo: dict[str, float]
    timeline: list[tuple[float, int, dict[str, int]]]  # (t, GPUs held, workers per stage)
    changes: list[tuple[float, str, int, int, str]]  # (t, stage, delta, width, reason)
    starts: int = 0
    reforms: int = 0
    peak_gpus: int = 0
    note: str = ""  # how the configuration was chosen (e.g. the margin a managed one plans for)

    def attainment(self, wf: str) -> float:
        lat = self.latencies.get(wf, [])
        n = len(lat) + self.unfinished.get(wf, 0)
        return 1.0 if n == 0 else sum(1 for x in lat if x <= self.slo[wf]) / n

    def pct(self, wf: str, q: float) -> float | None:
        lat = sorted(self.latencies.get(wf, []))
        if not lat:
            return None
        return lat[min(len(lat) - 1, max(0, math.ceil(q / 100 * len(lat)) - 1))]

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    @property
    def jobs(self) -> int:
        return sum(len(v) for v in self.latencies.values())


class _Sim:
    def __init__(self, dep: Deployment, arrivals: Sequence[tuple[float, str, str]], seed: int, horizon: float,
                 account_until: float, account_from: float = 0.0):
        self.d = dep
        self.account_until = account_until
        self.account_from = account_from  # a warm-up: GPUs and jobs before it are not counted
        self.rng = random.Random(seed)
        self.arrivals = arrivals
        self.horizon = horizon
        self.now = 0.0
        self.ev: list = []
        self.seq = itertools.count()
        self.queues: dict[str, deque[_Task]] = {s: deque() for s in dep.stages}
        self.workers: dict[str, list[_W]] = {s: [] for s in dep.stages}
        self.width: dict[str, int] = {s: st.width for s, st in dep.stages.items()}
        # max_load 1: a DiT rank or a monolithic pipeline (load 1.0) has its GPU to itself; unpacked,
        # every stage's load is 1.0 (see split), so each worker takes a whole GPU
        self.pool = GpuPool([dep.gpu_memory_gb] * dep.gpus, max_load=dep.max_load)
        self.busy_on: dict[int, set[_W]] = {}  # GPU -> its workers running a task
        self.cpu_used = 0
        self.pending: deque[tuple[str, int]] = deque()  # starts waiting for room
        self.ids = itertools.count()
        self.gpu_s = 0.0
        self.t_held = account_from
        self.arr_count: dict[str, int] = {s: 0 for s in dep.stages}
        self.svc: dict[str, float] = {}
        self.lat: dict[str, list[float]] = {w: [] for w in dep.workflows}
        self.jobs: list[_Job] = []
        self.timeline: list = []
        self.changes: list = []
        self.starts = self.reforms = 0
        self.peak = 0
        self.policy = ProportionalPolicy(dep.policy) if dep.policy is not None else None
        self.period_s = (dep.policy or PolicyConfig()).period_s  # a fixed allocation: its timeline's step
        if dep.policy is not None:
            self.policy_slots = (capacity(sorted((s, st.need) for s, st in dep.stages.items() if st.need),
                                          [dep.gpu_memory_gb] * dep.gpus, max_load=dep.max_load)
                                 if dep.packed else dep.gpus)

    # -- events ---------------------------------------------------------------------------
    def at(self, t: float, kind: str, *args) -> None:
        heapq.heappush(self.ev, (t, next(self.seq), kind, args))

    def account(self) -> None:
        """Add the GPU-seconds held since the last change of the pool; called just before one."""
        now = max(self.account_from, min(self.now, self.account_until))
        self.gpu_s += self.pool.held() * max(0.0, now - self.t_held)
        self.t_held = max(self.t_held, now)

    def run(self) -> Result:
        d = self.d
        for i, (t, wf, cls) in enumerate(self.arrivals):
            self.at(t, "arrive", wf, cls)
        # the first workers, biggest first (as manager.packing.plan orders them): small ones fill the
        # room the big ones leave instead of taking a GPU a big one then cannot fit on
        first = d.static if d.static is not None else {s: d.policy.floor(s) for s in d.stages}
        for s in sorted(first, key=lambda s: -(d.stages[s].need.peak_gb if d.stages[s].need else 0.0)):
            for _ in range(first[s]):
                self.start(s, self.width[s], warm=True)
        self.at(0.0, "tick")
        while self.ev:
            t, _, kind, args = heapq.heappop(self.ev)
            if t > self.horizon:
                break
            self.now = t
            getattr(self, "on_" + kind)(*args)
        self.now = self.horizon
        self.account()
        unfinished = {w: 0 for w in d.workflows}
        for j in self.jobs:
            if j.end is None and j.t0 >= self.account_from:
                unfinished[j.workflow] += 1
        return Result(d.name, self.account_until - self.account_from, self.gpu_s, self.lat, unfinished,
                      {w: f.slo_s for w, f in d.workflows.items()}, self.timeline, self.changes,
                      self.starts, self.reforms, self.peak)

    def on_arrive(self, wf: str, cls: str) -> None:
        job = _Job(len(self.jobs), wf, cls, self.now)
        self.jobs.append(job)
        self.release(job)

    def release(self, job: _Job) -> None:
        flow = self.d.workflows[job.workflow]
        for s, ups in flow.stages.items():
            if s not in job.started and all(u in job.done for u in ups):
                job.started.add(s)
                self.arr_count[s] += 1
                self.queues[s].append(_Task(job, s, 1.0, self.now))
                self.dispatch(s)

    def on_ready(self, w: _W) -> None:
        if w.state != "loading":
            return
        w.state = "idle"
        if w.draining:
            self.exit(w)
            return
        if not w.replace:  # a new-width worker is up: one old one may go
            for old in self.workers[w.stage]:
                if old.replace and not old.draining and old.state != "gone":
                    self.drain(old)
                    break
        self.dispatch(w.stage)

    def on_done(self, w: _W, gen: int) -> None:
        if w.gen != gen or w.state != "busy":
            return
        task = w.task
        w.task, w.state = None, "idle"
        self.unbusy(w)
        st = self.d.stages[w.stage]
        elapsed = self.now - w.t_start
        full = elapsed / max(task.left, 1e-9)  # a whole task's time on this worker
        one = full * w.width * st.efficiency.get(w.width, 1.0)  # ... on one slot
        cls_mean = st.mean(task.job.workflow, task.job.cls)
        norm = one * st.mean(task.job.workflow) / cls_mean if cls_mean else one  # in standard-job seconds
        prev = self.svc.get(w.stage)
        self.svc[w.stage] = norm if prev is None else 0.8 * prev + 0.2 * norm
        self.finish(task)
        if w.draining:
            self.exit(w)
        else:
            self.dispatch(w.stage)

    def finish(self, task: _Task) -> None:
        job = task.job
        job.done.add(task.stage)
        flow = self.d.workflows[job.workflow]
        if task.stage == flow.result:
            job.end = self.now
            if job.t0 >= self.account_from:
                self.lat[job.workflow].append(self.now - job.t0)
            return
        self.release(job)

    def on_handoff(self, w: _W, gen: int) -> None:
        if w.gen != gen or w.state != "busy":
            return
        task, left = w.task, w.stop_left
        w.task, w.state, w.stop_at = None, "idle", None
        self.unbusy(w)
        task.left = left
        self.queues[w.stage].appendleft(task)  # resumes first, on another worker
        self.exit(w)
        self.dispatch(w.stage)

    # -- workers ----------------------------------------------------------------------------
    def dispatch(self, stage: str) -> None:
        q = self.queues[stage]
        if not q:
            return
        st = self.d.stages[stage]
        for w in self.workers[stage]:
            if not q:
                break
            if w.state == "idle" and not w.draining:
                task = q.popleft()
                w.task, w.state, w.t_start = task, "busy", self.now
                full = st.service(task.job.workflow, task.job.cls, w.width, self.rng)
                w.total = w.work = full * task.left + (HANDOFF_S if task.left < 1.0 else 0.0)
                w.mark, w.stop_at = self.now, None
                for g in w.gpus:
                    self.busy_on.setdefault(g, set()).add(w)
                self.share(w.gpus, also=w)

    # -- GPU sharing ------------------------------------------------------------------------
    def share(self, gpus: Sequence[int], also: _W | None = None) -> None:
        """The busy workers on ``gpus`` (and ``also``) from now on: bring their progress up to
        date at their old shares, then give each its new share and its next event."""
        ws = {x for g in gpus for x in self.busy_on.get(g, ())}
        if also is not None:
            ws.add(also)
        for x in sorted(ws, key=lambda x: x.id):  # a fixed order: the run stays deterministic
            x.work = max(0.0, x.work - (self.now - x.mark) * x.rate)
            x.mark = self.now
            x.rate = min((1.0 / len(self.busy_on[g]) for g in x.gpus), default=1.0)
            x.gen += 1
            if x.stop_at is None:
                self.at(self.now + x.work / x.rate, "done", x, x.gen)
            else:
                self.at(self.now + max(0.0, x.work - x.stop_at) / x.rate, "handoff", x, x.gen)

    def unbusy(self, w: _W) -> None:
        """``w`` stopped running a task: the others on its GPUs speed up."""
        for g in w.gpus:
            self.busy_on[g].discard(w)
        self.share(w.gpus)

    def start(self, stage: str, width: int, warm: bool = False) -> bool:
        st = self.d.stages[stage]
        seats = []
        if st.need is not None:
            self.account()
            for _ in range(width):
                seat = Seat(stage, st.need)
                if self.pool.place(seat) is None:
                    for s in seats:
                        self.pool.remove(s)
                    return False
                seats.append(seat)
            self.peak = max(self.peak, self.pool.held())
        else:
            if self.cpu_used + 1 > self.d.cpu_slots:
                return False
            self.cpu_used += 1
        w = _W(next(self.ids), stage, width, seats, self.now + (0.0 if warm else st.load_s),
               gpus=tuple(sorted({self.pool.gpu_of(s) for s in seats})))
        self.workers[stage].append(w)
        self.starts += 0 if warm else 1
        if warm:
            w.state = "idle"
        else:
            self.at(w.ready_at, "ready", w)
        return True

    def drain(self, w: _W) -> None:
        if w.draining or w.state == "gone":
            return
        w.draining = True
        st = self.d.stages[w.stage]
        if w.state in ("idle", "loading"):
            self.exit(w)
        elif w.state == "busy" and st.steps:
            # stop at the next step boundary; the rest of the task is handed on
            w.work = max(0.0, w.work - (self.now - w.mark) * w.rate)
            w.mark = self.now
            steps_left = max(1, round(w.task.left * st.steps))
            step = w.total / steps_left
            done_steps = min(steps_left, math.floor((w.total - w.work) / step + 1e-9) + 1)
            if done_steps >= steps_left:
                return  # finishes its last step anyway
            w.stop_at = w.total - done_steps * step
            w.stop_left = w.task.left * (steps_left - done_steps) / steps_left
            self.share((), also=w)

    def exit(self, w: _W) -> None:
        if w.state == "gone":
            return
        w.state = "gone"
        if w.seats:
            self.account()
        for s in w.seats:
            self.pool.remove(s)
        if not w.seats and self.d.stages[w.stage].need is None:
            self.cpu_used -= 1
        self.workers[w.stage].remove(w)
        self.retry_pending()

    def retry_pending(self) -> None:
        n = len(self.pending)
        for _ in range(n):
            stage, width = self.pending.popleft()
            if width != self.width[stage]:
                continue
            if not self.start(stage, width):
                self.pending.append((stage, width))

    # -- the manager ------------------------------------------------------------------------
    def on_tick(self) -> None:
        d = self.d
        if self.policy is not None:
            sig = self.signals()
            for c in self.policy.decide(self.now, sig, self.policy_slots, d.cpu_slots):
                self.apply(c)
        held = self.pool.held()
        self.timeline.append((self.now, held, {s: sum(w.width for w in ws) for s, ws in self.workers.items()}))
        self.arr_count = {s: 0 for s in d.stages}
        if self.now + self.period_s <= self.horizon:
            self.at(self.now + self.period_s, "tick")

    def signals(self) -> dict[str, StageSignals]:
        out = {}
        d = self.d
        for s, st in d.stages.items():
            ws = self.workers[s]
            k = self.width[s]
            live = [w for w in ws if not w.draining and not w.replace and w.width == k]
            svc1 = self.svc.get(s, 0.0)
            svc = svc1 / (k * st.efficiency.get(k, 1.0)) if svc1 else 0.0
            q = self.queues[s]
            pend = sum(1 for p in self.pending if p[0] == s and p[1] == k)
            out[s] = StageSignals(
                stage=s, gpu=st.gpu, arrival_rate=self.arr_count[s] / self.period_s, service_time=svc,
                queue_len=len(q), queue_wait=(self.now - q[0].queued_at) if q else 0.0,
                busy=sum(1 for w in live if w.state == "busy"),
                workers=sum(1 for w in live if w.state in ("idle", "busy")),
                starting=sum(1 for w in live if w.state == "loading") + pend,
                draining=sum(1 for w in ws if w not in live),
                load_time=st.load_s, width=k,
                held_slots=sum(w.width for w in ws) + pend * k)
        return out

    def apply(self, c: Change) -> None:
        self.changes.append((self.now, c.stage, c.delta, c.width, c.reason))
        s = c.stage
        if c.delta > 0:
            if c.width != self.width[s]:
                self.reforms += 1
                self.width[s] = c.width
                for w in self.workers[s]:
                    if w.width != c.width:
                        w.replace = True
                self.pending = deque(p for p in self.pending if p[0] != s)
            for _ in range(c.delta):
                if not self.start(s, c.width):
                    self.pending.append((s, c.width))
            return
        n = -c.delta
        # drop starts still waiting for room, then idle, loading, and last busy workers (least done first)
        kept: deque[tuple[str, int]] = deque()
        for p in self.pending:
            if n and p[0] == s:
                n -= 1
            else:
                kept.append(p)
        self.pending = kept
        cands = [w for w in self.workers[s] if not w.draining]
        order = {"idle": 0, "loading": 1, "busy": 2}
        # as the manager chooses (manager.service._drain_one): of the least busy, one whose GPUs it
        # leaves empty first (not a DiT whose GPU small stages share)
        cands.sort(key=lambda w: (not w.replace, order.get(w.state, 3), not self.pool.frees(w.seats),
                                  -(w.t_start if w.state == "busy" else 0)))
        for w in cands[:n]:
            self.drain(w)


def simulate(dep: Deployment, arrivals: Sequence[tuple[float, str, str]], *, horizon_s: float, seed: int = 1,
             drain_s: float = 1800.0, warmup_s: float = 0.0) -> Result:
    """Run ``dep`` on ``arrivals`` ((time, workflow, class), sorted): GPUs are counted from
    ``warmup_s`` until ``horizon_s`` (the trace's end), and only jobs that arrive in that time;
    they may finish for ``drain_s`` more."""
    if not 0 <= warmup_s < horizon_s:
        raise ValueError(f"warmup_s must be in [0, horizon_s={horizon_s}), not {warmup_s!r}")
    return _Sim(dep, arrivals, seed, horizon_s + drain_s, horizon_s, warmup_s).run()
