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
    FAILED     job, stage, reason, retryable, to?, to_stage?
    DISCONNECT                                   (graceful leave after a drain)

Broker to worker::

    REGISTERED heartbeat_s, liveness
    TASK       job, stage, attempt, params, inputs, payload?, binding?
    SEND       job, stage, to, to_stage, descriptor, names, binding?

``binding`` identifies one binding of a task to a worker (a new one each time
the task is queued again); a SEND passes the consumer's on, in the data-plane
header, so a worker never mistakes inputs sent for an earlier binding of the
same task for those of the current one.
    RELEASE    job, stage
    CANCEL     job, stage
    DRAIN
    HEARTBEAT
    ERROR      reason, reregister

Clients (the benchmark, batch submitters) may use the same socket::

    SUBMIT     workflow, params, payload?        -> SUBMITTED job | ERROR

Every field of every message is checked on arrival, before anything reads
it: ``SCHEMA`` declares each kind's fields once (type, range, length, the
shape and size of nested maps and lists, which ones may be absent), and
:func:`validate` refuses a message that breaks it with a reason naming the
field (``"HEARTBEAT: field 'stats.auto_choices.shm' not int"``). So a peer,
registered or not, can make the broker keep, show or log only bounded,
well-typed data. Fields not declared are ignored. ``validate`` runs for
every message both ways, so each declaration compiles once into plain
checks (a good str field costs no call at all).
"""

from __future__ import annotations


from dataclasses import dataclass
from itertools import repeat
from typing import Any, Callable

import msgpack

VERSION = 2  # 2: a frame may be an array of messages
MAX_BODY = 64 << 20  # a TASK may carry the job's input image
BATCH_BYTES = 256 << 10  # messages are joined into one frame up to about this size

# Bounds of what a peer may say. Generous for every sender we have (tests/broker/test_hostile.py
# checks each against them); tight enough that no field can make the broker keep, log or
# show much of a peer's input.
NAME = 256  # job ids, stage, workflow and worker names, map keys
REASON = 16 << 10  # FAILED and ERROR reasons
MAX_CAPACITY = 4096  # task slots one worker may offer
MAX_COUNT = 1 << 31  # step, total, load, attempt
BINDING_MAX = (1 << 63) - 1
_FLOAT_MAX = 1.7976931348623157e308  # a range check against it refuses inf and nan too


# -- field specs: what one value may be ----------------------------------------------------------------
#
# Each spec compiles once into ``check(value) -> None | (path, why)``: None when the value is
# fine, else where below the field it went wrong (".key", "[3]", "" for the value itself)
# and why. The checks use ``type(v) is T``: msgpack makes exact builtins, and bool is not int.

Check = Callable[[Any], "tuple[str, str] | None"]


def _show(value: Any, limit: int = 40) -> str:
    """A peer's value for a refusal reason, cut short: its input is never echoed at length
    (nor turned into a long text first: a 60 MB string is cut before its repr)."""
    t = type(value)
    if t is str or t is bytes:
        text = repr(value[:limit])
    elif t in (int, float, bool, type(None)):
        text = repr(value)
    elif t is dict or t is list:
        return f"a {t.__name__} of {len(value)}"
    else:
        return f"a {t.__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Str:
    max_len: int = NAME
    name = "str"

    def compile(self) -> Check:
        limit = self.max_len

        def check(v):
            if type(v) is not str:
                return "", "not str"
            if len(v) > limit:
                return "", f"longer than {limit} characters"
            return None
        return check


@dataclass(frozen=True)
class Int:
    lo: int = -(1 << 63)
    hi: int = (1 << 64) - 1
    name = "int"

    def compile(self) -> Check:
        lo, hi = self.lo, self.hi

        def check(v):
            if type(v) is not int:
                return "", "not int"
            if not lo <= v <= hi:
                return "", f"{_show(v)} not in {lo}..{hi}"
            return None
        return check


@dataclass(frozen=True)
class Num:
    """An int or a finite float."""
    lo: float = -_FLOAT_MAX
    hi: float = _FLOAT_MAX
    name = "number"

    def compile(self) -> Check:
        lo, hi = self.lo, self.hi

        def check(v):
            t = type(v)
            if t is not float and t is not int:
                return "", "not number"
            if not lo <= v <= hi:  # also false for nan
                return "", f"{_show(v)} not a finite number in {lo:g}..{hi:g}"
            return None
        return check


@dataclass(frozen=True)
class Bool:
    name = "bool"

    def compile(self) -> Check:
        def check(v):
            return None if type(v) is bool else ("", "not bool")
        return check


@dataclass(frozen=True)
class Map:
    """A map of str keys (at most ``NAME`` characters) to ``values``, at most ``max_items`` of them."""
    values: Any
    max_items: int = 64
    name = "map"

    def compile(self) -> Check:
        limit, value = self.max_items, self.values.compile()

        def check(v):
            if type(v) is not dict:
                return "", "not map"
            if len(v) > limit:
                return "", f"has {len(v)} items, more than {limit}"
            for key, item in v.items():
                if type(key) is not str or len(key) > NAME:
                    return "", f"has a key {_show(key)} that is not a str of at most {NAME} characters"
                bad = value(item)
                if bad is not None:
                    return f".{key if len(key) <= 40 else key[:37] + '...'}{bad[0]}", bad[1]
            return None

        if type(self.values) is not Num:
            return check
        lo, hi = self.values.lo, self.values.hi

        def numbers(v):  # DONE's timings: checked inline, a call per item would cost more than the check
            if type(v) is dict and len(v) <= limit:
                for key, item in v.items():
                    t = type(item)
                    if type(key) is not str or len(key) > NAME or t is not float and t is not int \
                            or not lo <= item <= hi:
                        return check(v)  # says what is wrong
                return None
            return check(v)
        return numbers


@dataclass(frozen=True)
class List:
    items: Any
    max_items: int = 256
    name = "list"

    def compile(self) -> Check:
        limit, item = self.max_items, self.items.compile()

        def check(v):
            if type(v) is not list:
                return "", "not list"
            if len(v) > limit:
                return "", f"has {len(v)} items, more than {limit}"
            for i, x in enumerate(v):
                bad = item(x)
                if bad is not None:
                    return f"[{i}]{bad[0]}", bad[1]
            return None
        return check


@dataclass(frozen=True)
class Record:
    """A map with these fields (each a spec, or ``Opt(spec)``); other fields are ignored."""
    fields: dict
    name = "map"

    def compile(self) -> Check:
        fields = _compile_fields(self.fields)

        def check(v):
            if type(v) is not dict:
                return "", "not map"
            for field, optional, test, _, _ in fields:
                x = v.get(field)
                if x is None:
                    if optional:
                        continue
                    return f".{field}", "missing"
                bad = test(x)
                if bad is not None:
                    return f".{field}{bad[0]}", bad[1]
            return None
        return check


@dataclass(frozen=True)
class Either:
    """One of ``options``, chosen by the value's type (the first option that takes it)."""
    options: tuple
    name = "value"

    def compile(self) -> Check:
        by_type: dict[type, Check] = {}
        for spec in self.options:
            for t in _TAKES[type(spec)]:
                by_type.setdefault(t, spec.compile())
        names = " or ".join(spec.name for spec in self.options)

        def check(v):
            test = by_type.get(type(v))
            return ("", f"not {names}") if test is None else test(v)
        return check


@dataclass(frozen=True)
class Data:
    """Any msgpack data of maps (str keys), lists and scalars, bounded: at most ``max_depth``
    containers deep, ``max_items`` items in all, strings of ``max_str`` characters and byte
    strings of ``max_bytes`` (0: none allowed). For what the broker keeps without reading:
    descriptors, job parameters, results."""
    max_depth: int = 6
    max_items: int = 256
    max_str: int = 4096
    max_bytes: int = 0
    name = "map"

    def compile(self) -> Check:
        max_depth, max_items, max_str, max_bytes = self.max_depth, self.max_items, self.max_str, self.max_bytes
        scalars = frozenset((int, float, bool, type(None)))

        def check(v):
            if type(v) is not dict:
                return "", "not map"
            budget = max_items
            todo = [(v, 1)]
            while todo:  # iterative: a hostile depth cannot reach Python's recursion limit
                node, depth = todo.pop()
                if depth > max_depth:
                    return "", f"nested deeper than {max_depth}"
                budget -= len(node)
                if budget < 0:
                    return "", f"holds more than {max_items} items"
                for key, x in node.items() if type(node) is dict else zip(repeat(""), node):
                    if type(key) is not str or len(key) > NAME:
                        return "", f"has a key {_show(key)} that is not a str of at most {NAME} characters"
                    t = type(x)
                    if t in scalars:
                        continue
                    if t is str:
                        if len(x) > max_str:
                            return "", f"holds a str longer than {max_str} characters"
                    elif t is dict or t is list:
                        todo.append((x, depth + 1))
                    elif t is bytes:
                        if len(x) > max_bytes:
                            return "", f"holds bytes longer than {max_bytes}"
                    else:
                        return "", f"holds a {t.__name__}"
            return None
        return check


@dataclass(frozen=True)
class Opt:
    """A field that may be absent (or nil)."""
    spec: Any


_TAKES = {Str: (str,), Int: (int,), Num: (int, float), Bool: (bool,), Map: (dict,), List: (list,),
          Record: (dict,), Data: (dict,)}

JOB_ID = Str()
BINDING = Int(0, BINDING_MAX)
STAGE = Str()
DESCRIPTOR = Data(max_depth=6, max_items=256, max_str=4096)  # auto: media -> rdma -> its port
PARAMS = Data(max_depth=8, max_items=4096, max_str=64 << 10)
PAYLOAD = Data(max_depth=4, max_items=64, max_str=64 << 10, max_bytes=MAX_BODY)  # the input image
COUNTERS = Map(Int(), max_items=64)  # e.g. auto_choices: medium -> connections
STATS = Map(Either((Int(), Num(), Str(), COUNTERS)), max_items=64)  # transport.stats() and more
INPUTS = List(Record({"stage": STAGE, "names": List(Str(), max_items=256)}), max_items=256)

# kind -> its fields: a spec for a required one, Opt(spec) for one that may be absent.
# One declaration per kind; fields not declared are ignored (never read).
SCHEMA: dict[str, dict[str, Any]] = {
    # worker -> broker
    # kind/model: what the worker runs; the broker refuses one that differs from the stage's declaration
    "REGISTER": {"stage": STAGE, "capacity": Int(1, MAX_CAPACITY), "descriptor": DESCRIPTOR,
                 "info": Opt(Data(max_depth=4, max_items=64, max_str=4096)), "kind": Opt(Str()),
                 "model": Opt(Str())},
    # running: [job, stage] of each task the worker is computing now (vouches for it, core invariant 7)
    "HEARTBEAT": {"load": Opt(Int(0, MAX_COUNT)), "stats": Opt(STATS),
                  "running": Opt(List(List(Str(), max_items=2), max_items=MAX_CAPACITY))},
    # resumed_from_step: it continues from a checkpoint of that step (broker/core.py, invariant 11)
    "STARTED": {"job": JOB_ID, "stage": STAGE, "resumed_from_step": Opt(Int(0, MAX_COUNT))},
    # the task's state after `step` steps now lives with worker `holder` (its TASK's checkpoint_to)
    "CHECKPOINT": {"job": JOB_ID, "stage": STAGE, "step": Int(1, MAX_COUNT), "holder": Str()},
    # a draining worker stopped the task after `step` steps and left its state with checkpoint_to
    "HANDOFF": {"job": JOB_ID, "stage": STAGE, "step": Int(0, MAX_COUNT)},
    "PROGRESS": {"job": JOB_ID, "stage": STAGE, "step": Int(0, MAX_COUNT), "total": Int(0, MAX_COUNT)},
    "DONE": {"job": JOB_ID, "stage": STAGE, "timings": Opt(Map(Num(), max_items=32)),
             "result": Opt(Data(max_depth=8, max_items=1024, max_str=4096))},
    # to/to_stage: the held outputs are fine, but the consumer's worker ``to`` could not be reached
    "FAILED": {"job": JOB_ID, "stage": STAGE, "reason": Str(REASON), "retryable": Bool(),
               "to": Opt(Str()), "to_stage": Opt(STAGE)},
    "DISCONNECT": {},
    # client -> broker
    "SUBMIT": {"workflow": Str(), "params": PARAMS, "payload": Opt(PAYLOAD)},
    # broker -> worker or client
    # data_key: this worker's data-plane key (hex), for checking what peers send it (onepiece.credentials);
    # auth, checkpoint_auth: the receiver's MAC of the message; link, checkpoint_link: what lets this
    # worker connect to the receiver (its handshake proves it)
    "REGISTERED": {"heartbeat_s": Num(1e-3, 86400.0), "liveness": Int(1, 1000), "data_key": Opt(Str(64))},
    "TASK": {"job": JOB_ID, "workflow": Opt(Str()), "stage": STAGE, "attempt": Int(1, MAX_COUNT),
             "params": PARAMS, "inputs": INPUTS, "payload": Opt(PAYLOAD), "binding": Opt(BINDING),
             "checkpoint_to": Opt(Record({"worker": Str(), "stage": STAGE, "descriptor": DESCRIPTOR})),
             "resume_step": Opt(Int(0, MAX_COUNT)), "checkpoint_auth": Opt(Str(64)),
             "checkpoint_link": Opt(Str(64))},
    # resume_step: also ship the consumer's checkpoint of (at least) that step, kept here
    "SEND": {"job": JOB_ID, "stage": STAGE, "to": Str(), "to_stage": STAGE, "descriptor": DESCRIPTOR,
             "names": List(Str(), max_items=256), "binding": Opt(BINDING),
             "resume_step": Opt(Int(0, MAX_COUNT)), "auth": Opt(Str(64)), "link": Opt(Str(64))},
    "RELEASE": {"job": JOB_ID, "stage": STAGE},
    "CANCEL": {"job": JOB_ID, "stage": STAGE},
    "DRAIN": {},
    "ERROR": {"reason": Str(REASON), "reregister": Opt(Bool())},
    "SUBMITTED": {"job": JOB_ID},
}


def _compile_fields(fields: dict) -> tuple:
    """``(field, optional, check, type name, str limit)`` for each field of a declaration; the
    str limit (-1 for other types) lets :func:`validate` pass a good str without a call."""
    out = []
    for field, spec in fields.items():
        optional = isinstance(spec, Opt)
        spec = spec.spec if optional else spec
        out.append((field, optional, spec.compile(), spec.name, spec.max_len if type(spec) is Str else -1))
    return tuple(out)


_CHECKS = {kind: _compile_fields(fields) for kind, fields in SCHEMA.items()}


class BadMessage(ValueError):
    """A control message that is not msgpack, not ours, or has a field missing or out of bounds."""


def pack(message: str, /, **fields: Any) -> bytes:
    return msgpack.packb({"v": VERSION, "k": message, **fields})


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
        return [], [f"not msgpack: {str(exc)[:100]}"]
    good: list[dict] = []
    bad: list[str] = []
    for m in body if isinstance(body, list) else (body,):
        try:
            good.append(validate(m))
        except BadMessage as exc:
            bad.append(str(exc))
    return good, bad


def validate(body: object) -> dict:
    """``body`` if it is a well-formed message of this version, else BadMessage naming the field."""
    if type(body) is not dict:
        raise BadMessage("body is not a map")
    if body.get("v") != VERSION:
        raise BadMessage(f"unsupported protocol version {_show(body.get('v'))}")
    kind = body.get("k")
    fields = _CHECKS.get(kind) if type(kind) is str else None
    if fields is None:
        raise BadMessage(f"unknown kind {_show(kind)}")
    for field, optional, check, name, str_limit in fields:
        value = body.get(field)
        if type(value) is str and len(value) <= str_limit or value is None and optional:
            continue
        bad = check(value)
        if bad is not None:
            path, why = bad
            if not path and why.startswith("not "):  # the wording refusals have always had
                why = f"missing or not {name}"
            raise BadMessage(f"{kind}: field {field + path!r} {why}")
    return body


# the kinds of problem a refusal reason can describe, by the reason's start
_PROBLEMS = (("frame of ", "frame too large"), ("not msgpack", "not msgpack"), ("body is not", "not a map"),
             ("unsupported protocol version", "version"), ("unknown kind", "unknown kind"))


def problem(reason: str) -> str:
    """What kind of problem a refusal reason (from :func:`unpack_frame`) describes, from a small
    closed set whatever the peer sent: the message kind for a bad field, else one of
    ``_PROBLEMS``, else "other". For counting and rate-limiting the refusals' log lines."""
    head = reason.partition(":")[0]
    if head in SCHEMA:
        return head
    return next((name for start, name in _PROBLEMS if reason.startswith(start)), "other")

