"""The job store: jobs and their events in SQLite (the embedded default).

An accepted job is committed before the client hears its id, so no accepted
job is lost; a finished job answers ``GET`` after a broker restart; jobs that
were still running when the broker stopped are found again at start-up and
re-queued. Event rows are buffered and committed in batches by the broker
(after each batch of control messages), which keeps SQLite off the hot path.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import msgpack

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    payload BLOB,
    created REAL NOT NULL,
    finished REAL,
    reason TEXT,
    result TEXT,
    stages TEXT
);
CREATE TABLE IF NOT EXISTS events (
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job, seq)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""

TERMINAL = ("succeeded", "failed", "cancelled")


class JobStore:
    """A small synchronous SQLite store; every call is short and runs on the loop thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._events: list[tuple] = []
        self._seq: dict[str, int] = {}
        self._txn = False  # a write transaction is open; commit() ends it

    def _begin(self) -> None:
        # isolation_level=None is autocommit: without an explicit BEGIN every statement,
        # and every row of an executemany, is a transaction of its own (locks + WAL frames).
        if not self._txn:
            self._db.execute("BEGIN")
            self._txn = True

    def close(self) -> None:
        self.commit()
        self._db.close()

    def add_job(self, job_id: str, workflow: str, params: dict, payload: dict | None, created: float) -> None:
        """Insert; durable at the next commit(), which comes before the job's id is returned."""
        self._begin()
        self._db.execute(
            "INSERT INTO jobs (id, workflow, state, params, payload, created) VALUES (?, ?, 'queued', ?, ?, ?)",
            (job_id, workflow, json.dumps(params), msgpack.packb(payload) if payload else None, created),
        )

    def add_event(self, job_id: str, type_: str, data: dict, ts: float | None = None) -> int:
        seq = self._seq.get(job_id)
        if seq is None:
            row = self._db.execute("SELECT COALESCE(MAX(seq), -1) FROM events WHERE job = ?", (job_id,)).fetchone()
            seq = row[0]
        seq += 1
        self._seq[job_id] = seq
        self._events.append((job_id, seq, ts or time.time(), type_, json.dumps(data, default=str)))
        return seq

    def set_state(self, job_id: str, state: str) -> None:
        self._begin()
        self._db.execute("UPDATE jobs SET state = ? WHERE id = ? AND state NOT IN (?, ?, ?)",
                         (state, job_id, *TERMINAL))

    def finish(self, job_id: str, state: str, finished: float, reason: str | None,
               result: dict | None, stages: dict | None) -> None:
        self._begin()
        self._db.execute(
            "UPDATE jobs SET state = ?, finished = ?, reason = ?, result = ?, stages = ?, payload = NULL "
            "WHERE id = ?",
            (state, finished, reason, json.dumps(result) if result else None,
             json.dumps(stages, default=str) if stages else None, job_id),
        )
        self._flush()  # the terminal event must be in the table before its counter is forgotten
        self._seq.pop(job_id, None)

    def _flush(self) -> None:
        """Write the buffered events into the open transaction."""
        if self._events:
            self._begin()
            self._db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?, ?)", self._events)
            self._events.clear()

    def commit(self) -> None:
        """Write the buffered events and end the open transaction: one transaction per batch."""
        self._flush()
        if self._txn:
            self._txn = False
            self._db.execute("COMMIT")

    def job(self, job_id: str) -> dict | None:
        row = self._db.execute(
            "SELECT id, workflow, state, params, created, finished, reason, result, stages FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            return None
        return {
            "id": row[0], "workflow": row[1], "state": row[2], "params": json.loads(row[3]),
            "created": row[4], "finished": row[5], "reason": row[6],
            "result": json.loads(row[7]) if row[7] else None,
            "stages": json.loads(row[8]) if row[8] else {},
        }

    def events(self, job_id: str, after: int = -1) -> list[dict]:
        self.commit()
        rows = self._db.execute(
            "SELECT seq, ts, type, data FROM events WHERE job = ? AND seq > ? ORDER BY seq", (job_id, after)
        ).fetchall()
        return [{"seq": s, "ts": ts, "type": t, "data": json.loads(d)} for s, ts, t, d in rows]

    def unfinished(self) -> list[tuple[str, str, dict, dict | None, float]]:
        """Jobs accepted but not ended (the broker stopped under them), oldest first."""
        rows = self._db.execute(
            "SELECT id, workflow, params, payload, created FROM jobs WHERE state NOT IN (?, ?, ?) ORDER BY created",
            TERMINAL,
        ).fetchall()
        return [(i, w, json.loads(p), msgpack.unpackb(b) if b else None, c) for i, w, p, b, c in rows]

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def recent(self, limit: int = 20) -> list[dict]:
        rows = self._db.execute(
            "SELECT id, workflow, state, created, finished, reason FROM jobs ORDER BY created DESC LIMIT ?", (limit,)
        ).fetchall()
        return [dict(zip(("id", "workflow", "state", "created", "finished", "reason"), r)) for r in rows]
