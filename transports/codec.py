"""Tensor codec: a msgpack *meta* block plus one flat payload.

A message is a small header (a msgpack-able dict) and named tensors. It is
encoded as::

    meta    = msgpack({"v": 1, "h": header, "n": payload_bytes,
                       "t": [[name, dtype, shape, offset, nbytes], ...]})
    payload = tensor bytes, each starting at a multiple of ALIGN

Tensors are made contiguous (strides are not kept, the values and shape
are); CUDA tensors are copied to host. Decoding builds tensors that *view*
the payload buffer, so a payload that lives in a ring is read without a copy.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from dataclasses import dataclass

import msgpack
import numpy
import torch

from .errors import CodecError

VERSION = 1
ALIGN = 64
MAX_META_BYTES = 1 << 20

#: dtypes that may cross the wire; anything else from a peer is rejected.
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
        torch.bool, torch.complex64, torch.complex128,
    )
}
_NAMES = {d: n for n, d in DTYPES.items()}


#: Payloads at least this large get memory of their own from mmap (see payload_buffer).
LARGE = 32 << 20


def payload_buffer(n: int):
    """Writable memory for a received payload of ``n`` bytes.

    Up to ``LARGE`` (glibc's largest mmap threshold) it comes from the heap
    (``numpy.empty``: not zero-filled), whose pages are reused, already
    faulted, message after message: a fresh mapping per 1 MiB message cost
    ~400 us of page faults, eight times the copy. Larger payloads get an
    anonymous mapping advised to use huge pages: a fresh 185 MiB buffer takes
    a page fault every 4 KiB while it is filled, which halves the copy rate.
    Tensors decoded from it keep the memory alive.
    """
    if n < LARGE:
        return numpy.empty(n, dtype=numpy.uint8)
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # transparent huge pages off: still correct, only slower
            pass
    return m


def align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Encoded:
    """An encoded message: ``meta`` bytes and the payload as ordered parts.

    ``parts`` laid end to end (alignment gaps included) are exactly
    ``nbytes`` long; transports write them without joining them first. With
    ``encode(..., keep_device=True)`` a part may be a device tensor (flat,
    uint8) for a transport that copies it straight to its destination;
    :meth:`on_host` gives the same message with every part in host memory.
    """

    meta: bytes
    parts: tuple[memoryview | torch.Tensor, ...]
    nbytes: int

    def on_host(self) -> Encoded:
        if not any(isinstance(p, torch.Tensor) for p in self.parts):
            return self
        return Encoded(self.meta, tuple(_bytes_of(p) if isinstance(p, torch.Tensor) else p for p in self.parts),
                       self.nbytes)


def _bytes_of(t: torch.Tensor) -> memoryview:
    # Every call here is on the small-message path: no op that the tensor does not need.
    if t.device.type != "cpu":
        t = t.detach().cpu()
    elif t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype is not torch.uint8 or t.dim() != 1:
        t = t.reshape(-1).view(torch.uint8)
    return memoryview(t.numpy())


def _device_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def encode(header: Mapping, tensors: Mapping[str, torch.Tensor] | None = None, *,
           keep_device: bool = False) -> Encoded:
    """Encode a header and named tensors; raise CodecError for what cannot travel.

    ``keep_device``: a tensor on a device (CUDA) stays there as a part (see :class:`Encoded`)
    instead of being copied to a host tensor first."""
    if not isinstance(header, Mapping):
        raise CodecError(f"header must be a mapping, not {type(header).__name__}")
    table = []
    parts: list[memoryview] = []
    offset = 0
    for name, t in (tensors or {}).items():
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        dtype = _NAMES.get(t.dtype)
        if dtype is None:
            raise CodecError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        data = _device_bytes(t) if keep_device and t.device.type != "cpu" else _bytes_of(t)
        start = align(offset)
        if start > offset:
            parts.append(memoryview(bytes(start - offset)))
        table.append([str(name), dtype, list(t.shape), start, data.nbytes])
        if data.nbytes:
            parts.append(data)
        offset = start + data.nbytes
    try:
        meta = msgpack.packb({"v": VERSION, "h": dict(header), "n": offset, "t": table})
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"header is not msgpack-serialisable: {exc}") from exc
    if len(meta) > MAX_META_BYTES:
        raise CodecError(f"header too large ({len(meta)} bytes > {MAX_META_BYTES})")
    return Encoded(meta, tuple(parts), offset)


def _is_int(x) -> bool:
    return type(x) is int  # msgpack decodes integers as int exactly; a bool is not one


def decode_meta(meta: bytes | memoryview) -> dict:
    """Parse and validate a meta block (bytes from a peer: trust nothing)."""
    if len(meta) > MAX_META_BYTES:
        raise CodecError(f"meta block too large ({len(meta)} bytes)")
    try:
        m = msgpack.unpackb(meta, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"meta block is not valid msgpack: {exc}") from exc
    if not isinstance(m, dict) or m.get("v") != VERSION:
        raise CodecError("meta block has no supported version")
    h, n, table = m.get("h"), m.get("n"), m.get("t")
    if not isinstance(h, dict) or not _is_int(n) or n < 0 or not isinstance(table, list):
        raise CodecError("meta block is missing header, size or tensor table")
    names = set()
    for row in table:
        if not (isinstance(row, list) and len(row) == 5):
            raise CodecError(f"bad tensor table row {row!r:.80}")
        name, dtype, shape, off, nbytes = row
        if not isinstance(name, str) or name in names:
            raise CodecError(f"tensor name {name!r:.40} is not a string or repeats")
        names.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CodecError(f"tensor {name!r}: unsupported dtype {dtype!r:.40}")
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise CodecError(f"tensor {name!r}: bad shape {shape!r:.80}")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = DTYPES[dtype].itemsize
        if not (_is_int(off) and _is_int(nbytes)) or nbytes != numel * itemsize:
            raise CodecError(f"tensor {name!r}: {nbytes} bytes do not match shape {shape} of {dtype}")
        if off < 0 or off % itemsize or off + nbytes > n:
            raise CodecError(f"tensor {name!r}: bytes [{off}, {off + nbytes}) outside payload of {n}")
    return m


def view_bytes(buffer, offset: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor viewing ``nbytes`` of ``buffer`` at ``offset``, holding a buffer export on it.

    Not ``torch.frombuffer``: it keeps only a reference, no export, so a mapping
    it views could be closed (unmapped) under a live tensor; with an export the
    mapping's close fails (BufferError) and it is unmapped when the last tensor goes.
    """
    return torch.from_numpy(numpy.frombuffer(buffer, dtype=numpy.uint8, count=nbytes, offset=offset))


def decode_tensors(meta: dict, payload) -> dict[str, torch.Tensor]:
    """Tensors that view ``payload`` (a writable buffer of ``meta['n']`` bytes).

    The caller owns the buffer's lifetime: a view into a ring is valid only
    until the record is released.
    """
    out: dict[str, torch.Tensor] = {}
    size = memoryview(payload).nbytes
    if size < meta["n"]:
        raise CodecError(f"payload has {size} bytes, meta says {meta['n']}")
    for name, dtype, shape, off, nbytes in meta["t"]:
        dt = DTYPES[dtype]
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dt)
            continue
        raw = view_bytes(payload, off, nbytes)
        if dt is not torch.uint8:
            raw = raw.view(dt)
        out[name] = raw if len(shape) == 1 and raw.shape[0] == shape[0] else raw.view(shape)
    return out
