"""REST API keys (broker/auth.py) and results confined to their store, against a real Broker
and a real aiohttp server on loopback; each attack of issue 13 on the REST side, refused."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker import auth
from broker.api import make_app, start_api
from broker.errors import CoreError
from broker.service import Broker
from onepiece.cli import main as cli_main
from onepiece.config import Settings

from .test_api import LIMIT, SHIPPED, valid

# -- the keys file, pure ------------------------------------------------------------------------


def test_a_created_key_authenticates_and_the_file_holds_only_its_hash(tmp_path):
    path = tmp_path / "keys.json"
    key_id, token = auth.add_key(path, ["submit"], "alice")
    assert token.startswith(f"op_{key_id}_") and token not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = auth.KeyRing(path)
    key = ring.authenticate(token)
    assert key == auth.ApiKey(key_id, "alice", frozenset({"submit"}))
    assert auth.list_keys(path) == [{"id": key_id, "name": "alice", "scopes": ["submit"],
                                     "created": auth.list_keys(path)[0]["created"]}]


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # one character of the secret
    lambda t: t.replace("op_", "op_0", 1)[:len(t)],  # another id
    lambda t: t + "x",
    lambda t: "",
    lambda t: "op_",
    lambda t: "Bearer " + t,
    lambda t: t.upper(),
    lambda t: "\udcff" * 60,
    lambda t: "x" * 100_000,
])
def test_anything_but_the_token_is_refused(tmp_path, mangle):
    path = tmp_path / "keys.json"
    _, token = auth.add_key(path, ["admin"])
    assert auth.KeyRing(path).authenticate(mangle(token)) is None


def test_scopes_and_admin():
    submit = auth.ApiKey("00000001", "", frozenset({"submit"}))
    admin = auth.ApiKey("00000002", "", frozenset({"admin"}))
    assert auth.allows(submit, ("submit", "read")) and not auth.allows(submit, ("read",))
    assert all(auth.allows(admin, (s,)) for s in auth.SCOPES)
    with pytest.raises(auth.KeysError, match="scopes must be some of"):
        auth.add_key("/nonexistent/never-written.json", ["root"])


def test_a_revoked_key_stops_working_without_a_restart_and_a_broken_file_keeps_the_last_keys(tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_S", 0.0)
    path = tmp_path / "keys.json"
    alice, alice_token = auth.add_key(path, ["submit"])
    _, bob_token = auth.add_key(path, ["read"])
    ring = auth.KeyRing(path)
    assert ring.authenticate(alice_token) and ring.authenticate(bob_token)
    assert auth.revoke_key(path, alice) and not auth.revoke_key(path, alice)
    assert ring.authenticate(alice_token) is None and ring.authenticate(bob_token)
    path.write_text("{not json")
    assert ring.authenticate(bob_token) is not None  # the last good keys stay
    path.write_text(json.dumps({"keys": [{"id": "zz", "sha256": "0", "scopes": []}]}))
    assert ring.authenticate(bob_token) is not None
    with pytest.raises(auth.KeysError, match="id"):
        auth.KeyRing(path)  # a broker does not start on a broken file


def test_serving_beyond_loopback_needs_keys_or_insecure():
    assert auth.exposure_error("x", "127.0.0.1", False, False) is None
    assert auth.exposure_error("x", "::1", False, False) is None
    assert auth.exposure_error("x", "localhost", False, False) is None
    why = auth.exposure_error("the REST API", "0.0.0.0", False, False)
    assert "onepiece keys create" in why and "--insecure" in why
    assert auth.exposure_error("x", "0.0.0.0", True, False) is None
    assert auth.exposure_error("x", "10.1.2.3", False, True) is None


def test_the_cli_refuses_a_non_loopback_broker_without_keys_before_it_starts(tmp_path, capsys):
    with pytest.raises(SystemExit, match="refusing to serve the REST API on 0.0.0.0 without keys"):
        cli_main(["broker", "--rest-host", "0.0.0.0", "--data-dir", str(tmp_path / "d")])
    assert not (tmp_path / "d").exists()  # nothing was started, not even the store


async def test_start_api_refuses_before_binding(tmp_path):
    broker = Broker(Settings(control="tcp://127.0.0.1:*", data_dir=tmp_path, workflows=["synthetic3"]))
    await broker.start()
    try:
        with pytest.raises(CoreError, match="without keys"):
            await start_api(broker, "0.0.0.0", 0)
    finally:
        await broker.stop()


# -- the REST API with keys -----------------------------------------------------------------------


@pytest.fixture
async def keyed(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_S", 0.0)
    path = tmp_path / "keys.json"
    tokens = {name: auth.add_key(path, scopes, name)[1]
              for name, scopes in (("alice", ["submit"]), ("bob", ["submit"]), ("reader", ["read"]),
                                   ("ops", ["admin"]))}
    settings = Settings(control="tcp://127.0.0.1:*", data_dir=tmp_path / "data", workflows=SHIPPED,
                        max_request_bytes=LIMIT, api_keys=path)
    broker = Broker(settings)
    await broker.start()
    try:
        async with TestClient(TestServer(make_app(broker, heartbeat_s=0.05))) as client:
            yield client, broker, tokens, path
    finally:
        await broker.stop()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def submit(client, token) -> str:
    resp = await client.post("/v1/jobs", json=valid(), headers=bearer(token))
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


async def test_no_key_or_a_bad_key_is_401_and_the_probes_stay_open(keyed):
    client, broker, tokens, _ = keyed
    for method, path in [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/stages"), ("GET", "/metrics"),
                         ("POST", "/v1/workers/w1/drain"), ("GET", "/v1/signals"), ("GET", "/v1/workflows")]:
        for headers in ({}, bearer("op_00000000_" + "A" * 43), {"Authorization": "Basic abc"}):
            resp = await client.request(method, path, headers=headers, json=valid() if method == "POST" else None)
            assert resp.status == 401, (method, path, headers, await resp.text())
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["field"] == "Authorization"
    for path in ("/healthz", "/readyz", "/v1/openapi.json"):
        assert (await client.get(path)).status in (200, 503), path
    assert broker.store.counts() == {}  # nothing got in


async def test_a_submit_key_sees_and_cancels_only_its_own_jobs(keyed):
    client, broker, tokens, _ = keyed
    alices, bobs = await submit(client, tokens["alice"]), await submit(client, tokens["bob"])
    alice_key = auth.KeyRing(keyed[3]).authenticate(tokens["alice"])
    assert broker.job(alices)["owner"] == alice_key.id
    listed = (await (await client.get("/v1/jobs", headers=bearer(tokens["alice"]))).json())["jobs"]
    assert [j["id"] for j in listed] == [alices]
    for method, path in [("GET", f"/v1/jobs/{bobs}"), ("GET", f"/v1/jobs/{bobs}/events"),
                         ("GET", f"/v1/jobs/{bobs}/result"), ("DELETE", f"/v1/jobs/{bobs}")]:
        resp = await client.request(method, path, headers=bearer(tokens["alice"]))
        assert resp.status == 404 and "no job with id" in (await resp.json())["error"], (method, path)
    assert broker.job(bobs)["state"] == "queued"
    resp = await client.get(f"/v1/jobs/{alices}", headers=bearer(tokens["alice"]))
    assert resp.status == 200 and (await resp.json())["owner"] == alice_key.id
    resp = await client.delete(f"/v1/jobs/{alices}", headers=bearer(tokens["alice"]))
    assert resp.status == 202


async def test_a_read_key_sees_every_job_and_cancels_none_and_admin_cancels_any(keyed):
    client, broker, tokens, _ = keyed
    bobs = await submit(client, tokens["bob"])
    listed = (await (await client.get("/v1/jobs", headers=bearer(tokens["reader"]))).json())["jobs"]
    assert bobs in [j["id"] for j in listed]
    assert (await client.get(f"/v1/jobs/{bobs}", headers=bearer(tokens["reader"]))).status == 200
    resp = await client.delete(f"/v1/jobs/{bobs}", headers=bearer(tokens["reader"]))
    assert resp.status == 403 and "admin" in (await resp.json())["error"]
    resp = await client.post("/v1/jobs", json=valid(), headers=bearer(tokens["reader"]))
    assert resp.status == 403 and "needs the scope submit" in (await resp.json())["error"]
    assert (await client.delete(f"/v1/jobs/{bobs}", headers=bearer(tokens["ops"]))).status == 202


async def test_only_admin_drains_workers_and_reads_signals(keyed):
    client, broker, tokens, _ = keyed
    for who in ("alice", "reader"):
        resp = await client.post("/v1/workers/w1/drain", headers=bearer(tokens[who]))
        assert resp.status == 403 and "needs the scope admin" in (await resp.json())["error"], who
        assert (await client.get("/v1/signals", headers=bearer(tokens[who]))).status == 403
    resp = await client.post("/v1/workers/w1/drain", headers=bearer(tokens["ops"]))
    assert resp.status == 404  # through the door: there is just no such worker
    assert (await client.get("/v1/signals", headers=bearer(tokens["ops"]))).status == 200
    assert (await client.get("/readyz")).status == 503  # not drained into "not ready" by anyone


async def test_a_revoked_key_is_refused_on_its_next_request(keyed):
    client, broker, tokens, path = keyed
    assert (await client.get("/v1/jobs", headers=bearer(tokens["alice"]))).status == 200
    alice = auth.KeyRing(path).authenticate(tokens["alice"]).id
    auth.revoke_key(path, alice)
    await asyncio.sleep(0.01)
    assert (await client.get("/v1/jobs", headers=bearer(tokens["alice"]))).status == 401


async def test_the_openapi_document_of_a_keyed_api_requires_the_key_on_every_guarded_route(keyed):
    client, *_ = keyed
    doc = await (await client.get("/v1/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    seen = set()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            seen.add((method.upper(), path))
            if (method.upper(), path) in auth.OPEN:
                assert op["security"] == [], path
            else:
                assert op["security"] == [{"apiKey": []}] and op["x-scopes"] == list(auth.ACCESS[(method.upper(), path)])
                assert {"401", "403"} <= set(op["responses"]), path
    assert seen == set(auth.ACCESS) | set(auth.OPEN)


# -- results confined to the store -------------------------------------------------------------


async def test_a_result_outside_the_store_is_never_served(keyed, tmp_path):
    client, broker, tokens, _ = keyed
    job = await submit(client, tokens["alice"])
    other = await submit(client, tokens["bob"])
    broker.cancel(job)  # no workers here: the job leaves the core, and the store says what it ended as
    store = broker.results_dir.resolve()
    secret = tmp_path / "secret.txt"
    secret.write_text("the broker's private data")
    (store / f"{other}.mp4").write_bytes(b"bob's video")
    (store / f"{job}.mp4").symlink_to(secret)  # a symlink in the store that points out of it
    attempts = [{"path": str(secret)}, {"key": f"../{secret.name}"}, {"key": str(secret)},
                {"key": f"{job}.mp4"}, {"key": f"{other}.mp4"}, {"key": ""}, {"key": "/etc/passwd"},
                {"path": "/etc/passwd"}, {"key": 5}]
    for result in attempts:
        broker.store.finish(job, "succeeded", time.time(), None, result, None)
        broker.store.commit()
        assert broker.result_path(job) is None, result
        resp = await client.get(f"/v1/jobs/{job}/result", headers=bearer(tokens["alice"]))
        assert resp.status == 410 and b"private" not in await resp.read(), result
    # the honest case: the job's own file in the store
    (store / f"{job}.mp4").unlink()
    (store / f"{job}.mp4").write_bytes(b"alice's video")
    broker.store.finish(job, "succeeded", time.time(), None, {"key": f"{job}.mp4"}, None)
    broker.store.commit()
    resp = await client.get(f"/v1/jobs/{job}/result", headers=bearer(tokens["alice"]))
    assert resp.status == 200 and await resp.read() == b"alice's video"
    assert os.path.exists(secret)


# -- the clients send the key ---------------------------------------------------------------------


async def test_the_cli_sends_its_key_from_the_flag_or_the_environment(keyed):
    import sys

    client, broker, tokens, _ = keyed
    url = str(client.make_url("")).rstrip("/")

    async def status(*extra, env_key=None):
        env = {k: v for k, v in os.environ.items() if k != "ONEPIECE_API_KEY"}
        if env_key:
            env["ONEPIECE_API_KEY"] = env_key
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "onepiece.cli", "status", "--url", url, *extra, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await status()
    assert code == 2 and "needs an API key" in err
    code, out, err = await status("--api-key", tokens["reader"])
    assert code == 0 and "stage" in out, err
    code, out, err = await status(env_key=tokens["reader"])
    assert code == 0, err
    code, out, err = await status(env_key=tokens["alice"])  # submit cannot read the stages
    assert code == 2 and "needs the scope read" in err


async def test_a_node_manager_without_an_admin_key_is_told_at_once(keyed):
    from manager.remote import BrokerRefused, RemoteBroker

    client, broker, tokens, _ = keyed
    url = str(client.make_url("")).rstrip("/")
    for token in (None, tokens["reader"]):
        remote = RemoteBroker(url, ["synthetic3"], api_key=token)
        started = time.monotonic()
        with pytest.raises(BrokerRefused, match="give it an admin key"):
            await remote.start(timeout=30)
        await remote.stop()
        assert time.monotonic() - started < 5  # not retried for the start timeout
    remote = RemoteBroker(url, ["synthetic3"], api_key=tokens["ops"])
    await remote.start(timeout=30)
    await remote.stop()


# -- keys at first start, and the keys command ----------------------------------------------------


def test_the_first_start_makes_one_admin_key_and_a_later_start_keeps_the_file(tmp_path):
    keys, token_file = tmp_path / "keys" / "api-keys.json", tmp_path / "keys" / "admin.token"
    key_id = auth.init_keys(keys, token_file)
    assert key_id and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = auth.read_token(token_file)
    assert auth.KeyRing(keys).authenticate(token).scopes == frozenset({"admin"})
    assert auth.init_keys(keys, token_file) is None and auth.read_token(token_file) == token


def test_reading_a_token_waits_for_its_file_within_a_bound(tmp_path):
    import threading

    token_file = tmp_path / "admin.token"
    threading.Timer(0.3, lambda: token_file.write_text("op_12345678_" + "x" * 43 + "\n")).start()
    assert auth.read_token(token_file, timeout=10).startswith("op_12345678_")
    with pytest.raises(auth.KeysError, match="no API key there after 1 s"):
        auth.read_token(tmp_path / "never", timeout=1)


def test_the_keys_command_creates_lists_and_revokes(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert cli_main(["keys", "create", "--scope", "submit", "--scope", "read", "--name", "ci", "--file",
                     str(path)]) == 0
    token = capsys.readouterr().out.strip()
    key = auth.KeyRing(path).authenticate(token)
    assert key.scopes == frozenset({"submit", "read"}) and key.name == "ci"
    assert cli_main(["keys", "list", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert key.id in listed and "read,submit" in listed and token not in listed
    assert cli_main(["keys", "revoke", key.id, "--file", str(path)]) == 0
    assert cli_main(["keys", "revoke", key.id, "--file", str(path)]) == 1
    assert auth.list_keys(path) == []
