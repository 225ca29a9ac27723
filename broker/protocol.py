"""The control-plane wire protocol: small msgpack maps over ZeroMQ.

The broker binds a ROUTER socket; each worker connects a DEALER whose
routing id is its worker id, so a worker that reconnects keeps its identity.
Every body is one msgpack map ``{"v": VERSION, "k": KIND, ...}``. Tensors
never travel here: TASK/SEND only say where the data plane should move them.

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

VERSION = 1
MAX_BODY = 64 << 20  # a TASK may carry the job's input image

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


def unpack(frame: bytes) -> dict:
    """Decode and validate one body; raise BadMessage with a readable reason."""
    if len(frame) > MAX_BODY:
        raise BadMessage(f"body of {len(frame)} bytes exceeds {MAX_BODY}")
    try:
        body = msgpack.unpackb(frame, raw=False)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise BadMessage(f"not msgpack: {exc}") from None
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
