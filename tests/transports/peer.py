"""A transport endpoint in its own process, for the contract tests.

    python -m tests.transports.peer TRANSPORT OPTIONS_JSON ROLE [ARGS...]

It opens an endpoint, prints its descriptor as one JSON line, plays ROLE and
reports on stdout, one JSON object per line:

    sink COUNT [--delay S]     receive COUNT messages, sleeping S before each;
                               print {"seq", "src", "peer", "sum"} per message
    echo COUNT DESCRIPTOR      send each of COUNT received messages back to
                               DESCRIPTOR; print {"echoed": COUNT}
    source DESCRIPTOR SPEC     connect, print {"connected": true}, send the
                               messages SPEC describes, print {"sent", "sums"};
                               with SPEC["go"], wait for a line on stdin after
                               connecting and print {"sending": i} before each send
    exchange DESCRIPTOR SPEC   start sending SPEC to DESCRIPTOR, then receive as
                               many messages (sink lines), then print {"sent", "sums"}
    stall                      never receive; exit when stdin closes

A SPEC is JSON: {"count": N, "sizes": [bytes or [bytes, dtype], ...] (cycled),
"dtype": "uint8", "seed": 0, "name": "p0"}. :func:`messages` builds the same
messages in the test process, and :func:`checksum` digests what arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys

import torch

from transports import codec, open_transport

_BLOCK = 1_000_003  # a prime, so misplaced power-of-two chunks change the digest


def make_tensor(nbytes: int, dtype: str, seed: int) -> torch.Tensor:
    """``nbytes`` of deterministic pseudo-random bytes viewed as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(0, 256, (min(nbytes, _BLOCK),), dtype=torch.uint8, generator=g)
    data = block.repeat(-(-nbytes // _BLOCK))[:nbytes] if nbytes > _BLOCK else block
    return data.view(codec.DTYPES[dtype])


def messages(spec: dict):
    """(header, tensors) for every message of ``spec``."""
    sizes = spec.get("sizes", [1024])
    for i in range(spec.get("count", len(sizes))):
        size = sizes[i % len(sizes)]
        nbytes, dtype = size if isinstance(size, list) else (size, spec.get("dtype", "uint8"))
        tensor = make_tensor(nbytes, dtype, spec.get("seed", 0) * 1_000_000 + i)
        yield {"seq": i, "src": spec.get("name", "")}, {"x": tensor}


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


async def _send_all(sender, spec: dict, started: asyncio.Event | None = None) -> list[str]:
    sums = []
    for header, tensors in messages(spec):
        if spec.get("go"):
            emit({"sending": header["seq"]})
        if started is not None:
            started.set()
        await sender.send(header, tensors, timeout=120)
        sums.append(checksum(tensors))
    return sums


async def _receive(transport, count: int, delay: float = 0.0) -> None:
    for _ in range(count):
        if delay:
            await asyncio.sleep(delay)
        with await transport.recv(timeout=120) as msg:
            emit({"seq": msg.header.get("seq"), "src": msg.header.get("src"), "peer": msg.peer,
                  "sum": checksum(msg.tensors)})


async def sink(transport, args) -> None:
    await _receive(transport, int(args.args[0]), float(args.delay))


async def echo(transport, args) -> None:
    count, descriptor = int(args.args[0]), json.loads(args.args[1])
    async with await transport.connect(descriptor, timeout=30) as sender:
        for _ in range(count):
            with await transport.recv(timeout=120) as msg:
                await sender.send(msg.header, msg.tensors, timeout=120)
    emit({"echoed": count})


async def source(transport, args) -> None:
    descriptor, spec = json.loads(args.args[0]), json.loads(args.args[1])
    async with await transport.connect(descriptor, timeout=30) as sender:
        emit({"connected": True})
        if spec.get("go"):
            await asyncio.to_thread(sys.stdin.readline)
        sums = await _send_all(sender, spec)
    emit({"sent": len(sums), "sums": sums})


async def exchange(transport, args) -> None:
    descriptor, spec = json.loads(args.args[0]), json.loads(args.args[1])
    async with await transport.connect(descriptor, timeout=30) as sender:
        started = asyncio.Event()
        sending = asyncio.create_task(_send_all(sender, spec, started))
        await started.wait()
        await _receive(transport, spec["count"])
        sums = await sending
    emit({"sent": len(sums), "sums": sums})


async def stall(transport, args) -> None:
    await asyncio.to_thread(sys.stdin.read)


ROLES = {"sink": sink, "echo": echo, "source": source, "exchange": exchange, "stall": stall}


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.transports.peer")
    parser.add_argument("transport")
    parser.add_argument("options", help="JSON object of transport options")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("args", nargs="*")
    parser.add_argument("--delay", default="0")
    args = parser.parse_args(argv)
    async with await open_transport(args.transport, **json.loads(args.options)) as transport:
        emit(transport.descriptor)
        await ROLES[args.role](transport, args)


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(sys.argv[1:]))
    else:
        uvloop.run(main(sys.argv[1:]))
