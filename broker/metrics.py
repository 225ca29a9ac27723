"""Prometheus metrics of one broker (its own registry, so tests can run several).

Counters and histograms are updated as events happen; gauges that describe
the present (jobs by state, queue lengths, workers, transport bytes) are
read from the core and the store when /metrics is scraped, so they cannot
drift from the truth.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

SERVICE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


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
        totals: dict[tuple, int] = {}
        for wid, stats in b.worker_stats().items():
            stage = stage_of.get(wid)
            if stage is None:
                continue
            for direction in ("sent", "received"):
                key = (stage, str(stats.get("transport", "?")), direction)
                totals[key] = totals.get(key, 0) + int(stats.get(f"bytes_{direction}", 0))
        for key, n in sorted(totals.items()):
            moved.add_metric(list(key), n)
        yield moved
        choices = CounterMetricFamily("onepiece_transport_choices", "Transports picked per connection by auto",
                                      labels=["stage", "transport"])
        picked: dict[tuple, int] = {}
        for wid, stats in b.worker_stats().items():
            for name, n in (stats.get("auto_choices") or {}).items():
                key = (stage_of.get(wid, "?"), str(name))
                picked[key] = picked.get(key, 0) + int(n)
        for key, n in sorted(picked.items()):
            choices.add_metric(list(key), n)
        yield choices


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
        self._service_of: dict[str, object] = {}  # stage -> its histogram child (labels() per task costs)
        r.register(_Live(broker))

    def observe_stage(self, data: dict) -> None:
        timings = data.get("timings") or {}
        seconds = timings.get("run_s")
        if isinstance(seconds, (int, float)):
            stage = str(data.get("stage"))
            child = self._service_of.get(stage)
            if child is None:
                child = self._service_of[stage] = self.service.labels(stage)
            child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
