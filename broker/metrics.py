"""Prometheus metrics of one broker (its own registry, so tests can run several).

Counters and histograms are updated as events happen; gauges that describe
the present (jobs by state, queue lengths, workers, transport bytes) are
read from the core and the store when /metrics is scraped, so they cannot
drift from the truth.

What workers report about themselves (their heartbeat's ``stats``) is peer
data: the protocol's schema bounds its shape, but a value may still be a
string, negative or absurd. Only registered workers count, and each value
is taken only if it is a plausible counter (:func:`_count`).
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from onepiece.loglimit import LogLimiter

SERVICE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
JOB_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 450, 600, 900, 1200, 1800, 3600)
COUNT_LIMIT = 1 << 63  # no real byte or message count gets near it: a value above is junk
_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # a transport name fit to be a label value
ORPHANS = (  # worker stats key -> metric: data-plane messages nobody asked for, dropped or held
    ("orphans_dropped", CounterMetricFamily, "onepiece_orphan_dropped_messages",
     "Unsolicited or orphaned data-plane messages dropped by live workers"),
    ("orphan_bytes_dropped", CounterMetricFamily, "onepiece_orphan_dropped_bytes",
     "Bytes of unsolicited or orphaned data-plane messages dropped by live workers"),
    ("orphan_bytes_held", GaugeMetricFamily, "onepiece_orphan_held_bytes",
     "Bytes of data-plane messages live workers hold for tasks not (yet) theirs"),
    ("data_refused", CounterMetricFamily, "onepiece_data_refused_messages",
     "Data-plane messages live workers refused for want of the broker's credential"),
    ("connections_refused", CounterMetricFamily, "onepiece_data_refused_connections",
     "Data-plane connections live workers refused at the handshake for want of the broker's credential"),
)


def _count(value: object) -> int | None:
    """A peer-reported count as an int, or None if it is not a plausible one
    (not a number, a bool, negative, nan, infinite or huge)."""
    t = type(value)
    if (t is int or t is float) and 0 <= value < COUNT_LIMIT:  # nan fails the comparison
        return int(value)
    return None


def _label(value: object) -> str:
    return value if type(value) is str and _LABEL.fullmatch(value) else "?"


class _Live:
    """Scrape-time view of the broker."""

    def __init__(self, broker):
        self.broker = broker

    def collect(self):
        b = self.broker
        jobs = GaugeMetricFamily("onepiece_jobs", "Jobs by state (stored)", labels=["state"])
        for state, n in sorted(b.store.counts().items()):
            jobs.add_metric([state], n)
        yield jobs
        queue = GaugeMetricFamily("onepiece_stage_queue_length", "Tasks waiting for a worker", labels=["stage"])
        workers = GaugeMetricFamily("onepiece_stage_workers", "Live workers per stage", labels=["stage"])
        busy = GaugeMetricFamily("onepiece_stage_busy_workers", "Workers with a task", labels=["stage"])
        stage_of: dict[str, str] = {}
        for stage, s in b.stages().items():
            queue.add_metric([stage], s["queued"])
            workers.add_metric([stage], len(s["workers"]))
            busy.add_metric([stage], s["busy"])
            stage_of.update({w["id"]: stage for w in s["workers"]})
        yield from (queue, workers, busy)
        moved = CounterMetricFamily("onepiece_transport_bytes", "Data-plane bytes moved by live workers",
                                    labels=["stage", "transport", "direction"])
        choices = CounterMetricFamily("onepiece_transport_choices", "Transports picked per connection by auto",
                                      labels=["stage", "transport"])
        orphans = {key: family(name, doc, labels=["stage"]) for key, family, name, doc in ORPHANS}
        totals: dict[tuple, int] = {}
        picked: dict[tuple, int] = {}
        orphaned: dict[tuple, int] = {}
        for wid, stats in b.worker_stats().items():
            stage = stage_of.get(wid)
            if stage is None or not isinstance(stats, dict):  # only registered workers count
                continue
            transport = _label(stats.get("transport"))
            for direction in ("sent", "received"):
                n = _count(stats.get(f"bytes_{direction}"))
                if n is not None:
                    key = (stage, transport, direction)
                    totals[key] = totals.get(key, 0) + n
            auto = stats.get("auto_choices")
            for name, value in auto.items() if isinstance(auto, dict) else ():
                n = _count(value)
                if n is not None:
                    key = (stage, _label(name))
                    picked[key] = picked.get(key, 0) + n
            for stat in orphans:
                n = _count(stats.get(stat))
                if n is not None:
                    orphaned[stat, stage] = orphaned.get((stat, stage), 0) + n
        for key, n in sorted(totals.items()):
            moved.add_metric(list(key), n)
        for key, n in sorted(picked.items()):
            choices.add_metric(list(key), n)
        for (stat, stage), n in sorted(orphaned.items()):
            orphans[stat].add_metric([stage], n)
        yield moved
        yield choices
        yield from orphans.values()


class BrokerMetrics:
    def __init__(self, broker):
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("onepiece_jobs_submitted", "Jobs accepted", registry=r)
        self.finished = Counter("onepiece_jobs_finished", "Jobs ended, by final state", ["state"], registry=r)
        self.service = Histogram("onepiece_stage_service_seconds", "Time a stage took to run one task",
                                 ["stage"], buckets=SERVICE_BUCKETS, registry=r)
        self.stale_messages = Counter("onepiece_stale_messages", "Late or duplicate worker messages ignored",
                                      registry=r)
        self.bad_messages = Counter("onepiece_bad_control_messages", "Malformed control messages dropped",
                                    registry=r)
        self.rejected = Counter("onepiece_rejected_requests", "REST requests refused", ["reason"], registry=r)
        self.latency = Histogram("onepiece_job_latency_seconds", "Submission to result of succeeded jobs",
                                 ["workflow"], buckets=JOB_BUCKETS, registry=r)
        self.slo = Counter("onepiece_slo_jobs", "Succeeded jobs of workflows with a latency objective ([slo] "
                           "p95_s), by whether they met it: the attainment is met=true over all",
                           ["workflow", "met"], registry=r)
        self.log_limit = LogLimiter()  # the broker's warnings about peers' input: counted above, logged sparsely
        self._service_of: dict[str, object] = {}  # stage -> its histogram child (labels() per task costs)
        r.register(_Live(broker))

    def observe_stage(self, data: dict) -> None:
        timings = data.get("timings") or {}
        seconds = timings.get("run_s")
        if isinstance(seconds, (int, float)) and 0 <= seconds < COUNT_LIMIT:  # a worker's word: not nan, not < 0
            stage = str(data.get("stage"))
            child = self._service_of.get(stage)
            if child is None:
                child = self._service_of[stage] = self.service.labels(stage)
            child.observe(seconds)

    def observe_job(self, workflow, latency_s: float) -> None:
        """A succeeded job of ``workflow`` (a Workflow) took ``latency_s`` from submission."""
        if not 0 <= latency_s < COUNT_LIMIT:
            return
        self.latency.labels(workflow.name).observe(latency_s)
        if workflow.slo is not None:
            self.slo.labels(workflow.name, "true" if workflow.slo.met(latency_s) else "false").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
