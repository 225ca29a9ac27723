"""SignalReader and LoadTimes: cumulative broker counters in, per-period signals out."""

from __future__ import annotations

import pytest

from manager.signals import DEFAULT_LOAD_TIME_S, LoadTimes, SignalReader


def raw(arrivals=0, completed=0, service_time_sum=0.0, queue_len=0, oldest_wait_s=0.0, busy=0, workers=0,
        draining=0, capacity=0, load=0) -> dict:
    return dict(arrivals=arrivals, completed=completed, service_time_sum=service_time_sum, queue_len=queue_len,
                oldest_wait_s=oldest_wait_s, busy=busy, workers=workers, draining=draining, capacity=capacity,
                load=load)


def test_rates_come_from_differences_and_service_time_is_smoothed():
    reader = SignalReader({"a": True, "b": False}, service_alpha=0.5)
    first = reader.read(0.0, {"a": raw(arrivals=10, completed=4, service_time_sum=8.0), "b": raw()})
    assert first["a"].arrival_rate == 0.0  # nothing to difference yet
    assert first["a"].service_time == pytest.approx(2.0)  # but the history gives a first service time
    assert first["a"].gpu and not first["b"].gpu
    second = reader.read(5.0, {"a": raw(arrivals=20, completed=6, service_time_sum=16.0, queue_len=3,
                                        oldest_wait_s=1.5, busy=2, workers=3, draining=1), "b": raw()})
    a = second["a"]
    assert a.arrival_rate == pytest.approx(2.0)
    assert a.service_time == pytest.approx(2.0 + 0.5 * (4.0 - 2.0))
    assert (a.queue_len, a.queue_wait, a.busy, a.workers, a.draining) == (3, 1.5, 2, 2, 1)
    assert second["b"].service_time == 0.0  # unknown until a task finishes


def test_manager_bookkeeping_and_a_restarted_broker():
    reader = SignalReader({"a": True})
    reader.read(0.0, {"a": raw(arrivals=100, completed=100, service_time_sum=100.0)})
    s = reader.read(5.0, {"a": raw(arrivals=3, completed=1, service_time_sum=1.0, draining=0)},
                    starting={"a": 2}, draining={"a": 1}, load_time={"a": 7.5})
    assert s["a"].arrival_rate == 0.0  # counters went backwards: a new baseline, not a negative rate
    assert (s["a"].starting, s["a"].draining, s["a"].load_time) == (2, 1, 7.5)
    later = reader.read(10.0, {"a": raw(arrivals=8, completed=1, service_time_sum=1.0)})
    assert later["a"].arrival_rate == pytest.approx(1.0)
    assert later["a"].load_time == DEFAULT_LOAD_TIME_S


def test_load_times_prefer_measurements_to_reports():
    lt = LoadTimes(alpha=0.5, default=9.0)
    assert lt.get("a") == 9.0
    lt.report("a", 2.0)
    lt.report("a", True)  # not a number: ignored
    assert lt.get("a") == 2.0
    lt.record("a", 4.0)
    lt.record("a", 6.0)
    assert lt.get("a") == pytest.approx(5.0)
    assert lt.as_dict(["a", "b"]) == {"a": pytest.approx(5.0), "b": 9.0}
