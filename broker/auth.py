"""API keys of the REST API: who may do what. Pure but for reading and writing the keys file.

A key is a bearer token ``op_<id>_<secret>``: ``id`` (8 hex digits) names it in
logs, in a job's ``owner`` and in ``onepiece keys list``; ``secret`` is 32
random bytes. The keys file (JSON, mode 0600) keeps, per key, its id, a name,
its scopes and the SHA-256 of the whole token, never the token: a stolen file
lets nobody in. The tokens have 256 bits of entropy, so a fast hash is enough
(a slow one protects guessable passwords). ``onepiece keys create`` prints a
new token once.

Scopes (one declaration, :data:`SCOPES`; the routes that need each are
:data:`ACCESS` in ``broker/api.py``):

* ``submit``: create jobs; read, stream and cancel the jobs it created, and no
  other (another key's job is "no job with id ...", as one that does not exist);
* ``read``: read every job, stream its events, fetch its result; the stages,
  the workflows and the metrics;
* ``admin``: everything, including draining workers, the node manager's
  signals and cancelling any job.

Invariants (tests/broker/test_auth.py):

1. A token authenticates only if its id is in the file and the SHA-256 of the
   whole token equals the stored one, compared in constant time
   (``hmac.compare_digest``); any other string, of any length or alphabet,
   is refused the same way.
2. ``allows(key, scopes)`` is true iff the key has one of ``scopes`` or
   ``admin``.
3. The file is re-read when it changes (checked at most once a second), so a
   revoked key stops working without a restart; a file that cannot be read
   or parsed keeps the last good keys and logs why, once per change.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("onepiece.auth")

__all__ = ["ACCESS", "OPEN", "SCOPES", "ApiKey", "KeysError", "KeyRing", "add_key", "allows", "exposure_error",
           "init_keys", "is_loopback", "list_keys", "read_token", "revoke_key"]

SCOPES = ("submit", "read", "admin")
# routes anyone may call (a load balancer's probes, the API's own description)
OPEN = frozenset({("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/v1/openapi.json")})
# (method, route) -> the scopes of which a key needs one (admin has them all). "submit" on a job's
# routes means its own jobs only (broker/api.py checks the owner)
ACCESS: dict[tuple[str, str], tuple[str, ...]] = {
    ("POST", "/v1/jobs"): ("submit",),
    ("GET", "/v1/jobs"): ("submit", "read"),
    ("GET", "/v1/jobs/{id}"): ("submit", "read"),
    ("GET", "/v1/jobs/{id}/events"): ("submit", "read"),
    ("GET", "/v1/jobs/{id}/result"): ("submit", "read"),
    ("DELETE", "/v1/jobs/{id}"): ("submit",),
    ("GET", "/v1/workflows"): ("submit", "read"),
    ("GET", "/v1/workflows/{name}"): ("submit", "read"),
    ("GET", "/v1/stages"): ("read",),
    ("GET", "/metrics"): ("read",),
    ("GET", "/v1/signals"): ("admin",),
    ("POST", "/v1/workers/{id}/drain"): ("admin",),
    ("POST", "/v1/workers/{id}/lost"): ("admin",),
}
_TOKEN = re.compile(r"op_([0-9a-f]{8})_[A-Za-z0-9_-]{43}")
RELOAD_S = 1.0


class KeysError(ValueError):
    """A keys file or an argument about keys that cannot be used (the message says why)."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: frozenset[str]


def allows(key: ApiKey, scopes: Iterable[str]) -> bool:
    """Whether ``key`` has one of ``scopes`` (``admin`` has them all)."""
    return "admin" in key.scopes or bool(key.scopes & set(scopes))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    scopes = sorted(set(scopes))
    bad = [s for s in scopes if s not in SCOPES]
    if not scopes or bad:
        raise KeysError(f"scopes must be some of {', '.join(SCOPES)}, not {', '.join(bad) or 'none'}")
    return scopes


def _read(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeysError(f"{path}: cannot read the keys file: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeysError(f"{path}: a keys file is {{\"keys\": [...]}}")
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and isinstance(e.get("id"), str) and re.fullmatch(r"[0-9a-f]{8}", e["id"])
                and isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])
                and isinstance(e.get("scopes"), list)):
            raise KeysError(f"{path}: key {i} needs an id (8 hex digits), sha256 (64 hex digits) and scopes")
        _check_scopes(e["scopes"])
    return entries


def _write(path: Path, entries: list[dict]) -> None:
    """Atomically, mode 0600 from the start (the hashes are not secrets, the names may be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"keys": entries}, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def add_key(path: str | os.PathLike, scopes: Iterable[str], name: str = "") -> tuple[str, str]:
    """A new key with ``scopes`` in the keys file at ``path`` (created if missing).
    Returns ``(id, token)``; the token is not kept anywhere: show it once."""
    path = Path(path)
    scopes = _check_scopes(scopes)
    entries = _read(path)
    taken = {e["id"] for e in entries}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    token = f"op_{key_id}_{secrets.token_urlsafe(32)}"
    entries.append({"id": key_id, "name": str(name)[:200], "scopes": scopes, "sha256": _digest(token),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _write(path, entries)
    return key_id, token


def init_keys(path: str | os.PathLike, token_file: str | os.PathLike) -> str | None:
    """First start of a deployment (compose, the Dockerfiles): if the keys file ``path`` does not
    exist, create it with one admin key and write that key to ``token_file`` (mode 0600, for the
    operator and the node manager to read). Returns the new key's id, or None if keys existed."""
    path, token_file = Path(path), Path(token_file)
    if path.exists():
        return None
    key_id, token = add_key(path, ["admin"], "created at first start")
    token_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = token_file.with_name(f".{token_file.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    os.replace(tmp, token_file)
    log.warning("no API keys at %s: created admin key %s; the key is in %s (mode 0600)", path, key_id, token_file)
    return key_id


def read_token(token_file: str | os.PathLike, timeout: float = 0.0) -> str:
    """The key in ``token_file`` (its first line), waiting up to ``timeout`` s for the file to
    appear (a node manager starting beside a broker that writes it at first start)."""
    token_file = Path(token_file)
    deadline = time.monotonic() + timeout
    while True:
        try:
            token = token_file.read_text(encoding="utf-8").strip().splitlines()
        except FileNotFoundError:
            token = None
        except OSError as exc:
            raise KeysError(f"{token_file}: cannot read the API key: {exc.strerror or exc}") from None
        if token:
            return token[0].strip()
        if time.monotonic() >= deadline:
            raise KeysError(f"{token_file}: no API key there" + (f" after {timeout:.0f} s" if timeout else ""))
        time.sleep(0.5)


def revoke_key(path: str | os.PathLike, key_id: str) -> bool:
    """Remove the key ``key_id``; False if there was none."""
    path = Path(path)
    entries = _read(path)
    kept = [e for e in entries if e["id"] != key_id]
    if len(kept) == len(entries):
        return False
    _write(path, kept)
    return True


def list_keys(path: str | os.PathLike) -> list[dict]:
    """The keys of the file, without their hashes."""
    return [{k: v for k, v in e.items() if k != "sha256"} for e in _read(Path(path))]


class KeyRing:
    """The keys of one file, re-read when it changes (invariant 3)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._keys: dict[str, tuple[ApiKey, str]] = {}
        self._stamp: tuple | None = None
        self._checked = -1e18
        self._load(force=True)

    def __len__(self) -> int:
        self._maybe_reload()
        return len(self._keys)

    def _load(self, force: bool = False) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if not force and stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            entries = _read(self.path)
        except KeysError as exc:
            if force:
                raise
            log.error("%s; keeping the %d key(s) read before", exc, len(self._keys))
            return
        self._keys = {e["id"]: (ApiKey(e["id"], str(e.get("name", "")), frozenset(e["scopes"])), e["sha256"])
                      for e in entries}
        log.info("API keys: %d in %s", len(self._keys), self.path)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked >= RELOAD_S:
            self._checked = now
            self._load()

    def authenticate(self, token: str) -> ApiKey | None:
        """The key ``token`` is, or None (invariant 1)."""
        self._maybe_reload()
        m = _TOKEN.fullmatch(token)
        entry = self._keys.get(m.group(1)) if m else None
        # the comparison runs whether or not the id matched, against a digest of the same length
        stored = entry[1] if entry else "0" * 64
        ok = hmac.compare_digest(_digest(token), stored)
        return entry[0] if (entry and ok) else None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine only."""
    import ipaddress

    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


REST_HOW = ("Create a key with `onepiece keys create --scope admin --file KEYS.json` and start with --api-keys "
            "KEYS.json (clients take the key from --api-key or ONEPIECE_API_KEY)")
REST_RISK = "anyone who can reach it could submit, read and cancel every job and drain the workers"


def exposure_error(what: str, host: str, keys: bool, insecure: bool, how: str = REST_HOW,
                   risk: str = REST_RISK) -> str | None:
    """Why serving ``what`` on ``host`` is refused (None if it is not): beyond loopback, only
    with keys, or with ``--insecure`` said out loud."""
    if keys or insecure or is_loopback(host):
        return None
    return (f"refusing to serve {what} on {host} without keys: {risk}. {how}, or bind to 127.0.0.1, or pass "
            "--insecure to serve it open anyway")

