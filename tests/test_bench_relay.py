"""bench/control_plane.py's bare relay moves jobs through its fake workers and stops every process
it started. Behaviour only: how fast it goes is the benchmark's business."""

from __future__ import annotations

from bench import control_plane as cp
from broker import protocol


def test_relay_kinds_are_protocol_kinds():
    assert set(cp.RELAY_KINDS) <= set(protocol.SCHEMA)


async def test_relay_moves_tasks_and_stops_its_processes():
    plan = cp.Plan(warmup_s=0.2, seconds=1.0, rounds=1, ramp_s=0.1, latency_s=0.5, drain_s=15.0, load=0.5)
    relay = cp.Relay(plan, window=4)
    try:
        res = await relay.measure(load=0.5)
    finally:
        relay.cleanup_sync()

    (round_,) = res["rounds"]
    assert round_["stage_tasks"] > 0 and round_["jobs"] > 0
    assert res["latency"]["hop"]["n"] > 0
    assert all(res["latency"]["per_hop"][s]["n"] > 0 for s in cp.STAGES)
    assert len(relay.processes) == 2 + len(cp.STAGES)  # relay, client, a worker per stage
    assert all(p.exitcode is not None for p in relay.processes)
    assert not relay.tmp.exists()
