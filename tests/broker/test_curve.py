"""CURVE on the control plane (broker/curve.py), with real ZeroMQ sockets on loopback: a peer
without an allowed key gets nothing and changes nothing; an allowed one works as before; a key
added to the allow-list is let in without a restart; real worker processes with their keys run
a job end to end."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import stat

import pytest
import zmq
import zmq.asyncio

from broker import curve
from broker.service import Broker
from manager.launcher import LocalLauncher
from onepiece.config import load_settings

from .test_hostile import Peer, msg

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def keys(tmp_path, monkeypatch):
    monkeypatch.setattr(curve, "RELOAD_S", 0.1)
    d = tmp_path / "keys"
    paths = curve.init_dir(d)  # broker pair, workers pair, allow/workers.key
    curve.make_keypair(d, "stranger")  # a valid pair nobody allowed
    return d, paths


@contextlib.asynccontextmanager
async def curved_broker(tmp_path, paths, **kw):
    settings = load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*",
                             workflows=["synthetic3"], heartbeat_s=30.0, curve_secret=paths["broker_secret"],
                             curve_allow=paths["allow"], **kw)
    broker = Broker(settings)
    await broker.start()
    ctx = zmq.asyncio.Context()
    peers: list[Peer] = []
    try:
        yield broker, ctx, peers
    finally:
        for p in peers:
            p.close()
        ctx.term()
        await broker.stop()


def peer(ctx, broker, peers, ident: bytes, secret=None, server=None) -> Peer:
    p = Peer.__new__(Peer)
    p.sock = ctx.socket(zmq.DEALER)
    p.sock.setsockopt(zmq.LINGER, 0)
    p.sock.setsockopt(zmq.ROUTING_ID, ident)
    if secret is not None:
        curve.secure_client(p.sock, secret, server)
    p.sock.connect(broker.endpoint)
    p.got = []
    peers.append(p)
    return p


async def offer(p: Peer, body: dict) -> None:
    """Send if ZeroMQ takes it within a second: a DEALER whose handshake was refused has no pipe to
    queue on, and its send waits (that wait is the refusal, seen from the stranger's side)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(p.send(body), 1.0)


async def register(p: Peer, timeout: float = 5.0) -> dict:
    await offer(p, msg("REGISTER", stage="a", capacity=2, descriptor={"transport": "tcp", "id": "x"}, info={}))
    return await p.expect("REGISTERED", timeout=timeout)


def test_a_key_pair_is_two_files_and_the_secret_is_private(keys):
    d, paths = keys
    assert stat.S_IMODE(paths["broker_secret"].stat().st_mode) == 0o600
    public, secret = curve.secret_pair(paths["broker_secret"])
    assert curve.public_key(paths["broker_public"]) == public and len(secret) == 40
    with pytest.raises(curve.CurveError, match="holds no secret key"):
        curve.secret_pair(paths["broker_public"])
    with pytest.raises(curve.CurveError, match="not a readable"):
        curve.public_key(d / "missing.key")
    again = curve.init_dir(d)  # a later start keeps the keys
    assert curve.secret_pair(again["broker_secret"]) == (public, secret)


async def test_a_peer_without_an_allowed_key_gets_nothing_and_changes_nothing(tmp_path, keys):
    d, paths = keys
    async with curved_broker(tmp_path, paths) as (broker, ctx, peers):
        plain = peer(ctx, broker, peers, b"plain")  # no CURVE at all
        stranger = peer(ctx, broker, peers, b"stranger", d / "stranger.key_secret", paths["broker_public"])
        wrong_server = peer(ctx, broker, peers, b"wrong", paths["worker_secret"], d / "stranger.key")
        for p in (plain, stranger, wrong_server):
            with pytest.raises(TimeoutError):
                await register(p, timeout=1.5)
            await offer(p, msg("SUBMIT", workflow="synthetic3", params={}))
            await offer(p, msg("HEARTBEAT"))
        await asyncio.sleep(0.5)
        assert broker.stages()["a"]["workers"] == [] and broker.store.counts() == {}
        assert all(p.got == [] for p in (plain, stranger, wrong_server))
        # the allowed key: as before
        ok = peer(ctx, broker, peers, b"ok", paths["worker_secret"], paths["broker_public"])
        assert (await register(ok))["k"] == "REGISTERED"
        assert [w["id"] for w in broker.stages()["a"]["workers"]] == ["ok"]


async def test_a_key_added_to_the_allow_list_gets_in_without_a_restart(tmp_path, keys):
    d, paths = keys
    async with curved_broker(tmp_path, paths) as (broker, ctx, peers):
        late = peer(ctx, broker, peers, b"late", d / "stranger.key_secret", paths["broker_public"])
        with pytest.raises(TimeoutError):
            await register(late, timeout=1.0)
        shutil.copy(d / "stranger.key", paths["allow"] / "stranger.key")
        await asyncio.sleep(0.5)  # the allow-list is re-read; the DEALER's next reconnect is let in
        fresh = peer(ctx, broker, peers, b"late2", d / "stranger.key_secret", paths["broker_public"])
        assert (await register(fresh, timeout=10))["k"] == "REGISTERED"
        (paths["allow"] / "stranger.key").unlink()
        await asyncio.sleep(0.5)
        gone = peer(ctx, broker, peers, b"late3", d / "stranger.key_secret", paths["broker_public"])
        with pytest.raises(TimeoutError):
            await register(gone, timeout=1.5)


async def test_a_broker_with_a_secret_needs_an_allow_list(tmp_path, keys):
    from broker.errors import CoreError

    _, paths = keys
    settings = load_settings(env={}, data_dir=tmp_path / "data", control="tcp://127.0.0.1:*",
                             workflows=["synthetic3"], curve_secret=paths["broker_secret"])
    with pytest.raises(CoreError, match="--curve-secret needs --curve-allow"):
        await Broker(settings).start()
    with pytest.raises(ValueError, match="curve_broker needs curve_secret"):
        load_settings(env={}, curve_broker=paths["broker_public"])


async def test_workers_with_their_keys_run_a_job_end_to_end(tmp_path, keys):
    _, paths = keys
    async with curved_broker(tmp_path, paths) as (broker, ctx, peers):
        settings = broker.settings.replace(control=broker.endpoint, curve_secret=paths["worker_secret"],
                                           curve_broker=paths["broker_public"], heartbeat_s=0.5)
        launcher = LocalLauncher(settings, env={"ONEPIECE_LOG_LEVEL": "WARNING"})
        try:
            for stage in ("a", "b", "c"):
                await launcher.start("synthetic3", stage)
            for _ in range(600):
                if broker.missing_stages() == []:
                    break
                await asyncio.sleep(0.1)
            assert broker.missing_stages() == []
            job = broker.submit("synthetic3", {})
            for _ in range(600):
                if (broker.job(job) or {}).get("state") in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.1)
            assert broker.job(job)["state"] == "succeeded", broker.job(job)
        finally:
            await launcher.aclose(10)


def test_a_control_socket_beyond_loopback_needs_curve_or_insecure(tmp_path):
    from onepiece.cli import _check_exposure, main

    with pytest.raises(SystemExit, match="refusing to serve the control socket on 0.0.0.0 without keys.*keys curve"):
        main(["broker", "--control", "tcp://0.0.0.0:5555", "--data-dir", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()  # refused before anything started
    base = load_settings(env={}, data_dir=tmp_path / "d", control="tcp://0.0.0.0:5555")
    assert _check_exposure(base.replace(insecure=True)).curve_secret is None
    made = _check_exposure(base.replace(curve_init=tmp_path / "curve"))  # first start: keys are made
    assert made.curve_secret == tmp_path / "curve" / "broker.key_secret"
    assert made.curve_allow == tmp_path / "curve" / "allow"
    assert (made.curve_allow / "workers.key").is_file()
    ipc = load_settings(env={}, data_dir=tmp_path / "d", control=f"ipc://{tmp_path}/ctl")
    assert _check_exposure(ipc).curve_secret is None  # this machine only
