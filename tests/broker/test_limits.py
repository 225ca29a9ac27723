"""Overload as clear answers (broker/limits.py): pure, then through the REST API with keys."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import auth
from broker.api import LIMITS, make_app
from broker.limits import Limits
from broker.service import Broker
from onepiece.config import Settings

from .test_api import LIMIT, valid


def test_a_keys_bucket_refuses_past_its_burst_and_refills_at_its_rate():
    lim = Limits(rate=2.0, burst=3)
    assert [lim.submit("k", 0.0, 0, 0) for _ in range(3)] == [None] * 3
    r = lim.submit("k", 0.0, 0, 0)
    assert r.status == 429 and r.retry_after_s == 1 and "2 jobs/s" in r.message
    assert lim.submit("other", 0.0, 0, 0) is None  # one key's burst is not another's
    assert lim.submit("k", 0.5, 0, 0) is None and lim.submit("k", 0.5, 0, 0).status == 429
    assert lim.submit(None, 0.0, 0, 0) is None  # no keys: no per-key rate


def test_unfinished_jobs_are_bounded_per_key_and_in_all():
    lim = Limits(max_active_per_key=2, max_active=5)
    assert lim.submit("k", 0.0, 1, 4) is None
    r = lim.submit("k", 0.0, 2, 4)
    assert r.status == 503 and r.retry_after_s > 0 and "key k has 2 unfinished jobs" in r.message
    r = lim.submit(None, 0.0, 0, 5)
    assert r.status == 503 and "5 unfinished jobs" in r.message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.2), st.booleans()), max_size=200), st.floats(0.5, 50), st.integers(1, 20))
def test_a_bucket_never_lets_more_through_than_burst_plus_rate_times_time(steps, rate, burst):
    lim = Limits(rate=rate, burst=burst)
    now, taken = 0.0, 0
    for dt, _ in steps:
        now += dt
        r = lim.submit("k", now, 0, 0)
        if r is None:
            taken += 1
        else:
            assert r.status == 429 and r.retry_after_s >= 1
    assert taken <= burst + rate * now + 1e-9


def test_streams_are_counted_from_enter_to_leave():
    lim = Limits(max_streams_per_key=2)
    assert lim.enter_stream("k") is None and lim.enter_stream("k") is None
    assert lim.enter_stream("k").status == 429
    lim.leave_stream("k")
    assert lim.streams("k") == 1 and lim.enter_stream("k") is None
    lim.leave_stream("k")
    lim.leave_stream("k")
    assert lim.streams("k") == 0
    with pytest.raises(ValueError, match="rate must be > 0"):
        Limits(rate=0)


@pytest.fixture
async def small(tmp_path):
    path = tmp_path / "keys.json"
    tokens = {n: auth.add_key(path, ["submit", "read"], n)[1] for n in ("alice", "bob")}
    settings = Settings(control="tcp://127.0.0.1:*", data_dir=tmp_path / "data", workflows=["wan_i2v"],
                        max_request_bytes=LIMIT, api_keys=path, submit_rate=1.0, submit_burst=3,
                        max_active_per_key=4, max_active_jobs=6, max_streams_per_key=2)
    broker = Broker(settings)
    await broker.start()
    try:
        async with TestClient(TestServer(make_app(broker, heartbeat_s=0.05))) as client:
            yield client, broker, tokens
    finally:
        await broker.stop()


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


async def test_a_burst_gets_429_with_retry_after_and_every_accepted_job_still_ends(small):
    client, broker, tokens = small
    codes, accepted = [], []
    for _ in range(6):
        resp = await client.post("/v1/jobs", json=valid(), headers=bearer(tokens["alice"]))
        codes.append(resp.status)
        if resp.status == 201:
            accepted.append((await resp.json())["id"])
        else:
            assert int(resp.headers["Retry-After"]) >= 1 and "jobs/s" in (await resp.json())["error"]
    assert codes == [201, 201, 201, 429, 429, 429]
    assert broker.active == 3 and broker.active_by_owner[auth.KeyRing(broker.settings.api_keys)
                                                         .authenticate(tokens["alice"]).id] == 3
    for job in accepted:  # no workers here: cancelling ends them; nothing accepted was dropped
        assert (await client.delete(f"/v1/jobs/{job}", headers=bearer(tokens["alice"]))).status == 202
    assert broker.active == 0 and {broker.job(j)["state"] for j in accepted} == {"cancelled"}


async def test_unfinished_jobs_past_the_bounds_get_503_and_streams_past_theirs_429(small):
    client, broker, tokens = small
    ids = []
    for who in ("alice", "alice", "alice", "bob", "bob", "bob"):
        resp = await client.post("/v1/jobs", json=valid(), headers=bearer(tokens[who]))
        assert resp.status == 201, await resp.text()
        ids.append((await resp.json())["id"])
        await asyncio.sleep(0.01)
    assert broker.active == 6
    await asyncio.sleep(1.1)  # a token back for bob: the total bound, not the rate, refuses him
    resp = await client.post("/v1/jobs", json=valid(), headers=bearer(tokens["bob"]))
    assert resp.status == 503 and int(resp.headers["Retry-After"]) > 0
    assert "6 unfinished jobs" in (await resp.json())["error"]
    # streams: two per key; the third is refused, and closing one makes room
    job = ids[0]
    r1 = await client.get(f"/v1/jobs/{job}/events", headers=bearer(tokens["alice"]))
    r2 = await client.get(f"/v1/jobs/{job}/events", headers=bearer(tokens["alice"]))
    assert r1.status == r2.status == 200
    r3 = await client.get(f"/v1/jobs/{job}/events", headers=bearer(tokens["alice"]))
    assert r3.status == 429 and "event streams open" in (await r3.json())["error"]
    r1.close()
    for _ in range(100):  # the server sees the close at its next write (a heartbeat, 50 ms)
        if client.app[LIMITS].streams(
                auth.KeyRing(broker.settings.api_keys).authenticate(tokens["alice"]).id) < 2:
            break
        await asyncio.sleep(0.05)
    r4 = await client.get(f"/v1/jobs/{job}/events", headers=bearer(tokens["alice"]))
    assert r4.status == 200
    r2.close()
    r4.close()
    for j in ids:
        await client.delete(f"/v1/jobs/{j}", headers=bearer(tokens["alice" if j in ids[:3] else "bob"]))
    assert broker.active == 0
