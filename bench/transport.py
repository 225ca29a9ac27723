#!/usr/bin/env python
"""Data-plane throughput and latency, measured against its baselines in one run.

    python bench/transport.py [--quick] [--json PATH] [--sizes 4K,16M] [--transports shm,zmq-ipc]
                              [--rounds N] [--seconds S] [--rtt-iters N] [--shm-options JSON]

For each message size it measures, from one process to another, throughput
(GB/s = bytes / 1e9 / s, and messages/s) and the round-trip time of a 4 KiB
ping-pong, for:

``memcpy``
    one thread copying the same number of bytes into a pre-faulted buffer in
    one process: the physical limit of a one-copy design (the fastest of
    torch ``copy_`` with one thread, ``ctypes.memmove`` and ``numpy.copyto``,
    named in the output);
``shm``, ``tcp``
    our transports (``transports.open_transport`` with default options), a
    producer and a consumer in two spawned processes, uvloop in both when
    installed, one torch thread each; the consumer reads the header, takes
    the tensor and releases. shm messages of 8 MiB and more go by rendezvous:
    the producer copies them once into a region the consumer granted;
``shm-zero-copy``
    shm with zero-copy production, at the sizes that go by rendezvous: for
    each message the producer asks its sender for the output tensor
    (``Sender.allocate``), writes the payload into it (``copy_`` from the
    pattern: standing in for the stage's compute writing its output, the one
    write of the bytes, which this row counts and the others do not) and
    sends it, which moves no payload bytes;
``zmq-ipc``, ``zmq-tcp``
    pyzmq PUSH/PULL with zero-copy multipart ``[msgpack header, payload]``
    sends and ``copy=False`` receives; PAIR sockets for the ping-pong;
``write+mpi`` (a line of the targets, not a row)
    what a stage that computes its output into memory of its own and then
    sends it with MPI would reach: the time of one memcpy plus one MPI
    transfer of the same bytes, both from this run. shm-zero-copy counts the
    compute's one write too, so this is the like-for-like comparison; the
    issue's target is against the mpi row itself;
``mpi``
    mpi4py ``Send``/``Recv`` of numpy buffers between two ranks of
    ``mpirun -n 2`` over Open MPI's shared-memory BTL (``pml ob1``,
    ``btl self,vader``), when mpi4py and mpirun are installed.

Method: the producer sends one message whose bytes the consumer checks
(outside timing), then warms up, waits until the consumer has drained the
warm-up, and sends until about ``--seconds`` have passed (at least a few
messages). Throughput is the bytes sent over the time from the producer's
first timed send to the consumer's last receive (both read CLOCK_MONOTONIC,
which all processes of a host share). Every transport runs ``--rounds``
times, interleaved, and the table shows the median. The ratios against each
baseline and the targets come from this same run.

Every process started here is stopped at the end, also on errors and
Ctrl-C, and the shared-memory names of those processes are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KiB, MiB = 1 << 10, 1 << 20
SIZES = [4 * KiB, 1 * MiB, 16 * MiB, 64 * MiB, 185 * MiB]
TRANSPORTS = ["memcpy", "shm", "shm-zero-copy", "tcp", "zmq-ipc", "zmq-tcp", "mpi"]
ZERO_COPY = "-zero-copy"
RTT_SIZE = 4 * KiB
IDLE_TIMEOUT = 120.0  # a worker silent this long is stuck: stop it
RECV_TIMEOUT = 60.0  # a worker waiting this long for its peer gives up
SHM_DIR = "/dev/shm"
MPI_FLAGS = ["--mca", "pml", "ob1", "--mca", "btl", "self,vader", "--bind-to", "core"]


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    seconds: float  # timed window per size
    warm_seconds: float
    min_msgs: int  # timed messages at least, however slow
    min_warm: int
    rtt_iters: int
    rtt_warm: int
    options: dict = field(default_factory=dict)  # transport -> open_transport options


FULL = dict(seconds=1.0, warm_seconds=0.25, min_msgs=3, min_warm=2, rtt_iters=20000, rtt_warm=1000)
QUICK = dict(seconds=0.12, warm_seconds=0.03, min_msgs=2, min_warm=1, rtt_iters=2000, rtt_warm=200)


def pattern(size: int):
    """Deterministic bytes for a size; a prime period catches shifted or stale data."""
    import numpy as np

    block = np.random.default_rng(size).integers(0, 256, 4093, dtype=np.uint8)
    return np.resize(block, size)


def fmt_size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n >> 20} MiB"
    return f"{n >> 10} KiB" if n % KiB == 0 else f"{n} B"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": KiB, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def _child_signals() -> None:
    # Ctrl-C reaches the whole foreground group: let the parent decide, and
    # turn its SIGTERM into SystemExit so `async with` blocks close endpoints.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _deadline_loop(start: float, seconds: float, minimum: int):
    """Yields (index, is_last): at least ``minimum`` items, then until ``seconds`` have passed."""
    stop = start + seconds
    i = 0
    while True:
        i += 1
        last = i >= minimum and time.perf_counter() >= stop
        yield i, last
        if last:
            return


# -- our asyncio transports ---------------------------------------------------

def _aio_worker(name: str, role: str, ctl, peer, plan: Plan) -> None:
    _child_signals()
    try:
        import uvloop

        run, loop_name = uvloop.run, "uvloop"
    except ImportError:
        run, loop_name = asyncio.run, "asyncio"
    try:
        ctl.send(("info", {"loop": loop_name}))
        run(_aio_main(name, role, ctl, peer, plan))
        ctl.send(("done", None))
    except BaseException:
        ctl.send(("error", traceback.format_exc()))


async def _aio_main(name: str, role: str, ctl, peer, plan: Plan) -> None:
    import torch

    from transports import open_transport

    torch.set_num_threads(1)
    loop = asyncio.get_running_loop()

    async def from_peer():
        return await loop.run_in_executor(None, peer.recv)

    medium = name.removesuffix(ZERO_COPY)
    sizes = plan.sizes if medium == name else zero_copy_sizes(plan.sizes)
    async with await open_transport(medium, **plan.options.get(medium, {})) as endpoint:
        # Each side receives on its own endpoint and sends on a sender to the
        # other one: throughput uses producer -> consumer, the ping-pong both.
        peer.send(endpoint.descriptor)
        async with await endpoint.connect(await from_peer()) as sender:
            peer.send("connected")
            await from_peer()
            for size in sizes:
                if role == "producer":
                    result = await _aio_produce(sender, size, plan, from_peer, zero_copy=medium != name)
                else:
                    result = await _aio_consume(endpoint, size, peer)
                ctl.send(("tp", size, result))
            if role == "consumer":
                stats = endpoint.stats()
                ctl.send(("info", {"grant_pool_bytes": stats.get("grant_pool_bytes"),
                                   "grant_pool_limit": stats.get("grant_pool_limit")}))
            if plan.rtt_iters and medium == name:
                if role == "producer":
                    ctl.send(("rtt", await _aio_ping(endpoint, sender, plan)))
                else:
                    await _aio_pong(endpoint, sender)
            # Close only when both are done, so neither sees the other vanish mid-phase.
            peer.send("bye")
            await from_peer()


def zero_copy_sizes(sizes) -> tuple[int, ...]:
    """The sizes that go by rendezvous with default options (where zero-copy production applies)."""
    from transports.ringtransport import GRANT_BYTES, GRANT_MIN_BYTES

    return tuple(s for s in sizes if GRANT_MIN_BYTES <= s <= GRANT_BYTES)


async def _aio_produce(sender, size: int, plan: Plan, from_peer, zero_copy: bool = False) -> dict:
    import torch

    src = torch.from_numpy(pattern(size))

    async def send(k: str) -> None:
        x = src
        if zero_copy:
            x = await sender.allocate((size,), torch.uint8)
            x.copy_(src)  # the compute's one write of its output, straight into the consumer's region
        await sender.send({"k": k}, {"x": x})

    await send("v")
    for _, last in _deadline_loop(time.perf_counter(), plan.warm_seconds, plan.min_warm):
        await send("W" if last else "w")
    if await from_peer() != "ready":
        raise RuntimeError("consumer did not confirm the warm-up")
    t0 = time.perf_counter()
    for n, last in _deadline_loop(t0, plan.seconds, plan.min_msgs):
        await send("L" if last else "t")
    return {"t0": t0, "n": n}


async def _aio_consume(endpoint, size: int, peer) -> dict:
    import torch

    msg = await endpoint.recv(timeout=RECV_TIMEOUT)
    x = msg.tensors.get("x")
    ok = (msg.header.get("k") == "v" and x is not None and x.dtype == torch.uint8
          and tuple(x.shape) == (size,) and torch.equal(x, torch.from_numpy(pattern(size))))
    msg.release()
    while True:
        msg = await endpoint.recv(timeout=RECV_TIMEOUT)
        k = msg.header["k"]
        msg.release()
        if k == "W":
            break
    peer.send("ready")
    while True:
        msg = await endpoint.recv(timeout=RECV_TIMEOUT)
        k = msg.header["k"]
        msg.tensors["x"]  # take the tensor, as a stage would; reading its bytes is the stage's cost
        msg.release()
        if k == "L":
            break
    return {"t1": time.perf_counter(), "ok": bool(ok)}


async def _aio_ping(endpoint, sender, plan: Plan) -> list[int]:
    import torch

    buf = torch.from_numpy(pattern(RTT_SIZE))
    samples = []
    clock = time.perf_counter_ns
    for _ in range(plan.rtt_warm + plan.rtt_iters):
        t = clock()
        await sender.send({"k": "p"}, {"x": buf})
        msg = await endpoint.recv(timeout=RECV_TIMEOUT)
        msg.release()
        samples.append(clock() - t)
    await sender.send({"k": "s"}, {"x": buf})
    return samples[plan.rtt_warm:]


async def _aio_pong(endpoint, sender) -> None:
    import torch

    buf = torch.from_numpy(pattern(RTT_SIZE))
    while True:
        msg = await endpoint.recv(timeout=RECV_TIMEOUT)
        k = msg.header["k"]
        msg.release()
        if k == "s":
            return
        await sender.send({"k": "p"}, {"x": buf})


# -- ZeroMQ --------------------------------------------------------------------

def _zmq_worker(kind: str, role: str, ctl, peer, plan: Plan, ipc_dir: str) -> None:
    _child_signals()
    import zmq

    ctx = zmq.Context()
    try:
        for size in plan.sizes:
            ctl.send(("tp", size, _zmq_throughput(zmq, ctx, kind, role, peer, plan, ipc_dir, size)))
        if plan.rtt_iters:
            samples = _zmq_rtt(zmq, ctx, kind, role, peer, plan, ipc_dir)
            if role == "producer":
                ctl.send(("rtt", samples))
        ctx.destroy(linger=0)
        ctl.send(("done", None))
    except BaseException:
        ctl.send(("error", traceback.format_exc()))
        ctx.destroy(linger=0)


def _zmq_socket(zmq, ctx, sock_type: int, kind: str, role: str, peer, ipc_dir: str, name: str, hwm: int):
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(RECV_TIMEOUT * 1000))
    if role == "consumer":
        sock.bind(f"ipc://{ipc_dir}/{name}" if kind == "ipc" else "tcp://127.0.0.1:*")
        peer.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        peer.recv()  # the producer has connected
    else:
        sock.connect(peer.recv())
        peer.send("connected")
    return sock


def _zmq_throughput(zmq, ctx, kind, role, peer, plan: Plan, ipc_dir: str, size: int) -> dict:
    import msgpack
    import numpy as np

    # A new socket pair per size, so the queue bound (HWM, in messages) keeps
    # at most ~256 MiB queued on each side whatever the size.
    hwm = max(2, min(1000, (256 * MiB) // size))
    role_type = zmq.PULL if role == "consumer" else zmq.PUSH
    sock = _zmq_socket(zmq, ctx, role_type, kind, role, peer, ipc_dir, f"tp-{size}", hwm)
    try:
        if role == "producer":
            src = pattern(size)
            payload = memoryview(src)

            def send(k):
                sock.send_multipart([msgpack.packb({"k": k, "n": size}), payload], copy=False)

            send("v")
            for _, last in _deadline_loop(time.perf_counter(), plan.warm_seconds, plan.min_warm):
                send("W" if last else "w")
            if peer.recv() != "ready":
                raise RuntimeError("consumer did not confirm the warm-up")
            t0 = time.perf_counter()
            for n, last in _deadline_loop(t0, plan.seconds, plan.min_msgs):
                send("L" if last else "t")
            peer.send("sent")
            peer.recv()  # keep the socket until the consumer has everything
            return {"t0": t0, "n": n}
        head, body = sock.recv_multipart(copy=False)
        ok = (msgpack.unpackb(head.bytes)["k"] == "v"
              and np.array_equal(np.frombuffer(body.buffer, dtype=np.uint8), pattern(size)))
        del head, body
        while msgpack.unpackb(sock.recv_multipart(copy=False)[0].bytes)["k"] != "W":
            pass
        peer.send("ready")
        while True:
            head, body = sock.recv_multipart(copy=False)
            k = msgpack.unpackb(head.bytes)["k"]
            body.buffer  # the payload as a buffer, as the shm consumer takes its tensor
            if k == "L":
                break
        t1 = time.perf_counter()
        peer.recv()
        peer.send("got")
        return {"t1": t1, "ok": bool(ok)}
    finally:
        sock.close(linger=0)


def _zmq_rtt(zmq, ctx, kind, role, peer, plan: Plan, ipc_dir: str) -> list[int]:
    import msgpack

    sock = _zmq_socket(zmq, ctx, zmq.PAIR, kind, role, peer, ipc_dir, "rtt", 1000)
    buf = memoryview(pattern(RTT_SIZE))
    try:
        if role == "producer":
            samples = []
            clock = time.perf_counter_ns
            for _ in range(plan.rtt_warm + plan.rtt_iters):
                t = clock()
                sock.send_multipart([msgpack.packb({"k": "p"}), buf], copy=False)
                head, body = sock.recv_multipart(copy=False)
                msgpack.unpackb(head.bytes)
                body.buffer
                samples.append(clock() - t)
            sock.send_multipart([msgpack.packb({"k": "s"}), buf], copy=False)
            peer.recv()
            return samples[plan.rtt_warm:]
        while True:
            head, body = sock.recv_multipart(copy=False)
            k = msgpack.unpackb(head.bytes)["k"]
            body.buffer
            if k == "s":
                break
            sock.send_multipart([msgpack.packb({"k": "p"}), buf], copy=False)
        peer.send("bye")
        return []
    finally:
        sock.close(linger=0)


# -- MPI (runs under mpirun, one rank per process) -------------------------------

def _mpi_worker(plan: Plan) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() != 2:
        raise SystemExit("the MPI baseline needs exactly 2 ranks")
    status = MPI.Status()
    library = MPI.Get_library_version().splitlines()[0].strip(" \x00")
    out: dict = {"throughput": [], "rtt": None, "library": library}
    for size in plan.sizes:
        if rank == 0:
            buf = pattern(size)
            comm.Send(buf, dest=1, tag=9)
            for _, last in _deadline_loop(time.perf_counter(), plan.warm_seconds, plan.min_warm):
                comm.Send(buf, dest=1, tag=3 if last else 2)
            comm.Barrier()
            t0 = time.perf_counter()
            for n, last in _deadline_loop(t0, plan.seconds, plan.min_msgs):
                comm.Send(buf, dest=1, tag=1 if last else 0)
            t1, ok = comm.recv(source=1, tag=10)
            out["throughput"].append({"size": size, "t0": t0, "t1": t1, "n": n, "ok": ok})
        else:
            buf = np.zeros(size, dtype=np.uint8)  # receive buffer, pre-faulted
            comm.Recv(buf, source=0, tag=9)
            ok = bool(np.array_equal(buf, pattern(size)))
            while True:
                comm.Recv(buf, source=0, tag=MPI.ANY_TAG, status=status)
                if status.Get_tag() == 3:
                    break
            comm.Barrier()
            while True:
                comm.Recv(buf, source=0, tag=MPI.ANY_TAG, status=status)
                if status.Get_tag() == 1:
                    break
            t1 = time.perf_counter()
            comm.send((t1, ok), dest=0, tag=10)
    if plan.rtt_iters:
        buf = pattern(RTT_SIZE)
        rbuf = np.zeros(RTT_SIZE, dtype=np.uint8)
        comm.Barrier()
        if rank == 0:
            samples = []
            clock = time.perf_counter_ns
            for _ in range(plan.rtt_warm + plan.rtt_iters):
                t = clock()
                comm.Send(buf, dest=1, tag=4)
                comm.Recv(rbuf, source=1, tag=4)
                samples.append(clock() - t)
            out["rtt"] = samples[plan.rtt_warm:]
        else:
            for _ in range(plan.rtt_warm + plan.rtt_iters):
                comm.Recv(rbuf, source=0, tag=4)
                comm.Send(buf, dest=0, tag=4)
    if rank == 0:
        print("BENCHJSON " + json.dumps(out), flush=True)


# -- the parent: run pairs, collect, clean up ----------------------------------

class BenchError(Exception):
    pass


class Results:
    """Every measurement of every round; the report shows the median over rounds."""

    def __init__(self):
        self.tp: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
        self.rtt: dict[str, list[dict]] = collections.defaultdict(list)
        self.status: dict[str, str] = {}  # transport -> "ok" | "not installed (...)" | "error: ..."
        self.errors: dict[str, list[str]] = collections.defaultdict(list)
        self.info: dict[str, dict] = {}

    def add_tp(self, transport: str, size: int, t0: float, t1: float, n: int, ok: bool) -> dict:
        seconds = t1 - t0
        row = {"gb_per_s": n * size / 1e9 / seconds, "msgs_per_s": n / seconds, "ok": ok, "n": n,
               "seconds": seconds}
        self.tp[transport, size].append(row)
        return row

    def add_rtt(self, transport: str, samples: list[int]) -> None:
        s = sorted(samples)
        self.rtt[transport].append({"p50_us": s[len(s) // 2] / 1e3, "p99_us": s[int(0.99 * (len(s) - 1))] / 1e3,
                                    "n": len(s)})

    def throughput(self, transport: str, size: int) -> dict | None:
        rows = self.tp.get((transport, size))
        if not rows:
            return None
        return {"gb_per_s": statistics.median(r["gb_per_s"] for r in rows),
                "msgs_per_s": statistics.median(r["msgs_per_s"] for r in rows),
                "ok": all(r["ok"] for r in rows), "rounds": [r["gb_per_s"] for r in rows]}

    def latency(self, transport: str) -> dict | None:
        rows = self.rtt.get(transport)
        if not rows:
            return None
        return {"p50_us": statistics.median(r["p50_us"] for r in rows),
                "p99_us": statistics.median(r["p99_us"] for r in rows),
                "n": sum(r["n"] for r in rows), "rounds": [r["p50_us"] for r in rows]}

    def gbps(self, transport: str, size: int) -> float | None:
        r = self.throughput(transport, size)
        return r["gb_per_s"] if r and r["ok"] else None

    def measured(self, transport: str) -> bool:
        return any(t == transport for t, _ in self.tp) or transport in self.rtt


def _sweep_segments(pids) -> list[str]:
    """Unlink /dev/shm names created by our workers (``onepiece-<pid>-...``) that are still there."""
    prefixes = tuple(f"onepiece-{pid}-" for pid in pids)
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir(SHM_DIR):
            if name.startswith(prefixes):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed.append(name)
    return removed


def _stop(procs, grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(3)
        if p.is_alive():
            p.kill()
            p.join(3)


def run_pair(transport: str, target, extra: tuple, plan: Plan, results: Results, log) -> None:
    """Run producer and consumer worker processes and collect what they report."""
    ctx = mp.get_context("spawn")
    peer_a, peer_b = ctx.Pipe()
    ctl = {}
    procs = {}
    for role, peer in (("consumer", peer_b), ("producer", peer_a)):
        parent_end, child_end = ctx.Pipe(duplex=False)
        ctl[role] = parent_end
        procs[role] = ctx.Process(target=target, args=(*extra, role, child_end, peer, plan),
                                  name=f"bench-{transport}-{role}", daemon=True)
    started = []
    finished = False
    try:
        for role, p in procs.items():
            p.start()
            started.append(p)
        peer_a.close()
        peer_b.close()
        got: dict[str, dict] = {"consumer": {}, "producer": {}}
        rtt = None
        done = set()
        idle_since = time.monotonic()
        while len(done) < 2:
            waiting = [ctl[r] for r in ctl if r not in done] + [procs[r].sentinel for r in procs if r not in done]
            ready = mp.connection.wait(waiting, timeout=5)
            for role in [r for r in ctl if r not in done]:
                conn = ctl[role]
                while role not in done and conn.poll():
                    try:
                        kind, *rest = conn.recv()
                    except EOFError:
                        break
                    idle_since = time.monotonic()
                    if kind == "tp":
                        size, data = rest
                        got[role][size] = data
                        other = got["producer" if role == "consumer" else "consumer"].get(size)
                        if other is not None:
                            a, b = got["producer"][size], got["consumer"][size]
                            row = results.add_tp(transport, size, a["t0"], b["t1"], a["n"], b["ok"])
                            log(f"  {transport:8s} {fmt_size(size):>8s}: {row['gb_per_s']:7.2f} GB/s"
                                f"{'' if b['ok'] else '  DATA MISMATCH'}")
                    elif kind == "rtt":
                        rtt = rest[0]
                    elif kind == "info":
                        results.info.setdefault(transport, {}).update(rest[0])
                    elif kind == "done":
                        done.add(role)
                    elif kind == "error":
                        raise BenchError(f"{transport} {role} failed:\n{rest[0]}")
            for role, p in procs.items():
                if role not in done and p.sentinel in ready and not ctl[role].poll():
                    raise BenchError(f"{transport} {role} exited with code {p.exitcode}")
            if time.monotonic() - idle_since > IDLE_TIMEOUT:
                raise BenchError(f"{transport}: no progress for {IDLE_TIMEOUT:.0f} s")
        if rtt:
            results.add_rtt(transport, rtt)
        finished = True
    finally:
        _stop(started, grace=10.0 if finished else 0.0)
        for conn in ctl.values():
            conn.close()
        left = _sweep_segments(p.pid for p in started)
        if left:
            log(f"  {transport}: removed {len(left)} shared-memory names its workers left: {', '.join(left)}")


def run_mpi(plan: Plan, results: Results, log) -> None:
    if shutil.which("mpirun") is None:
        raise FileNotFoundError("mpirun")
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        raise FileNotFoundError("mpi4py")
    # vader's segments go to a directory of ours, removed whatever happens.
    shm_dir = tempfile.mkdtemp(prefix="opbench-", dir=SHM_DIR if os.path.isdir(SHM_DIR) else None)
    cmd = ["mpirun", "-n", "2", "--allow-run-as-root", *MPI_FLAGS,
           "--mca", "btl_vader_backing_directory", shm_dir,
           sys.executable, str(Path(__file__).resolve()), "--mpi-worker", json.dumps(asdict(plan))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=ROOT)
    try:
        timeout = 60 + len(plan.sizes) * (plan.seconds + plan.warm_seconds + 10) + plan.rtt_iters * 1e-3
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(shm_dir, ignore_errors=True)
    line = next((x for x in out.splitlines() if x.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"mpirun exited with {proc.returncode}:\n{err.strip()[-2000:]}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    results.info["mpi"] = {"library": data["library"], "flags": " ".join(MPI_FLAGS)}
    for r in data["throughput"]:
        row = results.add_tp("mpi", r["size"], r["t0"], r["t1"], r["n"], r["ok"])
        log(f"  {'mpi':8s} {fmt_size(r['size']):>8s}: {row['gb_per_s']:7.2f} GB/s"
            f"{'' if r['ok'] else '  DATA MISMATCH'}")
    if data["rtt"]:
        results.add_rtt("mpi", data["rtt"])


def _memcpy_best(size: int, plan: Plan) -> tuple[str, int, float, bool]:
    """The fastest single-thread copy of ``size`` bytes: (method, copies, seconds, verified)."""
    import ctypes

    import numpy as np
    import torch

    src = torch.from_numpy(pattern(size))
    dst = torch.zeros_like(src)  # zeros_like writes every page: pre-faulted
    sp, dp = src.data_ptr(), dst.data_ptr()
    src_np, dst_np = src.numpy(), dst.numpy()
    candidates = {"torch copy_ (1 thread)": lambda: dst.copy_(src),
                  "ctypes.memmove": lambda: ctypes.memmove(dp, sp, size),
                  "numpy.copyto": lambda: np.copyto(dst_np, src_np)}
    best = None
    for name, copy in candidates.items():
        for _ in range(max(plan.min_warm, 3)):
            copy()
        t0 = time.perf_counter()
        for n, _ in _deadline_loop(t0, plan.seconds / 2, plan.min_msgs):
            copy()
        seconds = time.perf_counter() - t0
        if best is None or n / seconds > best[1] / best[2]:
            best = (name, n, seconds)
    dst.zero_()
    candidates[best[0]]()
    return (*best, torch.equal(src, dst))


def run_memcpy(plan: Plan, results: Results, log) -> None:
    import torch

    torch.set_num_threads(1)
    methods = results.info.setdefault("memcpy", {}).setdefault("method", {})
    for size in plan.sizes:
        name, n, seconds, ok = _memcpy_best(size, plan)
        row = results.add_tp("memcpy", size, 0.0, seconds, n, ok)
        methods.setdefault(fmt_size(size), set()).add(name)
        log(f"  {'memcpy':8s} {fmt_size(size):>8s}: {row['gb_per_s']:7.2f} GB/s ({name})")


def default_shm_ring() -> dict:
    """The shared memory one shm connection holds with default options, from a real endpoint."""
    from transports import open_transport
    from transports.ring import CREDIT_BYTES

    async def probe():
        async with await open_transport("shm") as endpoint:
            return endpoint.config

    config = asyncio.run(probe())
    return {"ring": config.size, "control_plus_ring": config.data_region_bytes, "credit": CREDIT_BYTES,
            "total": config.data_region_bytes + CREDIT_BYTES, "max_record": config.max_record,
            "chunk": config.chunk, "grant_min": config.grant_min, "grant_bytes": config.grant_max}


def machine_info(mode: str) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "kernel": platform.release(), "mode": mode,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": list(os.getloadavg())}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    for mod, attr in (("torch", "__version__"), ("numpy", "__version__"), ("zmq", "__version__"),
                      ("msgpack", "version"), ("uvloop", "__version__"), ("mpi4py", "__version__")):
        try:
            value = getattr(__import__(mod), attr)
            info["pyzmq" if mod == "zmq" else mod] = ".".join(map(str, value)) if isinstance(value, tuple) else value
        except ImportError:
            info["pyzmq" if mod == "zmq" else mod] = None
    with contextlib.suppress(ImportError):
        import zmq

        info["libzmq"] = zmq.zmq_version()
    return info


# -- report ----------------------------------------------------------------------

def _cell(results: Results, transport: str, size: int, key: str, fmt) -> str:
    r = results.throughput(transport, size)
    if r is None:
        return "-"
    if not r["ok"]:
        return "BAD DATA"
    return fmt(r[key])


def _rate(v: float) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.2f}{suffix}"
    return f"{v:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


#: Ratio rows of the report: (first, second).
RATIOS = (("shm", "memcpy"), ("shm", "zmq-ipc"), ("shm", "mpi"), ("shm-zero-copy", "mpi"),
          ("shm-zero-copy", "memcpy"), ("tcp", "zmq-tcp"))
_LARGE = (16 * MiB, 64 * MiB, 185 * MiB)
#: Throughput targets: (transport, baseline, factor, at these sizes).
TARGETS = (("shm", "mpi", 1.0, (MiB, *_LARGE)), ("shm", "zmq-ipc", 3.0, (MiB, *_LARGE)),
           ("tcp", "zmq-tcp", 1.0, (MiB, *_LARGE)), ("shm", "memcpy", 0.8, _LARGE),
           ("shm-zero-copy", "mpi", 1.5, (64 * MiB, 185 * MiB)))


def report(results: Results, plan: Plan, transports: list[str], machine: dict, ring: dict) -> str:
    lines = []
    add = lines.append
    sizes = plan.sizes
    w = 10
    rounds = machine["rounds"]
    add(f"OnePiece transport benchmark ({machine['mode']}, median of {rounds} round{'s' * (rounds > 1)}): "
        f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, torch {machine['torch']}, "
        f"pyzmq {machine.get('pyzmq')} (libzmq {machine.get('libzmq')})")
    add(f"load average (1 min) {machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end; "
        f"above ~0.5 other work shared the {machine['cores']} cores")
    if "memcpy" in results.info:
        add("memcpy = fastest single-thread copy per size: " + ", ".join(
            f"{k} {'/'.join(sorted(v))}" for k, v in results.info["memcpy"]["method"].items()))
    if "mpi" in results.info:
        add(f"mpi = {results.info['mpi']['library']}; mpirun -n 2 {results.info['mpi']['flags']}")
    loops = {t: i["loop"] for t, i in results.info.items() if "loop" in i}
    if loops:
        add("shm/tcp workers: " + ", ".join(f"{t} {v}" for t, v in loops.items())
            + "; torch.set_num_threads(1) in every worker")
    if machine.get("transport_options"):
        add(f"NON-DEFAULT transport options: {machine['transport_options']}")
    head = "".join(f"{fmt_size(s):>{w}s}" for s in sizes)

    def unmeasured(t: str) -> str:
        status = results.status.get(t, "")
        return status if status and status != "ok" else "-"

    def table(title, key, fmt):
        add("")
        add(title)
        add(f"{'transport':14s}{head}")
        for t in transports:
            if not any(results.throughput(t, s) for s in sizes):
                add(f"{t:14s}  {unmeasured(t)}")
                continue
            add(f"{t:14s}" + "".join(f"{_cell(results, t, s, key, fmt):>{w}s}" for s in sizes))

    table("Throughput, GB/s (1e9 bytes/s), one process to another", "gb_per_s", lambda v: f"{v:.2f}")
    table("Messages/s", "msgs_per_s", _rate)

    add("")
    add("Ratios, same run (throughput of the first over the second)")
    add(f"{'ratio':18s}{head}")
    for a, b in RATIOS:
        if a in transports and b in transports:
            add(f"{a + '/' + b:18s}"[:18] + "".join(f"{_ratio(results.gbps(a, s), results.gbps(b, s)):>{w}s}"
                                                      for s in sizes))

    add("")
    add(f"Round trip, {fmt_size(RTT_SIZE)} ping-pong, microseconds")
    add(f"{'transport':14s}{'p50':>{w}s}{'p99':>{w}s}{'samples':>{w}s}")
    for t in transports:
        if t == "memcpy":
            continue
        r = results.latency(t)
        if r:
            add(f"{t:14s}{r['p50_us']:>{w}.1f}{r['p99_us']:>{w}.1f}{r['n']:>{w}d}")
        else:
            add(f"{t:14s}  {unmeasured(t)}")
    shm_rtt, zmq_rtt = results.latency("shm"), results.latency("zmq-ipc")
    if shm_rtt and zmq_rtt:
        add(f"shm p50 / zmq-ipc p50 = {shm_rtt['p50_us'] / zmq_rtt['p50_us']:.2f}x")

    if rounds > 1:
        add("")
        add("Spread over rounds (16 MiB GB/s; 4 KiB RTT p50 us)")
        for t in transports:
            tp = results.throughput(t, 16 * MiB)
            lat = results.latency(t)
            parts = []
            if tp:
                parts.append("GB/s " + " ".join(f"{v:.2f}" for v in tp["rounds"]))
            if lat:
                parts.append("p50 " + " ".join(f"{v:.1f}" for v in lat["rounds"]))
            if parts:
                add(f"  {t:10s}" + "; ".join(parts))

    add("")
    add("Memory (default options)")
    add(f"  per shm connection: {ring['total']:,} B = {ring['control_plus_ring'] - ring['ring']} B control "
        f"+ {ring['ring'] >> 20} MiB ring (consumer) + {ring['credit']} B credit (producer); the largest "
        f"message kept in the ring is {ring['max_record'] / MiB:.0f} MiB")
    pool = results.info.get("shm", {})
    held = pool.get("grant_pool_bytes")
    add(f"  per worker: its inbound connections' rings, plus granted regions for messages of "
        f"{ring['grant_min'] >> 20} MiB and more, at most {ring['grant_bytes'] >> 20} MiB all connections "
        f"together" + (f" (the shm consumer held {held / MiB:.0f} MiB of them at the end of its run)"
                       if held is not None else ""))
    add(f"  messages over {ring['grant_bytes'] >> 20} MiB stream through the ring in {ring['chunk'] >> 20} MiB "
        f"chunks into a buffer the consumer allocates")

    add("")
    add("Targets (ratios of this run)")

    def target(label, value, goal, detail, at_most=False):
        verdict = "SKIP" if value is None else ("PASS" if (value <= goal if at_most else value >= goal) else "FAIL")
        add(f"  {verdict:4s}  {label:38s} {detail}")

    def throughput_target(a, b, factor, size):
        va, vb = results.gbps(a, size), results.gbps(b, size)
        label = f"{a} {fmt_size(size)} >= {factor:g}x {b}"
        if va is None or vb is None:
            missing = b if va is not None else a
            why = unmeasured(missing)
            target(label, None, 0, f"({missing}: {'not measured' if why == '-' else why})")
        else:
            target(label, va / vb, factor, f"{va:.2f} vs {vb:.2f} GB/s = {va / vb:.3f}x")

    for a, b, factor, at in TARGETS:
        for size in at:
            if size in sizes:
                throughput_target(a, b, factor, size)
    # Like for like: both sides write the output once in the stage (memcpy's rate), then mpi moves it.
    for size in (64 * MiB, 185 * MiB):
        zc, cp, mpi = (results.gbps(t, size) for t in ("shm-zero-copy", "memcpy", "mpi"))
        label = f"shm-zero-copy {fmt_size(size)} >= 1.5x write+mpi"
        if size in sizes and None not in (zc, cp, mpi):
            both = 1 / (1 / cp + 1 / mpi)
            target(label, zc / both, 1.5, f"{zc:.2f} vs {both:.2f} GB/s = {zc / both:.3f}x (information)")
    if shm_rtt and zmq_rtt:
        ratio = shm_rtt["p50_us"] / zmq_rtt["p50_us"]
        target("shm 4 KiB RTT p50 <= 0.5x zmq-ipc", ratio, 0.5,
               f"{shm_rtt['p50_us']:.1f} vs {zmq_rtt['p50_us']:.1f} us = {ratio:.3f}x", at_most=True)
    else:
        target("shm 4 KiB RTT p50 <= 0.5x zmq-ipc", None, 0, "(not measured)")
    target("default ring <= 64 MiB", (64 * MiB) / ring["ring"], 1.0,
           f"{ring['ring'] >> 20} MiB ring, {ring['total']:,} B per connection")
    target("grant pool per worker <= 512 MiB", (512 * MiB) / ring["grant_bytes"], 1.0,
           f"{ring['grant_bytes'] >> 20} MiB")
    for t, errors in results.errors.items():
        add(f"  note: {t} failed in {len(errors)} of {rounds} rounds: {errors[-1]}")
    return "\n".join(lines)


def to_json(results: Results, machine: dict, ring: dict) -> dict:
    throughput = []
    for t, s in results.tp:
        r = results.throughput(t, s)
        if r["ok"]:
            throughput.append({"transport": t, "size_bytes": s, "gb_per_s": round(r["gb_per_s"], 4),
                               "msgs_per_s": round(r["msgs_per_s"], 2)})
    rtt = []
    for t in results.rtt:
        r = results.latency(t)
        rtt.append({"transport": t, "p50_us": round(r["p50_us"], 2), "p99_us": round(r["p99_us"], 2)})
    return {"machine": machine, "throughput": throughput, "rtt_4k": rtt, "ring_bytes_per_connection": ring["total"],
            "grant_pool_bytes_per_worker": ring["grant_bytes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run (under a minute): fewer iterations")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--sizes", help="comma-separated sizes, e.g. 4K,16M (default: 4K,1M,16M,64M,185M)")
    parser.add_argument("--transports", help=f"comma-separated subset of {','.join(TRANSPORTS)}")
    parser.add_argument("--rounds", type=int, help="run everything this many times, interleaved, and report "
                                                   "the median (default 3, quick 1)")
    parser.add_argument("--seconds", type=float, help="timed window per size (default 1.0, quick 0.12)")
    parser.add_argument("--rtt-iters", type=int, help="ping-pong round trips (default 20000, quick 2000; 0 skips)")
    parser.add_argument("--shm-options", metavar="JSON", type=json.loads, default={},
                        help='open_transport options for shm, e.g. \'{"ring_bytes": 67108864}\' (default: none)')
    parser.add_argument("--tcp-options", metavar="JSON", type=json.loads, default={},
                        help="open_transport options for tcp (default: none)")
    parser.add_argument("--mpi-worker", metavar="PLAN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.mpi_worker:
        plan = json.loads(args.mpi_worker)
        _mpi_worker(Plan(**{**plan, "sizes": tuple(plan["sizes"])}))
        return 0

    sizes = tuple(parse_size(s) for s in args.sizes.split(",")) if args.sizes else tuple(SIZES)
    transports = [t.strip() for t in args.transports.split(",")] if args.transports else list(TRANSPORTS)
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        parser.error(f"unknown transports {', '.join(sorted(unknown))}; choose from {', '.join(TRANSPORTS)}")
    params = dict(QUICK if args.quick else FULL)
    if args.seconds:
        params["seconds"] = args.seconds
    if args.rtt_iters is not None:
        params["rtt_iters"] = args.rtt_iters
    rounds = args.rounds or (1 if args.quick else 3)
    options = {name: opts for name, opts in (("shm", args.shm_options), ("tcp", args.tcp_options)) if opts}
    plan = Plan(sizes=sizes, options=options, **params)
    machine = machine_info("quick" if args.quick else "full")
    machine["rounds"] = rounds
    if options:
        machine["transport_options"] = options

    def log(text):
        print(text, file=sys.stderr, flush=True)

    results = Results()
    ring = default_shm_ring()
    ipc_dir = tempfile.mkdtemp(prefix="opbench-zmq-")
    started = time.monotonic()
    try:
        # Rounds interleave the transports, so a burst of outside load hits all of them alike.
        for i in range(rounds):
            for t in transports:
                if results.status.get(t, "").startswith("not installed"):
                    continue
                log(f"{t} (round {i + 1} of {rounds}) ...")
                try:
                    if t == "memcpy":
                        run_memcpy(plan, results, log)
                    elif t in ("shm", "shm-zero-copy", "tcp"):
                        run_pair(t, _aio_worker, (t,), plan, results, log)
                    elif t.startswith("zmq-"):
                        run_pair(t, _zmq_worker_entry, (t.removeprefix("zmq-"), ipc_dir), plan, results, log)
                    elif t == "mpi":
                        run_mpi(plan, results, log)
                except FileNotFoundError as exc:
                    results.status[t] = f"not installed ({exc.args[0]} missing)"
                    log(f"  {t}: {results.status[t]}")
                except BenchError as exc:
                    text = str(exc).strip().splitlines()
                    results.errors[t].append((text[-1] if text else "?")[:100])
                    log(f"  {t}: {exc}")
    except KeyboardInterrupt:
        log("interrupted; every process started here has been stopped")
        return 130
    finally:
        shutil.rmtree(ipc_dir, ignore_errors=True)
    for t in transports:
        if results.measured(t):
            results.status[t] = "ok"
        elif t in results.errors:
            results.status[t] = "error: " + results.errors[t][-1][:60]
    machine["loadavg_end"] = list(os.getloadavg())
    machine["wall_s"] = round(time.monotonic() - started, 1)
    for t, info in results.info.items():
        if t == "memcpy":
            machine["memcpy_method"] = {k: sorted(v) for k, v in info["method"].items()}
        elif t == "mpi":
            machine["mpi_library"] = info["library"]
            machine["mpi_flags"] = info["flags"]
        elif "loop" in info:
            machine.setdefault("event_loop", {})[t] = info["loop"]

    print(report(results, plan, transports, machine, ring))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, machine, ring), indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if results.errors else 0


def _zmq_worker_entry(kind: str, ipc_dir: str, role: str, ctl, peer, plan: Plan) -> None:
    _zmq_worker(kind, role, ctl, peer, plan, ipc_dir)


if __name__ == "__main__":
    sys.exit(main())
