"""Per-row adapters on parameters: PEFT's ``target_parameters`` (LoRA on a mixture-of-experts block's
expert weights or router, which ``all-linear`` selects on such models).

Such a module (``MixtralExperts``, a top-k router) is not one of the executor's products: it runs in
the engine's process and takes several row-aligned arguments (hidden states, chosen experts and
their weights). ``ParameterDispatch`` stands in for it during a step: each run of rows of the step
goes through the module once, bare for rows of the base and of adapters that do not target it, and
through an adapter's PEFT ``ParamWrapper`` for that adapter's rows (PEFT adds the low-rank update to
the parameter for the duration of the call). Correct for any mix of adapters; each adapter group
costs one more call of the module, so these modules are not batched across adapters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import batch
from .layer import DispatchError, RowDispatch


class ParameterDispatch(nn.Module):
    """Stands in for module ``base`` whose parameters adapters target; attributes it lacks are the base's."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.entries: dict[object, nn.Module] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def attach(self, adapter: object, layer: nn.Module) -> None:
        """Serve ``adapter``'s outermost PEFT ``ParamWrapper`` (which wraps ``base``) on its rows."""
        self.entries[adapter] = layer

    def detach(self, adapter: object) -> None:
        self.entries.pop(adapter, None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        step = batch.current()
        if step is None or not any(g.adapter in self.entries for g in step.groups):
            return self.base(*args, **kwargs)
        total = step.groups[-1].rows.stop
        outputs = []
        for group in step.groups:
            module = self.entries.get(group.adapter, self.base)
            rows = group.rows
            outputs.append(module(*(_rows(a, rows, total) for a in args), **{k: _rows(v, rows, total) for k, v in kwargs.items()}))
        return _join(outputs, [g.rows.stop - g.rows.start for g in step.groups])


def wrap(model: nn.Module, name: str) -> ParameterDispatch:
    """The ``ParameterDispatch`` at module path ``name`` of ``model``, wrapping the module there if needed."""
    module = model.get_submodule(name)
    if isinstance(module, ParameterDispatch):
        return module
    if isinstance(module, RowDispatch):
        raise DispatchError(f"{name} is served per row as a module already; an adapter cannot also target its parameters")
    wrapper = ParameterDispatch(module)
    model.set_submodule(name, wrapper)
    return wrapper


def _rows(value: Any, rows: slice, total: int) -> Any:
    """``value``'s part for ``rows`` if it is a tensor over the step's ``total`` rows (first dimension, or
    the second after a batch of one); anything else as it is."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape[0] == total:
        return value[rows]
    if value.dim() > 1 and value.shape[0] == 1 and value.shape[1] == total:
        return value[:, rows]
    return value


def _join(outputs: list[Any], sizes: list[int]) -> Any:
    """The groups' outputs (group ``i`` of ``sizes[i]`` rows) put back together in row order: tensors over
    the rows (first dimension, or the second after a batch of one), or tuples of them."""
    first = outputs[0]
    if isinstance(first, tuple):
        return tuple(_join([out[i] for out in outputs], sizes) for i in range(len(first)))
    if not isinstance(first, torch.Tensor):
        raise DispatchError(f"a module adapters target by parameter returned {type(first).__name__}; the engine joins tensors only")
    for dim in (0, 1):
        if all(out.dim() > dim and out.shape[dim] == size and (dim == 0 or out.shape[0] == 1) for out, size in zip(outputs, sizes)):
            return torch.cat(outputs, dim=dim)
    raise DispatchError(f"a module adapters target by parameter returned outputs of shapes {[tuple(o.shape) for o in outputs]} for rows {sizes}")
