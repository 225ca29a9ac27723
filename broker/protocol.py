"""The control-plane wire protocol: small msgpack maps over ZeroMQ.

The broker binds a ROUTER socket; each worker connects a DEALER whose
routing id is its worker id, so a worker that reconnects keeps its identity.
Every message is one msgpack map ``{"v": VERSION, "k": KIND, ...}``. A ZeroMQ
frame carries one message, or a batch of them as a msgpack array of maps:
a sender joins what it has for one peer in one event-loop turn
(:func:`frames`), so a busy peer pays one send and one wake-up for many
messages. Tensors never travel here: TASK/SEND only say where the data plane
should move them.

Worker to broker::

    REGISTER   stage, capacity, descriptor, info   -> REGISTERED | ERROR
    HEARTBEAT  load
    STARTED    job, stage
    PROGRESS   job, stage, step, total
    DONE       job, stage, timings, result?
    FAILED     job, stage, reason, retryable
    DISCONNECT                                   (graceful leave after a drain)

Broker to worker::

    REGISTERED heartbeat_s, liveness
    TASK       job, stage, attempt, params, inputs, payload?
    SEND       job, stage, to, to_stage, descriptor, names
    RELEASE    job, stage
    CANCEL     job, stage
    DRAIN
    HEARTBEAT
    ERROR      reason, reregister

Clients (the benchmark, batch submitters) may use the same socket::

    SUBMIT     workflow, params, payload?        -> SUBMITTED job | ERROR
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 2  # 2: a frame may be an array of messages
MAX_BODY = 64 << 20  # a TASK may carry the job's input image
BATCH_BYTES = 256 << 10  # messages are joined into one frame up to about this size

# kind -> required fields and their types
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "REGISTER": {"stage": str, "capacity": int, "descriptor": dict},
    "HEARTBEAT": {},
    "STARTED": {"job": str, "stage": str},
    "PROGRESS": {"job": str, "stage": str, "step": int, "total": int},
    "DONE": {"job": str, "stage": str},
    "FAILED": {"job": str, "stage": str, "reason": str, "retryable": bool},
    "DISCONNECT": {},
    "SUBMIT": {"workflow": str, "params": dict},
    "REGISTERED": {"heartbeat_s": (int, float), "liveness": int},
    "TASK": {"job": str, "stage": str, "attempt": int, "params": dict, "inputs": list},
    "SEND": {"job": str, "stage": str, "to": str, "to_stage": str, "descriptor": dict, "names": list},
    "RELEASE": {"job": str, "stage": str},
    "CANCEL": {"job": str, "stage": str},
    "DRAIN": {},
    "ERROR": {"reason": str},
    "SUBMITTED": {"job": str},
}


class BadMessage(ValueError):
    """A control message that is not msgpack, not ours, or lacks a field."""


def pack(kind: str, **fields: Any) -> bytes:
    return msgpack.packb({"v": VERSION, "k": kind, **fields})


def frames(bodies: list[bytes], limit: int = BATCH_BYTES) -> list[bytes]:
    """Join packed messages (from :func:`pack`) into as few frames as fit ``limit`` bytes
    each; a message larger than ``limit`` travels alone. The order is kept. A lone
    message travels as a plain map."""
    groups: list[list[bytes]] = []
    size = 0
    for body in bodies:
        if not groups or size + len(body) > limit:
            groups.append([])
            size = 0
        groups[-1].append(body)
        size += len(body)
    return [group[0] if len(group) == 1 else packed_array(group) for group in groups]


def packed_array(elements: list[bytes]) -> bytes:
    """A msgpack array of already-packed elements: its header, then the elements as they are."""
    n = len(elements)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 1 << 16:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(elements)


def unpack_frame(frame: bytes) -> tuple[list[dict], list[str]]:
    """The messages of one frame (a map, or an array of maps) and why any of them was refused.

    A bad element costs only itself: the others of its batch are still delivered.
    """
    if len(frame) > MAX_BODY:
        return [], [f"frame of {len(frame)} bytes exceeds {MAX_BODY}"]
    try:
        body = msgpack.unpackb(frame, raw=False)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        return [], [f"not msgpack: {exc}"]
    good: list[dict] = []
    bad: list[str] = []
    for m in body if isinstance(body, list) else (body,):
        try:
            good.append(validate(m))
        except BadMessage as exc:
            bad.append(str(exc))
    return good, bad


def validate(body: object) -> dict:
    """``body`` if it is a well-formed message of this version, else BadMessage saying why."""
    if not isinstance(body, dict):
        raise BadMessage("body is not a map")
    if body.get("v") != VERSION:
        raise BadMessage(f"unsupported protocol version {body.get('v')!r}")
    kind = body.get("k")
    schema = SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise BadMessage(f"unknown kind {kind!r}")
    for field, typ in schema.items():
        value = body.get(field)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise BadMessage(f"{kind}: field {field!r} missing or not {getattr(typ, '__name__', typ)}")
    return body
