"""Several LoRA adapters on one module in one pair of products (as S-LoRA and Punica batch them).

Driving PEFT's ``lora.Linear`` once per adapter group costs its Python and two small GEMMs per
group and module (with 4 adapters on a 12-layer Llama, 672 GEMMs of a few rows per step: measured
18% of a step at 16 sequences on 2 cores, mostly threading overhead of tiny products). When a step
has several plain LoRA groups on a module, their rows are multiplied at once instead:

    delta = ((x · A_catᵀ) ⊙ M) · B_catᵀ

with the step's adapters' ``A`` stacked (``[Σr, in]``), their ``B`` side by side (``[out, Σr]``)
and ``M[row, j]`` the row's adapter's scaling on its own rank columns and 0 elsewhere, so each row
gets exactly its own adapter's ``scaling · B(A(x))``. The weights are PEFT's own parameters (not
copied); the stacks are kept per set of adapters. Only plain LoRA qualifies: no variant (DoRA,
aLoRA), no ``lora_bias``; others, and a lone LoRA group, run through PEFT's layer.
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
        self._stacks: dict[tuple[LoraWeights, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self._stacks.clear()

    def add_to(self, y: torch.Tensor, x: torch.Tensor, groups: list[tuple[LoraWeights, slice]]) -> None:
        """``y[:, rows] += scaling · B(A(x[:, rows]))`` for every (adapter, rows) group; ``x``, ``y``: ``[1, N, ·]``."""
        adapters = tuple(weights for weights, _ in groups)
        a, b, owner, scale = self._stack(adapters)
        slices = [rows for _, rows in groups]
        contiguous = all(s.stop == t.start for s, t in zip(slices, slices[1:]))
        rows = x[0, slices[0].start : slices[-1].stop] if contiguous else torch.cat([x[0, s] for s in slices])
        sizes = torch.tensor([s.stop - s.start for s in slices], device=owner.device)
        row_owner = torch.repeat_interleave(torch.arange(len(slices), device=owner.device), sizes)
        delta = ((rows.to(a.dtype) @ a.t()) * ((row_owner[:, None] == owner[None, :]) * scale)) @ b.t()
        if contiguous:
            y[0, slices[0].start : slices[-1].stop] += delta.to(y.dtype)
            return
        offset = 0
        for s in slices:
            y[0, s] += delta[offset : offset + s.stop - s.start].to(y.dtype)
            offset += s.stop - s.start

    def _stack(self, adapters: tuple[LoraWeights, ...]):
        stack = self._stacks.get(adapters)
        if stack is None:
            if len(self._stacks) >= 64:
                self._stacks.clear()
            a = torch.cat([w.a for w in adapters])
            b = torch.cat([w.b for w in adapters], dim=1)
            ranks = torch.tensor([w.a.shape[0] for w in adapters], device=a.device)
            owner = torch.repeat_interleave(torch.arange(len(adapters), device=a.device), ranks)
            scale = torch.repeat_interleave(torch.tensor([w.scaling for w in adapters], dtype=a.dtype, device=a.device), ranks)
            stack = self._stacks[adapters] = (a, b, owner, scale)
        return stack
