"""CURVE on the control plane: who may talk to the broker's ROUTER at all.

The broker has a key pair (``--curve-secret``, a ZeroMQ certificate file with
its secret key). Every worker, node manager or submitter has one too, and the
broker lets in only peers whose public key is in its allow-list
(``--curve-allow``, a directory of public certificate files, re-read when it
changes). A peer configures its DEALER with its own certificate and the
broker's public one (``--curve-broker``). ZeroMQ's CURVE (CurveZMQ: Curve25519
keys, encrypted and authenticated frames) does the handshake and encryption;
the ZAP handler (``zmq.auth``) checks the allow-list during the handshake, so
a peer without an allowed key never gets a single message to the broker:
it cannot register, heartbeat, SUBMIT or receive anything.

Files are the ``zmq.auth`` certificate format: ``NAME.key`` holds the public
key, ``NAME.key_secret`` both (mode 0600). ``onepiece keys curve NAME --dir D``
makes a pair.

Without ``--curve-secret`` the control socket is plain, as before: allowed on
loopback only, unless ``--insecure`` (see :func:`broker.auth.exposure_error`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

log = logging.getLogger("onepiece.curve")

__all__ = ["Allowlist", "CurveError", "init_dir", "make_keypair", "public_key", "secret_pair", "secure_client",
           "secure_server"]

RELOAD_S = 1.0


class CurveError(ValueError):
    """A certificate that cannot be used (the message says which and why)."""


def make_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """``NAME.key`` (public) and ``NAME.key_secret`` (secret, 0600) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not name or "/" in name or name.startswith("."):
        raise CurveError(f"a key pair's name is a plain file name, not {name!r}")
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def secret_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) keys of a ``.key_secret`` certificate."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveError(f"{path}: not a readable CURVE secret certificate: {exc}") from None
    if secret is None:
        raise CurveError(f"{path}: holds no secret key (use the .key_secret file)")
    return public, secret


def public_key(path: str | os.PathLike) -> bytes:
    """The public key of a certificate (``.key`` or ``.key_secret``)."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CurveError(f"{path}: not a readable CURVE certificate: {exc}") from None
    return public


def secure_client(sock: zmq.Socket, own_secret: str | os.PathLike, broker_public: str | os.PathLike) -> None:
    """Make a DEALER speak CURVE to the broker (before it connects)."""
    public, secret = secret_pair(own_secret)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = public_key(broker_public)


class Allowlist:
    """The ZAP handler of one context: CURVE peers whose public key is a certificate in
    ``directory``, re-read within ``RELOAD_S`` of a change (a key added or removed)."""

    def __init__(self, ctx: zmq.Context, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CurveError(f"{self.directory}: the CURVE allow-list must be a directory of public certificates")
        self._auth = AsyncioAuthenticator(ctx, log=logging.getLogger("onepiece.curve.zap"))
        self._stamp: tuple | None = None
        self._task: asyncio.Task | None = None

    def _snapshot(self) -> tuple:
        try:
            return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                                for e in os.scandir(self.directory) if e.name.endswith(".key")))
        except OSError:
            return ()

    def _load(self) -> None:
        stamp = self._snapshot()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._auth.configure_curve(domain="*", location=str(self.directory))
        log.info("CURVE allow-list: %d key(s) in %s", len(stamp), self.directory)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_S)
            try:
                self._load()
            except Exception:  # noqa: BLE001 - a bad file must not end the watch
                log.exception("CURVE allow-list %s: could not reload", self.directory)

    def start(self) -> None:
        self._auth.start()
        self._load()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="curve-allowlist")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._auth.stop()


def secure_server(sock: zmq.Socket, own_secret: str | os.PathLike) -> None:
    """Make the broker's ROUTER a CURVE server (before it binds; the Allowlist decides who gets in)."""
    public, secret = secret_pair(own_secret)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def init_dir(directory: str | os.PathLike) -> dict[str, Path]:
    """First start of a deployment (compose): in ``directory``, a broker key pair, a key pair the
    workers share, and an allow-list (``allow/``) holding the workers' public key; made once,
    kept after. Returns the paths: ``broker_secret``, ``broker_public``, ``allow``,
    ``worker_secret``."""
    d = Path(directory)
    paths = {"broker_secret": d / "broker.key_secret", "broker_public": d / "broker.key", "allow": d / "allow",
             "worker_secret": d / "workers.key_secret"}
    if not paths["broker_secret"].exists():
        make_keypair(d, "broker")
        log.warning("no CURVE keys in %s: made the broker's pair", d)
    if not paths["worker_secret"].exists():
        public, _ = make_keypair(d, "workers")
        paths["allow"].mkdir(parents=True, exist_ok=True)
        (paths["allow"] / "workers.key").write_bytes(public.read_bytes())
        log.warning("made the workers' CURVE pair in %s and allowed its public key", d)
    paths["allow"].mkdir(parents=True, exist_ok=True)
    return paths

