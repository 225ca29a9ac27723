"""Unit tests of transports/codec.py: no processes, no sockets."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transports import CodecError, codec


def round_trip(header, tensors=None):
    enc = codec.encode(header, tensors)
    payload = bytearray(b"".join(enc.parts))
    assert len(payload) == enc.nbytes
    meta = codec.decode_meta(enc.meta)
    return meta["h"], codec.decode_tensors(meta, payload), payload


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.arange(15).reshape(shape) % 2 == 0
    return (torch.arange(15).reshape(shape) * 7 % 100).to(dtype)


@pytest.mark.parametrize("dtype", codec.DTYPES.values(), ids=codec.DTYPES.keys())
def test_every_dtype_round_trips(dtype):
    tensors = {
        "plain": sample(dtype),
        "transposed": sample(dtype).t(),
        "strided": sample(dtype)[:, ::2],
        "expanded": sample(dtype)[:1].expand(4, 5),
        "scalar": sample(dtype)[1, 1].clone(),
        "empty": sample(dtype)[:0],
    }
    _, out, _ = round_trip({}, tensors)
    assert out.keys() == tensors.keys()
    for name, t in tensors.items():
        assert same(out[name], t), name


def test_special_float_values_keep_their_bits():
    t = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45])
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        _, out, _ = round_trip({}, {"x": t.to(dtype)})
        assert same(out["x"], t.to(dtype))


def test_header_round_trips_and_tensors_are_optional():
    header = {"seq": 3, "nested": {"a": [1, 2.5, None, True]}, "raw": b"\x00\xff", 7: "int key"}
    out_header, out, payload = round_trip(header)
    assert out_header == header and out == {} and len(payload) == 0


def test_layout_is_aligned_and_decoded_tensors_view_the_payload():
    tensors = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(5, dtype=torch.float64)}
    enc = codec.encode({}, tensors)
    offsets = [row[3] for row in codec.decode_meta(enc.meta)["t"]]
    assert all(off % codec.ALIGN == 0 for off in offsets)
    assert enc.nbytes == offsets[-1] + 40
    _, out, payload = round_trip({}, tensors)
    payload[offsets[1]:offsets[1] + 8] = bytes(8)  # zero-copy: editing the buffer edits the tensor
    assert out["b"][0] == 0


def test_cpu_tensors_never_touch_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda used for a CPU tensor")

    for name in ("is_available", "synchronize", "current_device", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    _, out, _ = round_trip({}, {"x": torch.arange(4).view(2, 2).t()})
    assert out["x"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_are_copied_to_host():
    t = torch.arange(10, device="cuda").t()
    _, out, _ = round_trip({}, {"x": t})
    assert out["x"].device.type == "cpu" and torch.equal(out["x"], t.cpu())


@pytest.mark.parametrize("header, tensors", [
    (["not", "a", "dict"], None),
    ({"x": object()}, None),
    ({"big": "x" * (codec.MAX_META_BYTES + 1)}, None),
    ({}, {"x": [1, 2, 3]}),
    ({}, {"x": torch.zeros(2, dtype=torch.uint16)}),
], ids=["non-dict header", "unserialisable header", "header too large", "not a tensor", "unsupported dtype"])
def test_encode_rejects(header, tensors):
    with pytest.raises(CodecError):
        codec.encode(header, tensors)


def meta(**fields) -> bytes:
    m = {"v": 1, "h": {}, "n": 64, "t": [["x", "float32", [2], 0, 8]]}
    m.update(fields)
    return msgpack.packb(m)


@pytest.mark.parametrize("data", [
    b"\xc1",
    b"\x92\x01",
    msgpack.packb([1, 2]),
    meta(v=2),
    meta(h=[1]),
    meta(n=-1),
    meta(t={"x": 1}),
    meta(t=[["x", "float32", [2], 0]]),
    meta(t=[["x", "float31", [2], 0, 8]]),
    meta(t=[["x", "float32", [-2], 0, 8]]),
    meta(t=[["x", "float32", [2.0], 0, 8]]),
    meta(t=[["x", "float32", [2], 0, 12]]),
    meta(t=[["x", "float32", [2], 60, 8]]),
    meta(t=[["x", "float32", [2], -8, 8]]),
    meta(t=[["x", "float32", [2], "0", 8]]),
    bytes(codec.MAX_META_BYTES + 1),
], ids=[
    "bad msgpack", "truncated msgpack", "not a map", "wrong version", "non-dict header", "negative size",
    "table not a list", "short row", "unknown dtype", "negative dim", "float dim", "nbytes mismatch",
    "past the payload end", "negative offset", "offset not an int", "too large",
])
def test_decode_meta_rejects(data):
    with pytest.raises(CodecError):
        codec.decode_meta(data)


@pytest.mark.parametrize("row", [
    ["x", ["float32"], [2], 0, 8], [["x"], "float32", [2], 0, 8], ["x", "float32", [True, 2], 0, 8],
], ids=["unhashable dtype", "unhashable name", "bool dim"])
def test_decode_meta_rejects_odd_types(row):
    with pytest.raises(CodecError):
        codec.decode_tensors(codec.decode_meta(meta(t=[row])), bytearray(64))


def test_decode_tensors_rejects_short_payload():
    m = codec.decode_meta(meta())
    with pytest.raises(CodecError):
        codec.decode_tensors(m, bytearray(63))


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(codec.DTYPES)), shapes, st.booleans()), max_size=5), st.data())
def test_random_shapes_and_dtypes_round_trip(specs, data):
    tensors = {}
    for i, (dtype, shape, transpose) in enumerate(specs):
        nbytes = codec.DTYPES[dtype].itemsize * torch.Size(shape).numel()
        raw = bytearray(data.draw(st.binary(min_size=nbytes, max_size=nbytes)))
        if dtype == "bool":
            raw = bytearray(b % 2 for b in raw)  # other bytes are not valid bools
        t = torch.frombuffer(raw, dtype=torch.uint8).view(codec.DTYPES[dtype]).reshape(shape) if nbytes else \
            torch.empty(shape, dtype=codec.DTYPES[dtype])
        tensors[f"t{i}"] = t.t() if transpose and t.dim() == 2 else t
    _, out, _ = round_trip({"n": len(tensors)}, tensors)
    for name, t in tensors.items():
        assert same(out[name], t), name
