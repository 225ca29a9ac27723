"""Fixtures for the transport tests: endpoints and peer processes that are
closed, killed and waited for in teardown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from transports import open_transport
from transports.rdma import unavailable_reason

ROOT = Path(__file__).resolve().parents[2]

#: Options per transport; a 16 MiB ring makes large messages stream through it.
OPTIONS: dict[str, dict] = {"shm": {"ring_bytes": 16 << 20}, "tcp": {}, "auto": {"ring_bytes": 16 << 20},
                            "rdma": {"ring_bytes": 16 << 20}}

#: Why a transport cannot run here (None: it can), asked once per session.
UNAVAILABLE = {"rdma": functools.cache(unavailable_reason)}


@pytest.fixture(params=list(OPTIONS))
def transport_name(request) -> str:
    """Every transport; one that cannot run on this machine skips with the reason (no RDMA port here)."""
    if request.param in UNAVAILABLE and (reason := UNAVAILABLE[request.param]()) is not None:
        pytest.skip(f"{request.param}: {reason}")
    return request.param


@pytest.fixture
async def endpoints(transport_name):
    """Factory: ``await endpoints(**extra_options)`` opens an endpoint, closed at teardown."""
    opened = []

    async def open_(**extra):
        transport = await open_transport(transport_name, **{**OPTIONS[transport_name], **extra})
        opened.append(transport)
        return transport

    yield open_
    for transport in reversed(opened):
        await transport.aclose()


@pytest.fixture
async def endpoint(endpoints):
    return await endpoints()


class Peer:
    """A ``tests.transports.peer`` process; a thread queues its stdout lines."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.transports.peer", *args],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._lines: queue.Queue = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        self.descriptor: dict = {}

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def line_blocking(self, timeout: float = 120) -> dict:
        """The next report line, blocking the event loop (see the kill tests for why)."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer {self.proc.args[3:]} printed nothing for {timeout} s") from None
        if line is None:
            self._lines.put(None)
            raise AssertionError(f"peer {self.proc.args[3:]} ended (exit code {self.proc.wait()})")
        return line

    async def line(self, timeout: float = 120) -> dict:
        return await asyncio.to_thread(self.line_blocking, timeout)

    async def lines(self, count: int, timeout: float = 120) -> list[dict]:
        return await asyncio.to_thread(lambda: [self.line_blocking(timeout) for _ in range(count)])

    async def until(self, key: str, timeout: float = 120) -> dict:
        """The first report line that has ``key``, skipping the others."""
        while key not in (line := await self.line(timeout)):
            pass
        return line

    def tell(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._pump_thread.join(timeout=10)
        with contextlib.suppress(OSError):  # stdin of a dead process
            self.proc.stdin.close()
        self.proc.stdout.close()

    async def wait(self, timeout: float = 60) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)


@pytest.fixture
def peers(transport_name):
    """Factory: ``await peers(role, *args)`` starts a peer and reads its descriptor."""
    started: list[Peer] = []

    async def start(role: str, *args: str) -> Peer:
        peer = Peer([transport_name, json.dumps(OPTIONS[transport_name]), role, *args])
        started.append(peer)
        peer.descriptor = await peer.line()
        return peer

    yield start
    for peer in started:
        peer.close()


def shm_entries() -> set[str]:
    """Shared-memory segments (regular files) in /dev/shm; directories are other programs' scratch."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {entry.name for entry in os.scandir("/dev/shm") if entry.is_file(follow_symlinks=False)}


def _shm_held_by_others() -> set[str]:
    """Names in /dev/shm that some other live process has open or mapped."""
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            with open(f"/proc/{pid}/maps") as maps:
                held.update(line.split(maxsplit=5)[-1].strip() for line in maps if "/dev/shm/" in line)
    return {path.removeprefix("/dev/shm/") for path in held if path.startswith("/dev/shm/")}


def shm_leaks(before: set[str]) -> set[str]:
    """Entries of /dev/shm created since ``before`` that nobody else holds.

    Call it once every process of the test has ended. Other programs on the
    machine (benchmarks, a parallel test run) make segments too; one still
    open in or mapped by another live process is theirs, not a leak of ours.
    """
    new = shm_entries() - before
    return new - _shm_held_by_others() if new else new
