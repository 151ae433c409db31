"""The executor's op table: the frozen weights and the two products it computes with them."""

from __future__ import annotations

from dataclasses import dataclass

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

    def apply(self, direction: Direction, x: torch.Tensor) -> torch.Tensor:
        """Forward ``x·Wᵀ`` / backward ``grad_y·W`` on rows ``x``; embedding ops gather rows of W."""
        if self.info.kind is OpKind.EMBEDDING:
            return F.embedding(x, self.weight)
        if direction is Direction.FORWARD:
            return torch.matmul(x, self.weight.t())
        return torch.matmul(x, self.weight)
