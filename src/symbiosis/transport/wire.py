"""The wire format: tensors as raw bytes with explicit dtype and shape, the spec as JSON.

Decoding is defensive: every field of a message from the network is checked (dtype, rank, sizes,
payload length, region bounds) and any problem raises ``BadRequestError``, never anything else.
Raw bytes are little-endian (the only byte order this module runs on).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import grpc
import torch

from ..errors import AuthenticationError, BadRequestError, ExecutorUnavailableError, LimitExceededError, SymbiosisError
from ..protocol import Direction, ModelSpec, OpInfo, OpKind, OpRequest, TensorInfo, dtype_name
from . import symbiosis_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("the Symbiosis wire format is little-endian; this host is big-endian")

#: Dtypes a tensor may have on the wire.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
#: The most dimensions a tensor on the wire may have.
MAX_RANK = 8
#: The most elements a tensor on the wire may have (also per dimension, zero-size tensors included).
MAX_ELEMENTS = 1 << 40
#: Largest priority a request may carry (priorities scale the scheduler's aging deadline).
MAX_PRIORITY = 1000
#: Directions by their wire value.
_DIRECTIONS = {int(d): d for d in Direction}

#: Resolves a region of a channel's memory (see ``ShmRegion``) — ``(offset, shape, dtype, device)``
#: — to a tensor viewing it; raises BadRequestError for a region outside the channel.
RegionReader = Callable[[int, tuple[int, ...], torch.dtype, bool], torch.Tensor]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw C-order bytes of ``t`` (moved to CPU and made contiguous if needed; no copy otherwise)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def encode_tensor(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """``t`` as an inline ``Tensor`` message (into ``out`` when given)."""
    msg = out if out is not None else pb.Tensor()
    msg.dtype = _wire_dtype_name(t.dtype)
    msg.shape[:] = list(t.shape)
    msg.data = bytes(tensor_bytes(t))
    return msg


def decode_tensor(msg: pb.Tensor, *, regions: RegionReader | None = None, copy: bool = False) -> torch.Tensor:
    """The tensor a ``Tensor`` message describes; ``BadRequestError`` for anything malformed.

    Inline bytes are wrapped without copying unless ``copy``; a region is resolved through
    ``regions`` (the caller's channel) and returned as a view of it unless ``copy`` or the dtype is
    an integer one (always copied).
    """
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        raise BadRequestError(f"unknown tensor dtype {msg.dtype[:40]!r}: use one of {', '.join(WIRE_DTYPES)}")
    shape = tuple(msg.shape)
    elements = math.prod(shape)
    if (
        len(shape) > MAX_RANK
        or (shape and min(shape) < 0)
        or elements > MAX_ELEMENTS
        or (not elements and math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS)
    ):
        raise BadRequestError(f"invalid tensor shape {shape[:MAX_RANK + 1]}")
    itemsize = dtype.itemsize
    nbytes = elements * itemsize
    kind = msg.WhichOneof("payload")
    if kind == "region":
        region = msg.region
        if regions is None:
            raise BadRequestError("a shared-memory region was sent outside a shared-memory channel")
        if region.nbytes != nbytes:
            raise BadRequestError(f"region holds {region.nbytes} bytes, dtype and shape need {nbytes}")
        offset = region.offset
        if offset % itemsize:
            raise BadRequestError(f"region offset {offset} is not a multiple of {itemsize} ({msg.dtype})")
        t = regions(offset, shape, dtype, region.device)
        # Integer tensors (token ids) are copied out of shared memory before anyone validates them:
        # the client can rewrite its channel at any time, and an index changed between validation
        # and use fails the gather (on CUDA, a device-side assert poisons the context of every
        # tenant). Float rows stay zero-copy views: rewriting them mid-call changes only that
        # client's own output rows (every output row of a linear op depends on its input row alone).
        return t.clone() if copy or not dtype.is_floating_point else t
    buffer = memoryview(msg.data) if kind == "data" else memoryview(b"")
    if buffer.nbytes != nbytes:
        raise BadRequestError(f"tensor payload holds {buffer.nbytes} bytes, dtype {msg.dtype} and shape {shape} need {nbytes}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if copy:
        buffer = bytearray(buffer)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def describe_region(t: torch.Tensor, offset: int, out: pb.Tensor, *, device: bool = False) -> None:
    """Fill ``out`` with ``t``'s dtype and shape and a reference to bytes at ``offset`` of a channel
    (its CUDA buffers with ``device``)."""
    out.dtype = _wire_dtype_name(t.dtype)
    out.shape[:] = t.shape
    region = out.region
    region.offset = offset
    region.nbytes = t.numel() * t.element_size()
    region.device = device


def encode_call(request: OpRequest, call_id: int, out: pb.OpCall | None = None) -> pb.OpCall:
    """The ``OpCall`` for ``request`` with its tensor inline (the caller may swap in a region)."""
    msg = out if out is not None else pb.OpCall()
    msg.call_id = call_id
    msg.op = request.op
    msg.direction = int(request.direction)
    msg.priority = int(request.priority)
    msg.out_dtype = dtype_name(request.out_dtype) if request.out_dtype is not None else ""
    msg.client_id = request.client_id
    msg.compute_dtype = dtype_name(request.compute_dtype) if request.compute_dtype is not None else ""
    msg.weight_dtype = dtype_name(request.weight_dtype) if request.weight_dtype is not None else ""
    if request.features is not None:
        msg.features.start, msg.features.end = request.features
    else:
        msg.ClearField("features")
    return msg


def decode_call(msg: pb.OpCall, *, tenant: str, regions: RegionReader | None = None) -> OpRequest:
    """The ``OpRequest`` an ``OpCall`` describes, for ``tenant``; ``BadRequestError`` if malformed.

    Only the envelope is checked here; the executor checks the request against its op.
    """
    direction, priority = msg.direction, msg.priority
    if direction not in _DIRECTIONS:
        raise BadRequestError(f"unknown direction {direction}")
    if not 0 <= priority <= MAX_PRIORITY:
        raise BadRequestError(f"priority {priority} outside [0, {MAX_PRIORITY}]")
    if not msg.HasField("x"):
        raise BadRequestError("the request carries no tensor")
    x = decode_tensor(msg.x, regions=regions)
    out_dtype, compute_dtype, weight_dtype = msg.out_dtype, msg.compute_dtype, msg.weight_dtype
    return OpRequest(
        op=msg.op,
        direction=_DIRECTIONS[direction],
        x=x,
        client_id=msg.client_id[:64] or "anonymous",
        priority=priority,
        out_dtype=_float_dtype(out_dtype, "out_dtype") if out_dtype else None,
        tenant=tenant,
        compute_dtype=_float_dtype(compute_dtype, "compute_dtype") if compute_dtype else None,
        weight_dtype=_float_dtype(weight_dtype, "weight_dtype") if weight_dtype else None,
        features=(msg.features.start, msg.features.end) if msg.HasField("features") else None,
    )


def _float_dtype(name: str, field: str) -> torch.dtype | None:
    """The float dtype a request field names; None when empty; ``BadRequestError`` for another name."""
    if not name:
        return None
    dtype = WIRE_DTYPES.get(name)
    if dtype is None or not dtype.is_floating_point:
        raise BadRequestError(f"unknown {field} {name[:40]!r}")
    return dtype


def _wire_dtype_name(dtype: torch.dtype) -> str:
    name = dtype_name(dtype)
    if name not in WIRE_DTYPES:
        raise BadRequestError(f"dtype {dtype} cannot travel on the wire: use one of {', '.join(WIRE_DTYPES)}")
    return name


# ---------------------------------------------------------------------------------------- spec
def spec_to_json(spec: ModelSpec) -> str:
    """``spec`` as JSON (op kinds by value, tuples as lists)."""
    data = dataclasses.asdict(spec)
    for info in data["ops"].values():
        info["kind"] = info["kind"].value
    return json.dumps(data)


def spec_from_json(text: str) -> ModelSpec:
    """The ``ModelSpec`` that ``spec_to_json`` wrote."""
    data: dict[str, Any] = json.loads(text)
    ops = {
        name: OpInfo(
            name=info["name"],
            kind=OpKind(info["kind"]),
            in_features=info["in_features"],
            out_features=info["out_features"],
            members=tuple(info["members"]),
            member_widths=tuple(info["member_widths"]),
        )
        for name, info in data["ops"].items()
    }
    tensors = {name: TensorInfo(tuple(t["shape"]), t["dtype"]) for name, t in data["tensors"].items()}
    layer_range = tuple(data["layer_range"]) if data.get("layer_range") is not None else None
    return dataclasses.replace(ModelSpec(**{**data, "ops": ops, "tensors": tensors}), layer_range=layer_range)


# -------------------------------------------------------------------------------------- errors
#: Exceptions a client can cause, by the gRPC status code that carries them.
ERROR_CODES: dict[grpc.StatusCode, type[SymbiosisError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.UNAVAILABLE: ExecutorUnavailableError,
}


def status_code_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code that reports ``exc`` to a client."""
    for code, cls in ERROR_CODES.items():
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def exception_for(code: str | grpc.StatusCode, message: str) -> SymbiosisError:
    """The client-side exception for an error the server reported with ``code``."""
    if isinstance(code, str):
        code = grpc.StatusCode.__members__.get(code, grpc.StatusCode.INTERNAL)
    return ERROR_CODES.get(code, SymbiosisError)(message)
