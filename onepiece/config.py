"""One typed configuration object for every OnePiece process.

Defaults run on a laptop. Values come, later ones winning, from the
dataclass defaults, a TOML file (``--config`` or ``ONEPIECE_CONFIG``),
environment variables ``ONEPIECE_<FIELD>`` (e.g. ``ONEPIECE_REST_PORT=9000``)
and command-line flags. Components receive the values they need, never a
global.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from broker.limits import Limits


@dataclass
class Settings:
    # broker
    control: str = "tcp://127.0.0.1:5555"  # ROUTER endpoint (workers connect here)
    rest_host: str = "127.0.0.1"
    rest_port: int = 8000
    data_dir: Path = Path(".onepiece")  # SQLite job store and results
    heartbeat_s: float = 2.5  # Majordomo's defaults: 2.5 s x 3
    liveness: int = 3
    max_attempts: int = 3
    # deadlines (broker/core.py, invariant 7): a bound task silent past
    # clamp(progress_factor x its stage's longest recent service time, floor, cap)
    # is lost and re-run; a job not ended job_deadline_s after submission fails
    progress_floor_s: float = 30.0
    progress_cap_s: float = 900.0
    progress_factor: float = 4.0
    job_deadline_s: float = 3600.0
    max_request_bytes: int = 16 << 20
    # REST API keys (broker/auth.py): the keys file; None = no keys, allowed on loopback only
    api_keys: Path | None = None
    # first start: if the api_keys file does not exist, make one admin key and write it here (0600)
    api_keys_init: Path | None = None
    insecure: bool = False  # serve a non-loopback address without keys (logs a warning every minute)
    # CURVE on the control plane (broker/curve.py): this process's secret certificate; the broker's
    # allow-list of peers' public certificates; a peer's copy of the broker's public certificate
    curve_secret: Path | None = None
    curve_allow: Path | None = None
    curve_broker: Path | None = None
    curve_init: Path | None = None  # the broker makes its pair, the workers' pair and the allow-list here once
    # overload (broker/limits.py): past these, 429 or 503 with Retry-After, never a lost job
    submit_rate: float = Limits.rate  # jobs/s per API key (token bucket) ...
    submit_burst: int = Limits.burst  # ... this deep
    max_active_per_key: int = Limits.max_active_per_key  # unfinished jobs of one key
    max_active_jobs: int = Limits.max_active  # unfinished jobs in all (REST and control-socket SUBMIT)
    max_streams_per_key: int = Limits.max_streams_per_key  # open event streams of one key
    commit_interval_s: float = 0.02  # group commit of the job store; SUBMIT replies wait for it
    # the result store (onepiece/results.py), for the broker and the result stage's workers alike:
    # "" = <data_dir>/results; a directory; or s3://bucket/prefix (S3-compatible object storage)
    results: str = ""
    s3_endpoint: str | None = None  # e.g. http://minio:9000; None: AWS
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None  # None: boto3's own (AWS_ACCESS_KEY_ID, a profile, a role)
    s3_secret_access_key: str | None = None  # give it by environment (ONEPIECE_S3_SECRET_ACCESS_KEY), not argv
    s3_presign_s: float = 300.0  # how long the URL a result request is redirected to stays valid
    # workers
    transport: str = "shm"  # shm | tcp | rdma | auto
    data_host: str = "127.0.0.1"  # where a worker's data-plane endpoint listens
    advertise_host: str | None = None
    model: str = "tiny"  # "tiny" or a local diffusers directory
    device: str | None = None  # default: cuda when present
    dtype: str | None = None
    capacity: int = 1
    # a denoise worker's sequence-parallel ranks (1, 2, 4 or 8): with k > 1 it spans k processes
    # (stages/wan/group.py); workers of other stages ignore it
    sp: int = 1
    ring_bytes: int = 32 << 20
    # messages of 8 MiB and more land in regions the consumer grants (transports/grants.py):
    # their bound, per worker, all inbound connections together; 0: they stream through the ring
    grant_bytes: int = 512 << 20
    rdma_device: str | None = None  # default: the first device with an ACTIVE port
    rdma_port: int = 1
    rdma_gid_index: int | None = None  # default: a RoCEv2 IPv4-mapped GID, else 0
    # worker bounds (stages/worker.py lists every wait and its bound)
    orphan_bytes: int = 64 << 20  # data-plane bytes kept for tasks not (yet) assigned; oldest dropped past it
    orphan_ttl_s: float = 300.0  # the longest such inputs wait for their TASK
    send_timeout_s: float = 60.0  # one attempt to send a task's outputs to its consumer
    connect_timeout_s: float = 30.0  # opening the data-plane endpoint, or a connection to a peer
    load_timeout_s: float = 1800.0  # loading the stage's model; past it the worker exits with 1
    task_timeout_s: float = 3600.0  # one run of a stage; past it the task is FAILED (retryable)
    # step-wise stages (denoise) leave their state with the holder of an input every
    # checkpoint_steps steps or checkpoint_s seconds, whichever comes first (0: not by that
    # measure), so a job whose worker dies resumes there (broker/core.py, invariant 11)
    checkpoint_steps: int = 10
    checkpoint_s: float = 60.0
    checkpoint_bytes: int = 512 << 20  # checkpoints of other workers' tasks kept here, at most
    workflows: list[str] = field(default_factory=lambda: ["wan_i2v"])

    def __post_init__(self) -> None:
        if self.curve_broker is not None and self.curve_secret is None:
            raise ValueError("curve_broker needs curve_secret: this peer's own certificate (.key_secret)")
        if self.sp not in (1, 2, 4, 8):
            raise ValueError(f"sp: {self.sp}; must be 1, 2, 4 or 8")

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "jobs.sqlite3"

    @property
    def results_dir(self) -> Path:
        return Path(self.data_dir) / "results"

    @property
    def rest_url(self) -> str:
        return f"http://{self.rest_host}:{self.rest_port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(f: dataclasses.Field, raw: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if isinstance(raw, str):
        if kind.startswith("bool"):
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected true or false, not {raw!r}")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("Path"):
            return Path(raw)
        if kind.startswith("list"):
            return [s.strip() for s in raw.split(",") if s.strip()]
    if kind.startswith("Path") and raw is not None:
        return Path(raw)
    return raw


def load_settings(path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Defaults, then the TOML file, then ``ONEPIECE_*`` variables, then ``overrides`` (None = unset)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(Settings)}
    path = path or env.get("ONEPIECE_CONFIG")
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
        values.update({k: _coerce(known[k], v) for k, v in data.items()})
    for name, f in known.items():
        raw = env.get(f"ONEPIECE_{name.upper()}")
        if raw is not None:
            try:
                values[name] = _coerce(f, raw)
            except ValueError as exc:
                raise ValueError(f"ONEPIECE_{name.upper()}={raw!r}: {exc}") from None
    values.update({k: _coerce(known[k], v) for k, v in overrides.items() if v is not None})
    return Settings(**values)
