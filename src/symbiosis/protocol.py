"""The contract between clients and the base executor: what an op request is, what a client learns.

These types are transport-neutral: the in-process transport passes them as they are; network
transports encode them (tensors as raw bytes with explicit dtype and shape, never pickle).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import CONFIG_MAPPING, PretrainedConfig

from .errors import UnsupportedFeatureError

#: Priority of latency-sensitive requests (forward passes without autograd, e.g. ``generate()``).
PRIORITY_INFERENCE = 0
#: Priority of fine-tuning requests (forward passes that build a graph, and all backward passes).
PRIORITY_TRAINING = 1

#: Dtypes the executor computes in and accepts as activations.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: Significand bits of each float dtype: a cast to a dtype with fewer rounds a value.
PRECISION_BITS: dict[torch.dtype, int] = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
#: Dtypes accepted as token ids by embedding ops.
INDEX_DTYPES = (torch.int64, torch.int32)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; anything but the three float dtypes fails."""
    if isinstance(dtype, torch.dtype):
        if dtype in FLOAT_DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in FLOAT_DTYPES:
            return FLOAT_DTYPES[name]
    raise ValueError(f"unsupported dtype {dtype!r}: use one of {', '.join(FLOAT_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


class Direction(enum.IntEnum):
    """Which product a request asks for: forward ``y = x·Wᵀ`` or backward ``grad_x = grad_y·W``."""

    FORWARD = 0
    BACKWARD = 1


class OpKind(str, enum.Enum):
    """``LINEAR``: x -> x·Wᵀ (nn.Linear, GPT-2's Conv1D, the LM head). ``EMBEDDING``: ids -> rows of W."""

    LINEAR = "linear"
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class OpInfo:
    """One op the executor serves.

    ``members`` is empty for a single module; for a fused op (modules that consume the same input,
    such as q/k/v) it lists the member modules in order and ``member_widths`` their output widths;
    the fused output is their outputs concatenated along the last dimension.
    """

    name: str
    kind: OpKind
    in_features: int
    out_features: int
    members: tuple[str, ...] = ()
    member_widths: tuple[int, ...] = ()

    def expected_width(self, direction: Direction, features: tuple[int, int] | None = None) -> int:
        """Width of the rows a request in ``direction`` must carry (token ids: 1 per row).

        ``features``: the request uses only the op's output features ``[start, end)`` (rows of W).
        """
        if self.kind is OpKind.EMBEDDING:
            return 1
        if direction is Direction.FORWARD:
            return self.in_features
        return self.out_features if features is None else features[1] - features[0]

    def output_width(self, direction: Direction, features: tuple[int, int] | None = None) -> int:
        """Width of the rows a request in ``direction`` gets back."""
        if self.kind is OpKind.EMBEDDING:
            return self.out_features
        if direction is Direction.BACKWARD:
            return self.in_features
        return self.out_features if features is None else features[1] - features[0]


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a frozen tensor the executor can hand to clients."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ModelSpec:
    """What a client needs to build its model: the config and the executor's op and tensor tables.

    ``ops`` holds every single op by module path and every fused op by its joined name;
    ``fusion_groups`` maps a group's leader (the member called first) to the fused op's name.
    """

    config: dict[str, Any]
    generation_config: dict[str, Any] | None
    dtype: str
    device: str
    ops: dict[str, OpInfo]
    fusion_groups: dict[str, str]
    tensors: dict[str, TensorInfo]
    layer_range: tuple[int, int] | None = None


@dataclass
class OpRequest:
    """One op call of one client: rows ``x`` (2-D; token ids are 1-D) for op ``op`` in ``direction``.

    ``out_dtype`` is the dtype the client wants back (defaults to ``x``'s dtype for float inputs).
    ``compute_dtype`` is the dtype the product is computed in, rows and weight alike (the dtype a
    client's autocast gives the op, or the dtype of a product the client computes with the weight
    itself); None: the executor's own dtype. ``weight_dtype``: the weight's values are first rounded
    to this narrower dtype (client code that cast the weight down and back up, e.g. TRL's chunked
    LM head on a CPU: ``W.to(bfloat16).float()``); None: no such rounding. ``features`` restricts a
    linear op to its output features ``[start, end)`` (rows ``start:end`` of W): forward rows get
    ``end - start`` outputs, backward rows carry ``end - start`` gradients (a product with a slice
    of the weight).
    """

    op: str
    direction: Direction
    x: torch.Tensor
    client_id: str = "anonymous"
    priority: int = PRIORITY_TRAINING
    out_dtype: torch.dtype | None = None
    tenant: str = field(default="default")
    compute_dtype: torch.dtype | None = None
    features: tuple[int, int] | None = None
    weight_dtype: torch.dtype | None = None

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one GEMM: same op, direction and product."""
        return (self.op, self.direction, self.compute_dtype, self.weight_dtype, self.features)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0]) if self.x.dim() > 0 else 0


def config_from_spec(spec: ModelSpec) -> PretrainedConfig:
    """The transformers config the executor serves."""
    data = dict(spec.config)
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedFeatureError(f"model type {model_type!r} is not known to this transformers version")
    return CONFIG_MAPPING[model_type].from_dict(data)
