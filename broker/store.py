"""The job store: jobs and their events in SQLite (the embedded default).

Writes are buffered in memory on the event loop and reach SQLite in one
transaction per commit, each kind of row with one ``executemany``. The broker
commits on a short timer (group commit) through :meth:`JobStore.commit_soon`,
which runs the transaction on a writer thread: SQLite's file I/O (a WAL
append, now and then a checkpoint with its fsync) takes milliseconds at
times, and on the event loop it held up every control message behind it.
:meth:`JobStore.commit` does the same at once, on the caller's thread. Both
apply batches in the order they were taken, under one lock. Reads commit
first, so they see every write.

An accepted job is committed before the client hears its id
(``Broker.submit`` commits at once; a SUBMIT over the control socket is
answered once the commit that holds it is done), so no accepted job is lost;
a finished job answers ``GET`` after a broker restart; jobs that were still
running when the broker stopped are found again at start-up and re-queued.
What a crash can lose is the events and state changes of the last commit
interval: at worst a job that had ended is run again.

A job's params, result and per-stage record are msgpack too (JSON text in
rows of earlier versions, still read): the JSON encoding of the stage
record alone was a tenth of the broker's time at 1,800 jobs/s.

Events are stored as *runs*: the events one job had between two commits
are one row of ``event_runs`` (a msgpack array of ``[ts, type, data]``),
numbered by the first event's sequence number. A short job has one or two
rows instead of a dozen, and at a few thousand jobs a second the row
count is what the writer spends its time on (a row per event cost a tenth
of a core and ~1 ms of the control plane's hop p99 on 2 cores). The
``events`` table, a row per event with data as msgpack or JSON text, is
what earlier versions wrote; it is still read, and numbering continues
across both.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import msgpack

from .protocol import packed_array

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    state TEXT NOT NULL,
    params BLOB NOT NULL,  -- msgpack (JSON text in rows of earlier versions), as are result and stages
    payload BLOB,
    created REAL NOT NULL,
    finished REAL,
    reason TEXT,
    result BLOB,
    stages BLOB,
    owner TEXT  -- the id of the API key that submitted it (broker/auth.py); NULL: no key
);
CREATE TABLE IF NOT EXISTS event_runs (
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,   -- the first event's number
    last INTEGER NOT NULL,  -- the last event's number
    events BLOB NOT NULL,   -- msgpack array of [ts, type, data], one per event
    PRIMARY KEY (job, seq)
);
CREATE TABLE IF NOT EXISTS events (  -- earlier versions: a row per event, read only
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    type TEXT NOT NULL,
    data BLOB NOT NULL,  -- msgpack, or JSON text
    PRIMARY KEY (job, seq)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""

TERMINAL = ("succeeded", "failed", "cancelled")


def new_job_id() -> str:
    """A job id: a UUIDv7 (RFC 9562) as 32 hex digits, a millisecond timestamp then 74 random bits.

    Time-ordered, so a new job's rows go to the right edge of the tables'
    B-trees instead of a random page each: with random (v4) ids every group
    commit rewrote a page per job, ~22 KiB of WAL per zero-cost job, ~38 MB/s
    at 1,600 jobs/s, now about a third of that. Still unguessable.
    """
    ms = time.time_ns() // 1_000_000
    value = (ms & (1 << 48) - 1) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant 10
    return f"{value:032x}"


def _pack(data) -> bytes:
    return msgpack.packb(data, default=str)


def _unpack(data: bytes | str):
    """A stored map: msgpack, or JSON text from an earlier version."""
    return json.loads(data) if isinstance(data, str) else msgpack.unpackb(data, strict_map_key=False)


class _Batch:
    """The writes buffered between two commits, in the order they are applied."""

    __slots__ = ("jobs", "states", "finished", "events")

    def __init__(self):
        self.jobs: list[tuple] = []
        self.states: dict[str, str] = {}
        self.finished: list[tuple] = []
        self.events: dict[str, tuple[int, list[bytes]]] = {}  # job -> (first seq, packed events)

    def __bool__(self) -> bool:
        return bool(self.jobs or self.states or self.finished or self.events)

    def apply(self, db: sqlite3.Connection) -> None:
        if self.jobs:
            db.executemany("INSERT INTO jobs (id, workflow, state, params, payload, created, owner) "
                           "VALUES (?, ?, 'queued', ?, ?, ?, ?)", self.jobs)
        if self.states:
            db.executemany("UPDATE jobs SET state = ? WHERE id = ? AND state NOT IN (?, ?, ?)",
                           [(state, job, *TERMINAL) for job, state in self.states.items()])
        if self.finished:
            db.executemany("UPDATE jobs SET state = ?, finished = ?, reason = ?, result = ?, stages = ?, "
                           "payload = NULL WHERE id = ?", self.finished)
        if self.events:
            db.executemany("INSERT OR REPLACE INTO event_runs VALUES (?, ?, ?, ?)",
                           [(job, seq, seq + len(run) - 1, packed_array(run))
                            for job, (seq, run) in self.events.items()])


class JobStore:
    """A small SQLite store. Calls come from the event loop's thread; commit_soon's
    transactions run on a writer thread of the store's own."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:  # a store of an earlier version: its jobs have no owner
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        self._seq: dict[str, int] = {}  # last event number, per job with events this run
        self._batch = _Batch()
        self._queue: collections.deque[_Batch] = collections.deque()  # taken, not yet applied
        self._lock = threading.Lock()  # the connection, and the queue's order of application
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def dirty(self) -> bool:
        """Whether something is written but not committed."""
        return bool(self._batch or self._queue)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self.commit()
        self._db.close()

    def add_job(self, job_id: str, workflow: str, params: dict, payload: dict | None, created: float,
                owner: str | None = None) -> None:
        """Insert; durable at the next commit, which comes before the job's id is returned."""
        self._batch.jobs.append((job_id, workflow, _pack(params),
                                 msgpack.packb(payload) if payload else None, created, owner))
        self._seq[job_id] = -1  # a new job has no events yet

    def add_event(self, job_id: str, type_: str, data: dict, ts: float | None = None) -> int:
        seq = self._seq.get(job_id)
        if seq is None:  # a job from before this run (re-queued at start-up)
            seq = self._read("SELECT MAX(COALESCE((SELECT MAX(last) FROM event_runs WHERE job = ?), -1), "
                             "COALESCE((SELECT MAX(seq) FROM events WHERE job = ?), -1))", (job_id, job_id))[0][0]
        seq += 1
        self._seq[job_id] = seq
        event = _pack((ts or time.time(), type_, data))
        run = self._batch.events.get(job_id)
        if run is None:
            self._batch.events[job_id] = (seq, [event])
        else:
            run[1].append(event)
        return seq

    def set_state(self, job_id: str, state: str) -> None:
        """A live job's state (a terminal state goes through finish())."""
        self._batch.states[job_id] = state

    def finish(self, job_id: str, state: str, finished: float, reason: str | None,
               result: dict | None, stages: dict | None) -> None:
        self._batch.states.pop(job_id, None)
        self._batch.finished.append((state, finished, reason, _pack(result) if result else None,
                                     _pack(stages) if stages else None, job_id))
        self._seq.pop(job_id, None)  # no event follows the terminal one

    # -- commits ---------------------------------------------------------------
    def _take(self) -> bool:
        """Queue the buffered writes for the next transaction; whether anything is queued."""
        if self._batch:
            self._queue.append(self._batch)
            self._batch = _Batch()
        return bool(self._queue)

    def _apply_queued(self) -> None:
        """With the lock held: one transaction for every queued batch, oldest first."""
        if not self._queue:
            return
        db = self._db
        # isolation_level=None is autocommit: without an explicit BEGIN every statement,
        # and every row of an executemany, is a transaction of its own (locks + WAL frames).
        n = len(self._queue)  # the loop thread may append meanwhile; those wait for the next one
        db.execute("BEGIN")
        try:
            for i in range(n):
                self._queue[i].apply(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")  # the batches stay queued: the next commit tries them again
            raise
        for _ in range(n):
            self._queue.popleft()

    def commit(self) -> None:
        """Make every write so far durable, now, on this thread."""
        if self._take():
            self._commit_queued()

    def commit_soon(self) -> concurrent.futures.Future:
        """Make every write so far durable on the writer thread; the future is done when it is
        (or holds the error). Commits apply in the order they were asked for."""
        if not self._take():
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)
            return done
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jobstore")
        return self._writer.submit(self._commit_queued)

    def _commit_queued(self) -> None:
        with self._lock:
            self._apply_queued()

    # -- reads -------------------------------------------------------------------
    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a query that sees every write so far (they are committed first)."""
        self._take()
        with self._lock:
            self._apply_queued()
            return self._db.execute(sql, args).fetchall()

    def job(self, job_id: str) -> dict | None:
        rows = self._read("SELECT id, workflow, state, params, created, finished, reason, result, stages, owner "
                          "FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        row = rows[0]
        return {
            "id": row[0], "workflow": row[1], "state": row[2], "params": _unpack(row[3]),
            "created": row[4], "finished": row[5], "reason": row[6],
            "result": _unpack(row[7]) if row[7] else None,
            "stages": _unpack(row[8]) if row[8] else {},
            "owner": row[9],
        }

    def events(self, job_id: str, after: int = -1) -> list[dict]:
        """The job's events numbered above ``after``, in order."""
        legacy = self._read("SELECT seq, ts, type, data FROM events WHERE job = ? AND seq > ? ORDER BY seq",
                            (job_id, after))
        out = [{"seq": s, "ts": ts, "type": t, "data": _unpack(d)} for s, ts, t, d in legacy]
        # Runs come after any legacy rows: add_event numbers on from the highest of both tables.
        for first, blob in self._read("SELECT seq, events FROM event_runs WHERE job = ? AND last > ? "
                                      "ORDER BY seq", (job_id, after)):
            out.extend({"seq": first + i, "ts": ts, "type": t, "data": d}
                       for i, (ts, t, d) in enumerate(_unpack(blob)) if first + i > after)
        return out

    def unfinished(self) -> list[tuple[str, str, dict, dict | None, float]]:
        """Jobs accepted but not ended (the broker stopped under them), oldest first."""
        rows = self._read("SELECT id, workflow, params, payload, created FROM jobs WHERE state NOT IN (?, ?, ?) "
                          "ORDER BY created", TERMINAL)
        return [(i, w, _unpack(p), msgpack.unpackb(b) if b else None, c) for i, w, p, b, c in rows]

    def unfinished_owners(self) -> dict[str, str]:
        """The API key (id) of each unfinished job that has one."""
        return dict(self._read("SELECT id, owner FROM jobs WHERE state NOT IN (?, ?, ?) AND owner IS NOT NULL",
                               TERMINAL))

    def counts(self) -> dict[str, int]:
        return dict(self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    def recent(self, limit: int = 20, owner: str | None = None) -> list[dict]:
        """The newest jobs, of ``owner`` only if given."""
        where, args = ("WHERE owner = ? ", (owner, limit)) if owner is not None else ("", (limit,))
        rows = self._read("SELECT id, workflow, state, created, finished, reason, owner FROM jobs "
                          f"{where}ORDER BY created DESC LIMIT ?", args)
        return [dict(zip(("id", "workflow", "state", "created", "finished", "reason", "owner"), r)) for r in rows]
