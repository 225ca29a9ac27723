"""The result store (onepiece/results.py): a local directory, and S3-compatible object storage
tested against a real S3 server started here on loopback: moto's server (``moto[server]``),
an S3 *emulator* (MinIO cannot be installed on these machines). Nothing goes beyond 127.0.0.1.

The end-to-end test runs the tiny Wan2.1 workflow on a real stack whose results go to S3: the
result stage PUTs the video into the bucket, nothing is written to the broker's directory, and
``GET /v1/jobs/{id}/result`` redirects to a presigned URL that serves the video.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from onepiece import client
from onepiece.config import load_settings
from onepiece.results import LocalStore, S3Store, StoreError, is_key_of, open_store, result_key

from .helpers import free_port

boto3 = pytest.importorskip("boto3")

JOB = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
CREDENTIALS = {"s3_access_key_id": "onepiece-test", "s3_secret_access_key": "onepiece-test-secret"}


# -- keys --------------------------------------------------------------------------------------


def test_a_key_is_the_jobs_id_and_an_extension_and_nothing_else():
    assert result_key(JOB, "mp4") == f"{JOB}.mp4" and is_key_of(JOB, f"{JOB}.mp4")
    for bad in (f"{OTHER}.mp4", f"{JOB}.mp4/../x", f"../{JOB}.mp4", f"{JOB}.", f"{JOB}.MP4", f"{JOB}.mp4.tmp",
                f"/{JOB}.mp4", "", None, 5, f"{JOB}.m/p4"):
        assert not is_key_of(JOB, bad), bad
    with pytest.raises(ValueError):
        result_key(JOB, "../x")


# -- local ---------------------------------------------------------------------------------------


def test_a_local_store_writes_whole_files_and_locates_only_the_jobs_own(tmp_path):
    store = LocalStore(tmp_path / "results")
    assert store.locate(JOB, f"{JOB}.mp4") is None  # nothing yet
    stored = store.put(JOB, "mp4", b"video", "video/mp4")
    assert stored["key"] == f"{JOB}.mp4" and store.locate(JOB, stored["key"]).path.read_bytes() == b"video"
    assert [p.name for p in (tmp_path / "results").iterdir()] == [f"{JOB}.mp4"]  # no temporary left
    secret = tmp_path / "secret"
    secret.write_text("private")
    (tmp_path / "results" / f"{OTHER}.mp4").symlink_to(secret)
    (tmp_path / "results" / f".{OTHER}.mp4.1234.tmp").write_bytes(b"half")  # a write in progress
    for key in (str(secret), f"../{secret.name}", f"{OTHER}.mp4", f".{OTHER}.mp4.1234.tmp", "/etc/passwd", ""):
        assert store.locate(OTHER, key) is None, key
    assert store.locate(OTHER, f"{JOB}.mp4") is None  # another job's file


# -- S3, against a real (emulated) S3 server on loopback -----------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 (an emulator), stopped by PID at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (exit code {proc.poll()})") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bucket(s3_server, request):
    name = f"results-{request.node.name[:30].lower().replace('_', '-')}-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                 aws_access_key_id="x", aws_secret_access_key="y").create_bucket(Bucket=name)
    return name


def s3_settings(tmp_path, endpoint: str, bucket: str, **kw):
    return load_settings(env={}, data_dir=tmp_path, results=f"s3://{bucket}/videos", s3_endpoint=endpoint,
                         **CREDENTIALS, **kw)


def test_s3_puts_whole_objects_and_serves_them_by_presigned_url(tmp_path, s3_server, bucket):
    store = open_store(s3_settings(tmp_path, s3_server, bucket))
    assert isinstance(store, S3Store) and store.describe() == f"s3://{bucket}/videos"
    assert store.locate(JOB, f"{JOB}.mp4") is None  # not there (yet): never a URL to nothing
    stored = store.put(JOB, "mp4", b"\x00\x00\x00\x18ftypmp42 a video", "video/mp4")
    assert stored == {"key": f"{JOB}.mp4", "url": f"s3://{bucket}/videos/{JOB}.mp4"}
    located = store.locate(JOB, stored["key"])
    assert located.path is None and located.url.startswith(f"{s3_server}/{bucket}/videos/{JOB}.mp4?")
    with urllib.request.urlopen(located.url, timeout=10) as resp:  # no credentials but the URL's own
        assert resp.read() == b"\x00\x00\x00\x18ftypmp42 a video"
        assert resp.headers["Content-Type"] == "video/mp4"
    for key in (f"{OTHER}.mp4", f"../{JOB}.mp4", f"videos/{JOB}.mp4", "", None):  # a lying worker
        assert store.locate(JOB, key) is None, key
    objects = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="x",
                           aws_secret_access_key="y").list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in objects] == [f"videos/{JOB}.mp4"]


def test_s3_that_cannot_be_written_says_where_and_why(tmp_path, s3_server):
    store = open_store(s3_settings(tmp_path, s3_server, "no-such-bucket"))
    with pytest.raises(StoreError, match=r"s3://no-such-bucket/videos/.*NoSuchBucket"):
        store.put(JOB, "mp4", b"x", "video/mp4")
    with pytest.raises(StoreError, match="name a bucket"):
        open_store(load_settings(env={}, data_dir=tmp_path, results="s3://"))


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_video_made_by_the_stack_goes_to_s3_and_the_api_redirects_to_it(tmp_path, s3_server, bucket):
    from onepiece.demo import SAMPLE
    from onepiece.stack import Stack

    settings = s3_settings(tmp_path, s3_server, bucket, control="tcp://127.0.0.1:*", rest_port=free_port(),
                           workflows=["wan_i2v"], heartbeat_s=0.5, liveness=3)
    stack = Stack(settings)
    await stack.start(ready_timeout=300)
    try:
        async with aiohttp.ClientSession() as session:
            job = await client.submit(session, stack.url, SAMPLE.read_bytes(), prompt="a boat", seed=1, height=64,
                                      width=96, num_frames=5, steps=2)
            await client.wait(session, stack.url, job)  # raises JobFailed unless it succeeded
            async with session.get(f"{stack.url}/v1/jobs/{job}/result", allow_redirects=False) as resp:
                assert resp.status == 307, await resp.text()
                location = resp.headers["Location"]
            assert location.startswith(f"{s3_server}/{bucket}/videos/{job}.mp4?")
            size = await client.download(session, stack.url, job, tmp_path / "v.mp4")  # follows it
            async with session.get(f"{stack.url}/v1/jobs/{job}") as resp:
                view = await resp.json()
        video = (tmp_path / "v.mp4").read_bytes()
        assert size == len(video) == view["result"]["bytes"] and video[4:8] == b"ftyp"
        assert view["result"]["url"].endswith(f"/v1/jobs/{job}/result")  # the API's URL, not the bucket's
        assert list(settings.results_dir.glob("*")) == []  # nothing went to the broker's directory
    finally:
        await asyncio.wait_for(stack.stop(), 120)


def test_the_node_manager_gives_its_workers_the_store_and_its_secret_only_by_environment(tmp_path):
    from manager.launcher import LocalLauncher

    launcher = LocalLauncher(s3_settings(tmp_path, "http://127.0.0.1:9", "b"))
    cmd = launcher.command("wan_i2v", "video_encode", "w1")
    assert cmd[cmd.index("--results") + 1] == "s3://b/videos"
    assert cmd[cmd.index("--s3-endpoint") + 1] == "http://127.0.0.1:9"
    assert CREDENTIALS["s3_secret_access_key"] not in " ".join(cmd)  # never in argv (ps shows it)
    assert launcher._secrets() == {"ONEPIECE_S3_ACCESS_KEY_ID": "onepiece-test",
                                   "ONEPIECE_S3_SECRET_ACCESS_KEY": "onepiece-test-secret"}
    worker = load_settings(env={f"ONEPIECE_{k.upper()}": v for k, v in CREDENTIALS.items()}, results="s3://b/videos")
    assert (worker.s3_access_key_id, worker.s3_secret_access_key) == ("onepiece-test", "onepiece-test-secret")
