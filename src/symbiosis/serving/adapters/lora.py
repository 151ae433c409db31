"""Several LoRA adapters on one module in one pair of products (as S-LoRA and Punica batch them).

Driving PEFT's ``lora.Linear`` once per adapter group costs its Python and two small GEMMs per
group and module (with 4 adapters on a 12-layer Llama, 672 GEMMs of a few rows per step: measured
18% of a step at 16 sequences on 2 cores, mostly threading overhead of tiny products). When a step
has several plain LoRA groups on a module, their rows are multiplied at once instead:

    delta = ((x · A_catᵀ) ⊙ M) · B_catᵀ

with the step's adapters' ``A`` stacked (``[Σr, in]``), their ``B`` side by side (``[out, Σr]``)
and ``M[row, j]`` the row's adapter's scaling on its own rank columns and 0 elsewhere, so each row
gets exactly its own adapter's ``scaling · B(A(x))``; rows of other adapters between the groups
get a zero row of ``M``. The stacks are copies of PEFT's parameters, kept per set of adapters and
dropped when a module's adapters change; the engine puts adapters of one method next to each other
in a step, so a module's LoRA groups are usually adjacent. Only plain LoRA qualifies: no variant
(DoRA, aLoRA), no ``lora_bias``; others, and a lone LoRA group, run through PEFT's layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One adapter's LoRA on one module: PEFT's ``lora_A`` (``[r, in]``) and ``lora_B`` (``[out, r]``) weights and scaling."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def plain_lora(layer: nn.Module) -> LoraWeights | None:
    """The weights of ``layer`` if it is a plain LoRA layer of one adapter, else None."""
    if type(layer) is not LoraLinear or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name in layer.lora_variant or layer.use_dora.get(name) or layer.lora_bias.get(name) or layer.lora_B[name].bias is not None:
        return None
    return LoraWeights(layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]))


class LoraStack:
    """The stacked weights of the adapter sets a module has seen (cleared when its adapters change)."""

    def __init__(self) -> None:
        self._stacks: dict[tuple[LoraWeights, ...], tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, float], ...]]] = {}

    def clear(self) -> None:
        self._stacks.clear()

    def add_to(self, y: torch.Tensor, x: torch.Tensor, groups: list[tuple[LoraWeights, slice]], masks: dict) -> None:
        """``y[:, rows] += scaling · B(A(x[:, rows]))`` for every (adapter, rows) group; ``x``, ``y``: ``[1, N, ·]``.

        The products run over the rows from the first group's to the last group's; rows between
        groups (other adapters') get a zero mask row, so exactly zero is added to them. ``masks``
        holds the masks by layout (ranks, scalings, rows); one dict serves every module of a step,
        so each layout's mask is built once per step, not once per module."""
        a, b, ranks = self._stack(tuple(weights for weights, _ in groups))
        bounds = tuple((rows.start, rows.stop) for _, rows in groups)
        first, last = bounds[0][0], bounds[-1][1]
        key = (ranks, bounds)
        mask = masks.get(key)
        if mask is None:
            mask = masks[key] = torch.zeros(last - first, a.shape[0], dtype=a.dtype, device=a.device)
            column = 0
            for (rank, scaling), (start, stop) in zip(ranks, bounds):
                mask[start - first : stop - first, column : column + rank] = scaling
                column += rank
        rows = x[0, first:last]
        hidden = (rows if rows.dtype == a.dtype else rows.to(a.dtype)) @ a.t()
        hidden.mul_(mask)
        if y.dtype == b.dtype:
            y[0, first:last].addmm_(hidden, b.t())
        else:
            y[0, first:last] += (hidden @ b.t()).to(y.dtype)

    def _stack(self, adapters: tuple[LoraWeights, ...]):
        stack = self._stacks.get(adapters)
        if stack is None:
            if len(self._stacks) >= 64:
                self._stacks.clear()
            a = torch.cat([w.a for w in adapters])
            b = torch.cat([w.b for w in adapters], dim=1)
            ranks = tuple((w.a.shape[0], w.scaling) for w in adapters)
            stack = self._stacks[adapters] = (a, b, ranks)
        return stack
