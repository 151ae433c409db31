"""The executor's op table: the frozen weights and the two products it computes with them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..protocol import Direction, OpInfo, OpKind


@dataclass
class FrozenOp:
    """A frozen weight and its products. ``weight`` is ``[out, in]`` (linear) or ``[vocab, dim]`` (embedding).

    Stateless: nothing about a request survives the call.
    """

    info: OpInfo
    weight: torch.Tensor
    weight_t: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.weight_t = self.weight.t()  # a view, made once: the forward product's operand

    def apply(
        self,
        direction: Direction,
        x: torch.Tensor,
        *,
        features: tuple[int, int] | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Forward ``x·Wᵀ`` / backward ``grad_y·W`` on 2-D rows ``x``; embedding ops gather rows of W.

        The product is computed in ``x``'s dtype (the weight is cast to it when they differ, as
        autocast casts a module's weight), with the weight's values first rounded to
        ``weight_dtype`` when given; ``features`` uses only rows ``start:end`` of W.
        """
        if self.info.kind is OpKind.EMBEDDING:
            return F.embedding(x, self.weight)
        if features is None and weight_dtype is None and x.dtype == self.weight.dtype:
            return torch.mm(x, self.weight_t if direction is Direction.FORWARD else self.weight)
        weight = self.weight if features is None else self.weight[features[0] : features[1]]
        if weight_dtype is not None:
            weight = weight.to(weight_dtype)
        weight = weight.to(x.dtype)
        return torch.mm(x, weight.t() if direction is Direction.FORWARD else weight)

    def held_tensors(self) -> list[torch.Tensor]:
        """The tensors this op holds (for counting resident bytes)."""
        return [self.weight]
