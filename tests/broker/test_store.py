"""The SQLite job store: buffered writes, one transaction per commit, and what survives."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid

import msgpack
import zmq
import zmq.asyncio

from broker import protocol
from broker.service import Broker
from broker.store import JobStore, new_job_id
from onepiece.config import Settings


def other_connection_sees(path, job_id: str) -> str | None:
    """The job's state as a separate connection (another process, a restart) would read it."""
    db = sqlite3.connect(str(path))
    try:
        row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None
    finally:
        db.close()


def test_writes_are_visible_to_reads_at_once_and_durable_at_commit(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.add_job("j1", "wf", {"n": 1}, {"image": b"\x89PNG"}, 1.0)
    store.add_event("j1", "queued", {})
    assert store.dirty
    assert other_connection_sees(store.path, "j1") is None  # buffered, not committed
    store.commit_soon().result(timeout=5)  # on the writer thread
    assert not store.dirty
    assert other_connection_sees(store.path, "j1") == "queued"
    store.set_state("j1", "running")
    assert store.job("j1")["state"] == "running"  # a read sees every write: it commits first
    assert [e["type"] for e in store.events("j1")] == ["queued"]
    assert other_connection_sees(store.path, "j1") == "running"
    store.add_event("j1", "succeeded", {"result": {"path": "/x.mp4"}})
    store.finish("j1", "succeeded", 2.0, None, {"path": "/x.mp4"}, {"a": {"started": 1.5}})
    store.close()

    again = JobStore(tmp_path / "jobs.sqlite3")
    job = again.job("j1")
    assert job["state"] == "succeeded" and job["result"] == {"path": "/x.mp4"}
    assert job["stages"] == {"a": {"started": 1.5}} and job["params"] == {"n": 1}
    assert [(e["seq"], e["type"]) for e in again.events("j1")] == [(0, "queued"), (1, "succeeded")]
    assert again.unfinished() == []
    again.close()


def test_commits_apply_in_the_order_they_were_asked_for(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    futures = []
    for i in range(50):  # each job inserted, then finished by a later commit
        store.add_job(f"j{i}", "wf", {}, None, float(i))
        futures.append(store.commit_soon())
        store.finish(f"j{i}", "succeeded", float(i) + 0.5, None, None, None)
        futures.append(store.commit_soon())
    for f in futures:
        f.result(timeout=10)
    assert store.counts() == {"succeeded": 50}
    store.close()


def test_a_job_that_starts_and_ends_within_one_commit_ends_in_its_final_state(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.add_job("j1", "wf", {}, None, 1.0)
    store.set_state("j1", "running")
    store.finish("j1", "failed", 2.0, "stage b failed", None, None)
    store.set_state("j2", "running")  # an unknown job: nothing to update, no error
    store.commit()
    assert store.counts() == {"failed": 1}
    assert store.job("j1")["reason"] == "stage b failed"
    store.close()


def test_unfinished_jobs_continue_their_event_numbers_after_a_restart(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.add_job("j1", "wf", {"n": 1}, {"image": b"png"}, 1.0)
    store.add_event("j1", "queued", {})
    store.add_event("j1", "stage_started", {"stage": "a"})
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite3")
    assert again.unfinished() == [("j1", "wf", {"n": 1}, {"image": b"png"}, 1.0)]
    assert again.add_event("j1", "requeued", {"reason": "broker restarted"}) == 2
    assert [e["seq"] for e in again.events("j1")] == [0, 1, 2]
    again.close()


def test_events_written_by_earlier_versions_are_read_and_numbering_continues(tmp_path):
    # The layout of earlier versions: a row per event, data as JSON text or msgpack, no event_runs.
    db = sqlite3.connect(str(tmp_path / "jobs.sqlite3"))
    with db:
        db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, workflow TEXT NOT NULL, state TEXT NOT NULL, "
                   "params TEXT NOT NULL, payload BLOB, created REAL NOT NULL, finished REAL, reason TEXT, "
                   "result TEXT, stages TEXT)")
        db.execute("CREATE TABLE events (job TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, "
                   "type TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job, seq))")
        db.execute("INSERT INTO jobs (id, workflow, state, params, created) VALUES ('j1', 'wf', 'running', '{}', 1)")
        db.execute("INSERT INTO jobs VALUES ('j0', 'wf', 'succeeded', ?, NULL, 1, 2, NULL, ?, ?)",
                   (json.dumps({"steps": 4}), json.dumps({"video": "j0.mp4"}),
                    json.dumps({"a": {"state": "done", "started": 1.25}})))
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", ("j1", 0, 1.0, "queued", json.dumps({"legacy": True})))
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", ("j1", 1, 2.0, "stage_started",
                                                                 msgpack.packb({"stage": "a"})))
    db.close()
    again = JobStore(tmp_path / "jobs.sqlite3")
    old = again.job("j0")
    assert (old["params"], old["result"], old["stages"]) == (
        {"steps": 4}, {"video": "j0.mp4"}, {"a": {"state": "done", "started": 1.25}})
    assert again.unfinished() == [("j1", "wf", {}, None, 1.0)]
    assert again.add_event("j1", "requeued", {"reason": "broker restarted"}) == 2
    again.commit()
    assert again.add_event("j1", "stage_started", {"stage": "a"}) == 3
    assert [(e["seq"], e["data"]) for e in again.events("j1")] == [
        (0, {"legacy": True}), (1, {"stage": "a"}), (2, {"reason": "broker restarted"}), (3, {"stage": "a"})]
    assert [e["seq"] for e in again.events("j1", after=1)] == [2, 3]
    again.close()


def test_the_events_of_one_commit_are_one_row_and_read_back_one_by_one(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.add_job("j1", "wf", {}, None, 1.0)
    store.add_job("j2", "wf", {}, None, 1.0)
    for i in range(5):
        store.add_event("j1", "step", {"i": i}, ts=10.0 + i)
    store.add_event("j2", "queued", {})
    store.commit()
    for i in range(5, 8):
        store.add_event("j1", "step", {"i": i}, ts=10.0 + i)
    store.commit()
    db = sqlite3.connect(str(tmp_path / "jobs.sqlite3"))
    assert db.execute("SELECT job, seq, last FROM event_runs ORDER BY job, seq").fetchall() == [
        ("j1", 0, 4), ("j1", 5, 7), ("j2", 0, 0)]
    db.close()
    events = store.events("j1")
    assert [(e["seq"], e["ts"], e["type"], e["data"]) for e in events] == [
        (i, 10.0 + i, "step", {"i": i}) for i in range(8)]
    assert [e["seq"] for e in store.events("j1", after=3)] == [4, 5, 6, 7]  # from inside a run
    assert [e["seq"] for e in store.events("j1", after=4)] == [5, 6, 7]
    assert store.events("j1", after=7) == []
    assert [e["type"] for e in store.events("j2")] == ["queued"]
    store.close()


async def test_a_submit_is_answered_only_once_its_job_is_committed(tmp_path):
    settings = Settings(control="tcp://127.0.0.1:*", data_dir=tmp_path, workflows=["synthetic3"],
                        commit_interval_s=0.05)
    broker = Broker(settings)
    await broker.start()
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(broker.endpoint)
        bodies = [protocol.pack("SUBMIT", workflow="synthetic3", params={"steps": 1 + i}) for i in range(20)]
        bodies.append(protocol.pack("SUBMIT", workflow="nope", params={}))
        for frame in protocol.frames(bodies):
            await dealer.send(frame)
        replies = []
        while len(replies) < 21:
            good, bad = protocol.unpack_frame(await asyncio.wait_for(dealer.recv(), 5))
            assert bad == []
            for m in good:
                if m["k"] == "SUBMITTED":  # durable by now: a restart would find it
                    assert other_connection_sees(settings.db_path, m["job"]) == "queued"
                replies.append(m)
        assert [m["k"] for m in replies].count("SUBMITTED") == 20
        (error,) = [m for m in replies if m["k"] == "ERROR"]
        assert "unknown workflow 'nope'" in error["reason"]
    finally:
        dealer.close()
        ctx.term()
        await broker.stop()


def test_job_ids_are_uuid7_in_time_order_and_unique():
    ids = [new_job_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and uuid.UUID(hex=i).version == 7 and uuid.UUID(hex=i).variant == uuid.RFC_4122
               for i in ids[:100])
    # the first 12 digits are the millisecond: never decreasing, so rows append at the B-trees' right edge
    stamps = [int(i[:12], 16) for i in ids]
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] / 1000 - time.time()) < 60


def test_a_finished_jobs_record_round_trips_exactly(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    params = {"prompt": "a cat", "steps": 4, "guidance_scale": 5.0, "seed": 2**40, "work": {"b": 0.1}}
    stages = {s: {"state": "done", "worker": f"{s}-w", "attempt": 1, "started": 1763800000.123456 + i,
                  "finished": 1763800000.654321 + i, "timings": {"run_s": 1e-6, "out_bytes": 16}}
              for i, s in enumerate("abc")}
    store.add_job("j1", "wf", params, None, 1.0)
    store.finish("j1", "succeeded", 2.5, None, {"video": "j1.mp4"}, stages)
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite3")
    job = again.job("j1")
    assert (job["state"], job["params"], job["result"], job["stages"]) == (
        "succeeded", params, {"video": "j1.mp4"}, stages)
    again.close()
