"""Finding the frozen base ops of a transformers model, and which of them share an input.

Generic by construction: an op is any module whose forward is exactly ``nn.Linear.forward`` or
GPT-2's ``Conv1D.forward`` (a pure linear map) or a bitsandbytes quantized linear layer, and a fusion group is any set of ops that one traced
forward pass calls with the very same input tensor. No per-architecture tables.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .quantized import is_quantized_linear

log = logging.getLogger(__name__)

_LINEAR_FORWARDS = (nn.Linear.forward, Conv1D.forward)


def is_linear_op(module: nn.Module) -> bool:
    """True for nn.Linear / Conv1D and subclasses that keep their forward (a pure x·Wᵀ + b), and for
    bitsandbytes' quantized linear layers."""
    return (isinstance(module, (nn.Linear, Conv1D)) and type(module).forward in _LINEAR_FORWARDS) or is_quantized_linear(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The op's weight as an ``[out_features, in_features]`` matrix (a view, never a copy)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def find_linear_ops(model: nn.Module) -> dict[str, nn.Module]:
    """Every frozen linear op of ``model`` by module path, in module order (LM head included)."""
    return {name: module for name, module in model.named_modules() if name and is_linear_op(module)}


def find_fusion_groups(model: nn.Module, ops: dict[str, nn.Module]) -> list[tuple[str, ...]]:
    """Groups of ops that consume the same input tensor, each in call order (e.g. q/k/v, gate/up).

    Runs one forward pass on a few tokens with hooks on every op. Returns ``[]`` (and logs why)
    when the model cannot be traced that way; fusion is an optimisation, never a requirement.
    """
    calls: dict[int, list[str]] = defaultdict(list)
    keep_alive: list[torch.Tensor] = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                keep_alive.append(args[0])
                calls[id(args[0])].append(name)

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in ops.items()]
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device))
    except Exception as exc:  # an exotic model that needs more than input_ids: run unfused
        log.warning("could not trace %s to find ops that share inputs (%s); ops stay unfused", type(model).__name__, exc)
        return []
    finally:
        for handle in handles:
            handle.remove()
    groups = []
    for names in calls.values():
        unique = tuple(dict.fromkeys(names))
        if len(unique) > 1:
            groups.append(unique)
    return groups
