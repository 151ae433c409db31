"""The wire format: exact round trips, a defensive decoder (fuzzed), committed stubs that match the proto."""

from __future__ import annotations

import filecmp

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiosis import BadRequestError, BaseExecutor
from symbiosis.protocol import Direction, OpRequest
from symbiosis.tiny import tiny_config
from symbiosis.transport import parse_address, protogen
from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport.shm import Area
from symbiosis.transport.wire import WIRE_DTYPES, decode_call, decode_tensor, encode_call, encode_tensor, spec_from_json, spec_to_json


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_tensor_round_trip_is_exact(dtype):
    t = (torch.randn(5, 7) * 100).to(WIRE_DTYPES[dtype])
    msg = pb.Tensor.FromString(encode_tensor(t).SerializeToString())
    assert msg.data == t.contiguous().view(torch.uint8).numpy().tobytes()  # raw bytes, nothing else
    assert torch.equal(decode_tensor(msg, copy=True), t)


@pytest.mark.parametrize(
    "compute_dtype, weight_dtype, features", [(None, None, None), (torch.bfloat16, None, (4, 12)), (torch.float32, torch.bfloat16, (0, 1))]
)
def test_call_round_trip(compute_dtype, weight_dtype, features):
    request = OpRequest(
        "model.layers.0.mlp.up_proj", Direction.BACKWARD, torch.randn(3, 8), client_id="c1", priority=1, out_dtype=torch.bfloat16,
        compute_dtype=compute_dtype, features=features, weight_dtype=weight_dtype,
    )
    msg = encode_call(request, 42)
    encode_tensor(request.x, msg.x)
    back = decode_call(pb.OpCall.FromString(msg.SerializeToString()), tenant="t")
    assert back.batch_key() == request.batch_key()
    assert (back.client_id, back.priority, back.out_dtype, back.tenant) == ("c1", 1, torch.bfloat16, "t")
    assert torch.equal(back.x, request.x)
    # a reused message forgets the previous request's options
    assert not encode_call(OpRequest("op", Direction.FORWARD, torch.randn(1, 1)), 43, msg).HasField("features")


def test_spec_travels_as_json():
    spec = BaseExecutor.from_config(tiny_config("llama"), layers=(0, 1)).spec()
    back = spec_from_json(spec_to_json(spec))
    assert (back.ops, back.fusion_groups, back.tensors, back.layer_range) == (spec.ops, spec.fusion_groups, spec.tensors, (0, 1))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: setattr(m.x, "dtype", "complex64"), "unknown tensor dtype"),
        (lambda m: m.x.shape.__setitem__(0, 4), "payload holds"),
        (lambda m: m.x.shape.extend([-1]), "invalid tensor shape"),
        (lambda m: m.x.shape.extend([1] * 9), "invalid tensor shape"),
        (lambda m: setattr(m.x, "data", m.x.data[:-1]), "payload holds"),
        (lambda m: setattr(m, "direction", 7), "unknown direction"),
        (lambda m: setattr(m, "priority", -1), "priority"),
        (lambda m: setattr(m, "out_dtype", "int64"), "out_dtype"),
        (lambda m: setattr(m, "compute_dtype", "int32"), "compute_dtype"),
        (lambda m: setattr(m, "compute_dtype", "float64"), "compute_dtype"),
        (lambda m: setattr(m, "weight_dtype", "int64"), "weight_dtype"),
        (lambda m: m.ClearField("x"), "no tensor"),
        (lambda m: (m.x.region.SetInParent(), setattr(m.x.region, "nbytes", 48)), "outside a shared-memory channel"),
    ],
)
def test_decoder_refuses_malformed_calls(mutate, message):
    msg = encode_call(OpRequest("op", Direction.FORWARD, torch.randn(3, 4)), 1)
    encode_tensor(torch.randn(3, 4), msg.x)
    mutate(msg)
    with pytest.raises(BadRequestError, match=message):
        decode_call(msg, tenant="t")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_fuzz_raw_bytes(data):
    """Any bytes: either a protobuf decode error or a BadRequestError or a valid request, nothing else."""
    try:
        msg = pb.OpCall.FromString(data)
    except DecodeError:
        return
    try:
        request = decode_call(msg, tenant="t")
    except BadRequestError:
        return
    assert request.x.numel() * request.x.element_size() == len(msg.x.data)


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from([*WIRE_DTYPES, "", "float64", "x" * 100]),
    shape=st.lists(st.integers(min_value=-3, max_value=2**62), max_size=10),
    data=st.binary(max_size=256),
    direction=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    priority=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    out_dtype=st.sampled_from(["", *WIRE_DTYPES, "bogus"]),
    region=st.one_of(st.none(), st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))),
)
def test_decoder_fuzz_structured(dtype, shape, data, direction, priority, out_dtype, region):
    """Well-formed protobuf with hostile field values: only BadRequestError, and only exact sizes pass."""
    msg = pb.OpCall(op="op", direction=direction, priority=priority, out_dtype=out_dtype)
    msg.x.dtype = dtype
    msg.x.shape.extend(shape)
    if region is None:
        msg.x.data = data
    else:
        msg.x.region.offset, msg.x.region.nbytes = region
    area = Area(torch.zeros(4096, dtype=torch.uint8))

    def regions(offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: bool) -> torch.Tensor:
        if device:
            raise BadRequestError("no device buffers")
        return area.tensor(offset, shape, dtype)

    try:
        request = decode_call(msg, tenant="t", regions=regions)
    except BadRequestError:
        return
    assert list(request.x.shape) == shape and request.x.dtype == WIRE_DTYPES[dtype]


def test_token_ids_are_copied_out_of_shared_memory():
    """Integer tensors read from a channel are copies (the client cannot change them after they are
    validated); float rows are views (no copy on the hot path)."""
    buffer = torch.zeros(1024, dtype=torch.uint8)
    ids, rows = torch.tensor([3, 1, 4]), torch.randn(2, 4)
    buffer[0:24], buffer[512:544] = ids.view(torch.uint8), rows.view(-1).view(torch.uint8)
    area = Area(buffer)

    def regions(offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: bool) -> torch.Tensor:
        return area.tensor(offset, shape, dtype)

    def decode(t: torch.Tensor, offset: int) -> torch.Tensor:
        msg = pb.Tensor(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), region=pb.ShmRegion(offset=offset, nbytes=t.numel() * t.element_size()))
        return decode_tensor(msg, regions=regions)

    got_ids, got_rows = decode(ids, 0), decode(rows, 512)
    buffer.zero_()  # the client rewrites its channel
    assert torch.equal(got_ids, ids)
    assert torch.equal(got_rows, torch.zeros(2, 4))


def test_area_keeps_its_views_within_its_bounds():
    """A channel's area hands the same view out for the same region (no tensor built per call), and
    shrinking the area (a TCP frame smaller than the previous one) forgets views that lie beyond it."""
    memory = torch.zeros(1024, dtype=torch.uint8)
    area = Area(memory, 0, 544)
    view = area.tensor(512, (2, 4), torch.float32)
    assert area.tensor(512, (2, 4), torch.float32) is view
    memory[512:544] = torch.arange(8, dtype=torch.float32).view(torch.uint8)
    assert torch.equal(view, torch.arange(8, dtype=torch.float32).view(2, 4))  # a view, not a copy
    area.size = 1024  # growing the bounds keeps the views
    assert area.tensor(512, (2, 4), torch.float32) is view
    area.size = 256
    with pytest.raises(BadRequestError, match="outside"):
        area.tensor(512, (2, 4), torch.float32)
    area.size = 1024
    for shape in ((1,), (1, 1)):  # 512 distinct regions: the views kept stay bounded
        for offset in range(0, 1024, 4):
            area.tensor(offset, shape, torch.float32)
    assert 0 < len(area._views) <= Area.MAX_VIEWS


def test_a_call_id_prepended_to_a_kept_description_parses_as_the_whole_call():
    """Lanes keep each call's serialized description and prepend the call id (two serialized messages
    concatenated parse as their merge): the server reads exactly the call that ``encode_call`` makes."""
    from symbiosis.transport.lanes import _SocketLane

    lane = _SocketLane.__new__(_SocketLane)
    lane._msg, lane._descriptions = pb.OpCall(), {}
    x = torch.randn(3, 8)
    for call_id, features in ((7, None), (2**40, (1, 5)), (9, None)):
        request = OpRequest("model.layers.0.mlp.up_proj", Direction.FORWARD, x, client_id="c", priority=3, features=features)
        expected = encode_call(request, call_id, pb.OpCall())
        expected.x.dtype, expected.x.shape[:] = "float32", [3, 8]
        expected.x.region.offset, expected.x.region.nbytes = 64, 96
        assert pb.OpCall.FromString(lane._header(request, call_id, x, 64)) == expected
    assert len(lane._descriptions) == 2  # one per distinct call, whatever its id


def test_committed_stubs_match_the_proto(tmp_path):
    for path in protogen.generate(tmp_path):
        assert filecmp.cmp(path, protogen.HERE / path.name, shallow=False), f"{path.name} is stale: run python -m symbiosis.transport.protogen"


def test_parse_address():
    assert parse_address("symbiosis://127.0.0.1:7878") == ("127.0.0.1:7878", False)
    assert parse_address("symbiosis+tls://[::1]:7878") == ("[::1]:7878", True)
    for bad in ("http://h:1", "symbiosis://h", "h:1", "symbiosis://h:1/x"):
        with pytest.raises(ValueError):
            parse_address(bad)
