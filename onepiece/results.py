"""Where job results live: one small interface the result stage writes through and the broker
serves from, so a video made on one host is served by a broker on another without a shared
filesystem.

Two stores:

* :class:`LocalStore`: a directory (the default, ``<data_dir>/results``): the embedded
  single-host case, or a directory every host mounts.
* :class:`S3Store`: S3-compatible object storage (``--results s3://bucket/prefix``; endpoint,
  region and credentials from settings, or boto3's own environment). The worker PUTs the
  result straight into the bucket; the broker answers ``GET /v1/jobs/{id}/result`` with a
  redirect to a short-lived presigned URL.

Invariants:

R1 A result is never seen half-written: a local one is written to a temporary name and renamed
   into place; an S3 object exists only once its single PUT has completed.
R2 A result's key is ``<job id>.<ext>`` and nothing else. The broker locates only the key of
   the job it is asked about, inside its own store (local: the real file, symlinks followed,
   directly under the directory; S3: under the prefix). A worker reports a key, never a path,
   and a worker may lie: anything else is refused.
R3 No I/O at import; boto3 is imported only when an S3 store is opened (``onepiece[s3]``).
"""

from __future__ import annotations

import abc
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_EXT = re.compile(r"[a-z0-9]{1,8}")


class StoreError(RuntimeError):
    """The result store cannot be opened or written (a bad URL, no boto3, the server refused)."""


def result_key(job: str, ext: str) -> str:
    """The key of ``job``'s result (R2)."""
    if not _EXT.fullmatch(ext):
        raise ValueError(f"a result's extension is 1-8 lower-case letters or digits, not {ext!r}")
    return f"{job}.{ext}"


def is_key_of(job: str, key: object) -> bool:
    """Whether ``key`` is a key of ``job``'s result, and nothing else (no directory, no ``..``)."""
    if not isinstance(key, str) or not key.startswith(f"{job}."):
        return False
    return _EXT.fullmatch(key[len(job) + 1:]) is not None


@dataclass(frozen=True)
class Located:
    """Where the broker finds a result: a local file to send, or a URL to redirect to."""

    path: Path | None = None
    url: str | None = None


class ResultStore(abc.ABC):
    """Results by job: written once by the result stage, read by the broker."""

    @abc.abstractmethod
    def put(self, job: str, ext: str, data: bytes, content_type: str) -> dict[str, Any]:
        """Store ``data`` as ``job``'s result, whole or not at all (R1); returns what the stage
        reports: at least ``key``."""

    @abc.abstractmethod
    def locate(self, job: str, key: object) -> Located | None:
        """Where ``job``'s result under ``key`` is, or None if it is not there or ``key`` is not
        one of ``job``'s (R2)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """For logs: where the results go."""


class LocalStore(ResultStore):
    """Results as files in one directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def put(self, job: str, ext: str, data: bytes, content_type: str) -> dict[str, Any]:
        key = result_key(job, ext)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / key
        tmp = self.root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)  # R1: a reader never sees half a file
        finally:
            tmp.unlink(missing_ok=True)
        return {"key": key, "path": str(path.resolve())}

    def locate(self, job: str, key: object) -> Located | None:
        root = self.root.resolve()
        if not isinstance(key, str) or not key:
            return None
        try:
            real = (root / key).resolve(strict=True)  # an absolute ``key`` stays absolute
        except (OSError, RuntimeError):  # missing, a symlink loop
            return None
        if real.parent != root or not is_key_of(job, real.name) or not real.is_file():
            log.warning("job %s: its result %r is not a file of this job in the result store %s: refused",
                        job, key[:200], root)
            return None
        return Located(path=real)

    def describe(self) -> str:
        return f"directory {self.root}"


class S3Store(ResultStore):
    """Results as objects ``<prefix>/<key>`` in one bucket of an S3-compatible server."""

    def __init__(self, bucket: str, prefix: str, client, presign_s: float = 300.0):
        self.bucket, self.prefix, self.client, self.presign_s = bucket, prefix.strip("/"), client, presign_s

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, job: str, ext: str, data: bytes, content_type: str) -> dict[str, Any]:
        key = result_key(job, ext)
        try:  # one PUT: the object exists whole or not at all (R1)
            self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data, ContentType=content_type)
        except Exception as exc:  # botocore's errors: the network, credentials, a missing bucket
            raise StoreError(f"cannot store the result of {job} in s3://{self.bucket}/{self._name(key)}: "
                             f"{exc}") from exc
        return {"key": key, "url": f"s3://{self.bucket}/{self._name(key)}"}

    def locate(self, job: str, key: object) -> Located | None:
        if not is_key_of(job, key):
            if key:
                log.warning("job %s: its result key %.200r is not one of this job's: refused", job, key)
            return None
        name = self._name(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=name)
        except Exception as exc:  # noqa: BLE001 - missing, or the server is unreachable: no result to serve
            log.warning("job %s: its result s3://%s/%s is not there: %s", job, self.bucket, name, exc)
            return None
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": name},
                                                 ExpiresIn=max(1, int(self.presign_s)))
        return Located(url=url)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def open_store(settings) -> ResultStore:
    """The store ``settings.results`` names: empty for ``settings.results_dir``, a directory,
    or ``s3://bucket/prefix``."""
    spec = (settings.results or "").strip()
    if not spec:
        return LocalStore(settings.results_dir)
    if not spec.startswith("s3://"):
        return LocalStore(Path(spec.removeprefix("file://")))
    url = urlparse(spec)
    if not url.netloc:
        raise StoreError(f"results {spec!r}: name a bucket, as s3://bucket/prefix")
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StoreError("results in S3 need boto3: pip install 'onepiece[s3]'") from exc
    options: dict[str, Any] = {"region_name": settings.s3_region,
                               "config": Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3},
                                                signature_version="s3v4")}
    if settings.s3_endpoint:
        options["endpoint_url"] = settings.s3_endpoint
    if settings.s3_access_key_id:
        options["aws_access_key_id"] = settings.s3_access_key_id
        options["aws_secret_access_key"] = settings.s3_secret_access_key
    client = boto3.client("s3", **options)
    return S3Store(url.netloc, url.path, client, presign_s=settings.s3_presign_s)
