"""The executor's op table: the frozen weights and the two products it computes with them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..protocol import Direction, OpInfo, OpKind


#: Dtypes whose CPU products can run on a prepacked weight (oneDNN's inner product).
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
#: The row count oneDNN chooses the packed layout for. Measured on the 2-core EPYC VM (a 78M Llama's
#: linear weights, float32, 2 threads): packed for 64 rows beat ``torch.mm`` at every count tried,
#: 1.9x at 1 row, 2.3x at 24, 1.45x at 256; packed for 1 row gained less beyond 1 row.
PACKED_FOR_ROWS = 64
#: Which products an executor prepacks weights for: forward only (inference) or both directions
#: (fine-tuning clients' backward products too, for a third copy of the linear weights).
Packing = Literal["forward", "both"]
PACKED_DIRECTIONS: dict[Packing, tuple[Direction, ...]] = {
    "forward": (Direction.FORWARD,),
    "both": (Direction.FORWARD, Direction.BACKWARD),
}


@dataclass
class FrozenOp:
    """A frozen weight and its products. ``weight`` is ``[out, in]`` (linear) or ``[vocab, dim]`` (embedding).

    ``packed``: per direction (``pack``), a copy of a linear weight in oneDNN's blocked layout
    (``W`` for forward, ``Wᵀ`` for backward products), used by that direction's products in the
    weight's own dtype; everything else uses ``weight``.
    Stateless: nothing about a request survives the call.
    """

    info: OpInfo
    weight: torch.Tensor
    weight_t: torch.Tensor = field(init=False, repr=False)
    packed: dict[Direction, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.weight_t = self.weight.t()  # a view, made once: the forward product's operand

    def pack(self, directions: Iterable[Direction] = (Direction.FORWARD,)) -> bool:
        """Keep a prepacked copy of a linear CPU weight of a packable dtype for each direction's
        products (MKL's GEMM streams a skinny product's weight at half the speed); whether it did."""
        if self.info.kind is not OpKind.LINEAR or self.weight.device.type != "cpu" or self.weight.dtype not in PACKABLE_DTYPES:
            return False
        if not torch.backends.mkldnn.is_available():
            return False
        try:  # the ops torch.compile's CPU freezing packs linear weights with
            packed = {
                d: torch.ops.mkldnn._reorder_linear_weight(self.weight if d is Direction.FORWARD else self.weight.t().contiguous(), PACKED_FOR_ROWS)
                for d in directions
            }
        except (AttributeError, RuntimeError):  # a torch build without them: plain products
            return False
        self.packed = packed
        return True

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed copies (0 without any)."""
        return sum(p.numel() * p.element_size() for p in self.packed.values())

    def uses_packed(
        self, direction: Direction, dtype: torch.dtype, features: tuple[int, int] | None, weight_dtype: torch.dtype | None
    ) -> bool:
        """Whether ``apply`` computes this product on a packed copy (which allocates its result:
        an ``out`` then costs a copy)."""
        return direction in self.packed and features is None and weight_dtype is None and dtype == self.weight.dtype

    def apply(
        self,
        direction: Direction,
        x: torch.Tensor,
        *,
        features: tuple[int, int] | None = None,
        weight_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward ``x·Wᵀ`` / backward ``grad_y·W`` on 2-D rows ``x``; embedding ops gather rows of W.

        The product is computed in ``x``'s dtype (the weight is cast to it when they differ, as
        autocast casts a module's weight), with the weight's values first rounded to
        ``weight_dtype`` when given; ``features`` uses only rows ``start:end`` of W. ``out``: a
        contiguous tensor of the output's shape and device, in ``x``'s dtype, to write the product
        into (returned), e.g. a client's response memory.
        """
        if self.info.kind is OpKind.EMBEDDING:
            return F.embedding(x, self.weight) if out is None else torch.index_select(self.weight, 0, x, out=out)
        if self.uses_packed(direction, x.dtype, features, weight_dtype):
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed[direction], None, "none", [], "")
            return y if out is None else out.copy_(y)
        if features is None and weight_dtype is None and x.dtype == self.weight.dtype:
            return torch.mm(x, self.weight_t if direction is Direction.FORWARD else self.weight, out=out)
        weight = self.weight if features is None else self.weight[features[0] : features[1]]
        if weight_dtype is not None:
            weight = weight.to(weight_dtype)
        weight = weight.to(x.dtype)
        return torch.mm(x, weight.t() if direction is Direction.FORWARD else weight, out=out)

    def held_tensors(self) -> list[torch.Tensor]:
        """The tensors this op holds (for counting resident bytes)."""
        return [self.weight]
