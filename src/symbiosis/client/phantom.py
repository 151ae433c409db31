"""A weight that reports shape, dtype and device, holds no data, and can be multiplied by.

Proxies carry it as their ``weight`` so that PEFT (which creates adapters on the weight's device and
dtype) wraps them unchanged. Code that uses a base weight the way a weight is used — in a product:
``F.linear(x, module.weight)``, ``x @ W.T``, ``torch.mm(x, W[a:b].t(), out=...)``, ``acc.addmm_(g,
W[a:b])``, as fused and chunked LM-head losses such as TRL's do — gets the right
answer: the executor computes the product, and autograd differentiates it like any product (the
gradient with respect to the other operand is again a product with the weight). Anything that needs
the weight's values on the client — merging an adapter into it, DoRA's weight norm, weight-based
adapter initialisation, flattening it into a buffer for a collective — raises
``BaseWeightAccessError`` naming the operation, instead of computing something silently wrong.

What leaves the client for such a product is what a proxy's own forward or backward sends: the rows
multiplied by the weight (activations, or gradients with respect to the op's output).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from ..errors import BaseWeightAccessError
from ..protocol import PRECISION_BITS, Direction

aten = torch.ops.aten


class Multiplier(Protocol):
    """Computes products with one executor op's weight W (``[out, in]``)."""

    def product(
        self, direction: Direction, rows: torch.Tensor, features: tuple[int, int] | None, weight_dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Forward ``rows·W[features]ᵀ`` or backward ``rows·W[features]`` in ``rows``'s dtype, with
        W's values first rounded to ``weight_dtype`` when given."""
        ...


@dataclass(frozen=True)
class _View:
    """Which part of the executor's W ``[total, in]`` a phantom stands for, and how it is laid out.

    The phantom is ``W[start:end]`` (``[end - start, in]``), or its transpose when ``transposed``;
    ``rounded``: its values went through this dtype, narrower than its own (a cast down and back up).
    """

    start: int
    end: int
    total: int
    transposed: bool
    rounded: torch.dtype | None = None

    @property
    def features(self) -> tuple[int, int] | None:
        """The output features a product uses; None: all of them."""
        return None if (self.start, self.end) == (0, self.total) else (self.start, self.end)


class PhantomWeight(torch.Tensor):
    """A storage-less tensor standing in for a frozen base weight that lives on the executor."""

    owner: str
    multiplier: Multiplier | None
    _view: _View

    @staticmethod
    def __new__(
        cls,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        owner: str,
        *,
        transposed: bool = False,
        multiplier: Multiplier | None = None,
        view: _View | None = None,
    ) -> PhantomWeight:
        """``shape`` is the weight's own (``[out, in]``, or ``[in, out]`` with ``transposed``, as GPT-2's
        Conv1D stores it); ``view`` (internal) places a derived phantom within the executor's W."""
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=torch.device(device), requires_grad=False)
        tensor.owner = owner
        tensor.multiplier = multiplier
        if view is None:
            out = shape[1] if transposed else shape[0]
            view = _View(0, out, out, transposed)
        tensor._view = view
        return tensor

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"PhantomWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, on the executor: {self.owner})"

    def connect(self, multiplier: Multiplier) -> None:
        """Compute this weight's products with ``multiplier`` (the proxy's executor op)."""
        self.multiplier = multiplier

    def _derive(self, *, dtype: torch.dtype | None = None, device: torch.device | None = None, view: _View | None = None) -> PhantomWeight:
        """A phantom of the same weight with another dtype, device or view (a new tensor, like a cast or a view)."""
        view = view or self._view
        shape = tuple(self.shape)
        if len(shape) == 2:
            width = shape[0] if self._view.transposed else shape[1]
            rows = view.end - view.start
            shape = (width, rows) if view.transposed else (rows, width)
        return PhantomWeight(shape, dtype or self.dtype, device or self.device, self.owner, multiplier=self.multiplier, view=view)

    @property
    def requires_grad(self) -> bool:
        return False

    @requires_grad.setter
    def requires_grad(self, requires_grad: bool) -> None:
        self.requires_grad_(requires_grad)

    def requires_grad_(self, requires_grad: bool = True) -> PhantomWeight:
        """Frozen for good: asking for gradients fails instead of training nothing silently."""
        if requires_grad:
            raise BaseWeightAccessError(
                f"the base weight {self.owner} is frozen on the executor and cannot be trained; "
                "train adapters (PEFT) or keep the module on the client instead"
            )
        return self

    def data_ptr(self) -> int:
        """No memory to point at: a kernel that reads the weight itself fails here, not on address 0."""
        raise BaseWeightAccessError(_refusal("data_ptr()", self, "a kernel reading its memory directly (Triton, CUDA or C++ extensions)"))

    def __dlpack__(self, *args: object, **kwargs: object):
        raise BaseWeightAccessError(_refusal("__dlpack__", self, "exporting its memory"))

    def __reduce_ex__(self, protocol: int):
        raise BaseWeightAccessError(
            f"cannot copy or serialise the weight of {self.owner}: it lives on the executor. "
            "PEFT's modules_to_save on a frozen base op needs a trainable copy of that weight; "
            "load the model with that module on the client instead (e.g. lm_head='client')."
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        decomposed = func.decompose(*args, **kwargs)
        if decomposed is not NotImplemented:
            return decomposed
        phantom = next(a for a in (*args, *kwargs.values()) if isinstance(a, PhantomWeight))
        raise BaseWeightAccessError(_refusal(func, phantom))


# ------------------------------------------------------------------------------ metadata ops
def _same(phantom: PhantomWeight, *args: object, **kwargs: object) -> PhantomWeight:
    return phantom._derive()


def _to_copy(phantom: PhantomWeight, *, dtype: torch.dtype | None = None, device: torch.device | None = None, **kwargs: object) -> PhantomWeight:
    """A cast. Values keep the coarsest rounding they went through: ``W.to(bfloat16).float()`` holds
    W rounded to bfloat16 (TRL's chunked LM head multiplies by exactly that on a CPU)."""
    dtype = dtype or phantom.dtype
    if dtype not in PRECISION_BITS:
        raise BaseWeightAccessError(_refusal(aten._to_copy.default, phantom, f"casting it to {dtype}"))
    coarsest = phantom._view.rounded or phantom.dtype
    if PRECISION_BITS[dtype] < PRECISION_BITS[coarsest]:
        if coarsest.itemsize <= 2:  # e.g. float16 then bfloat16: rounded twice, which no one request expresses
            raise BaseWeightAccessError(f"casting the base weight {phantom.owner} from {coarsest} to {dtype} is not supported")
        coarsest = dtype
    view = replace(phantom._view, rounded=None if coarsest == dtype else coarsest)
    return phantom._derive(dtype=dtype, device=torch.device(device) if device is not None else None, view=view)


def _transpose(phantom: PhantomWeight, *dims: int) -> PhantomWeight:
    _require_matrix(phantom, "transposing")
    return phantom._derive(view=replace(phantom._view, transposed=not phantom._view.transposed))


def _permute(phantom: PhantomWeight, dims: list[int]) -> PhantomWeight:
    _require_matrix(phantom, "permuting")
    order = [d % 2 for d in dims]
    return phantom._derive() if order == [0, 1] else _transpose(phantom)


def _reshape(phantom: PhantomWeight, shape: list[int]) -> PhantomWeight:
    if list(shape) != list(phantom.shape):
        raise BaseWeightAccessError(_refusal(aten.view.default, phantom, "reshaping it"))
    return phantom._derive()


def _slice(phantom: PhantomWeight, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> PhantomWeight:
    _require_matrix(phantom, "slicing")
    view = phantom._view
    feature_dim = 1 if view.transposed else 0
    size = phantom.shape[dim % 2]
    start, end = _clamp(start, 0, size), _clamp(end, size, size)
    if dim % 2 != feature_dim or step != 1:
        raise BaseWeightAccessError(
            f"slicing the base weight {phantom.owner} along its input dimension (or with a step) is not supported: "
            "products with slices of its rows (output features), e.g. W[a:b] @ ... or x @ W[a:b].T, are"
        )
    end = max(start, end)
    return phantom._derive(view=replace(view, start=view.start + start, end=view.start + end))


def _split(phantom: PhantomWeight, split_size: int | list[int], dim: int = 0) -> list[PhantomWeight]:
    size = phantom.shape[dim % 2]
    sizes = list(split_size) if isinstance(split_size, (list, tuple)) else [min(split_size, size - s) for s in range(0, size, split_size)]
    parts, start = [], 0
    for length in sizes:
        parts.append(_slice(phantom, dim, start, start + length))
        start += length
    return parts


def _clamp(value: int | None, default: int, size: int) -> int:
    if value is None:
        return default
    if value < 0:
        value += size
    return min(max(value, 0), size)


def _require_matrix(phantom: PhantomWeight, what: str) -> None:
    if phantom.dim() != 2:
        raise BaseWeightAccessError(_refusal(aten.view.default, phantom, what))


# ---------------------------------------------------------------------------------- products
def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D operands, one of them a phantom, computed by the executor."""
    if isinstance(a, PhantomWeight) and isinstance(b, PhantomWeight):
        raise BaseWeightAccessError(f"a product of two base weights ({a.owner}, {b.owner}) needs their values on the client")
    if isinstance(a, PhantomWeight):  # P @ b = (bᵀ @ Pᵀ)ᵀ
        return _product(b.t(), _transpose(a)).t().contiguous()
    phantom: PhantomWeight = b
    if a.dim() != 2 or phantom.dim() != 2:
        raise BaseWeightAccessError(_refusal(aten.mm.default, phantom, "a product with more than two dimensions"))
    if a.shape[1] != phantom.shape[0]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({a.shape[0]}x{a.shape[1]} and {phantom.shape[0]}x{phantom.shape[1]})")
    if a.dtype != phantom.dtype:
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {a.dtype} != {phantom.dtype}")
    if phantom.multiplier is None:
        raise BaseWeightAccessError(_refusal(aten.mm.default, phantom, "a product (this weight is not connected to an executor op)"))
    # P = W[f]ᵀ: a·W[f]ᵀ is a forward product; P = W[f]: a·W[f] is a backward one
    direction = Direction.FORWARD if phantom._view.transposed else Direction.BACKWARD
    return phantom.multiplier.product(direction, a.contiguous(), phantom._view.features, phantom._view.rounded).to(device=a.device)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _product(a, b)


def _mm_out(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return _into(out, _product(a, b))


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1) -> torch.Tensor:
    y = _product(a, b)
    if alpha != 1:
        y = y * alpha
    if beta == 0:
        return y
    return y + (bias if beta == 1 else bias * beta)


def _addmm_out(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1, out: torch.Tensor) -> torch.Tensor:
    return _into(out, _addmm(bias, a, b, beta=beta, alpha=alpha))


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1) -> torch.Tensor:
    if isinstance(acc, PhantomWeight):
        raise BaseWeightAccessError(_refusal(aten.addmm_.default, acc))
    y = _product(a, b)
    if beta != 1:
        acc.mul_(beta)
    return acc.add_(y.to(acc.dtype), alpha=alpha)


def _into(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(out, PhantomWeight):
        raise BaseWeightAccessError(_refusal(aten.copy_.default, out))
    if out.shape != y.shape:
        out.resize_(y.shape)
    return out.copy_(y)


_HANDLERS = {
    aten.detach.default: _same,
    aten.alias.default: _same,
    aten.clone.default: _same,
    aten.lift_fresh.default: _same,
    aten._to_copy.default: _to_copy,
    aten.empty_like.default: _to_copy,
    aten.t.default: _transpose,
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.expand.default: _reshape,
    aten.slice.Tensor: _slice,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.mm.default: _mm,
    aten.mm.out: _mm_out,
    aten.addmm.default: _addmm,
    aten.addmm.out: _addmm_out,
    aten.addmm_.default: _addmm_,
}


def _refusal(func: object, phantom: PhantomWeight, what: str | None = None) -> str:
    """Why ``func`` cannot run on the phantom of ``phantom.owner``, and what to do instead."""
    doing = f"{what} ({func})" if what else str(func)
    return (
        f"{doing} needs the values of the frozen base weight {phantom.owner}, which lives only on the executor "
        "(a Symbiosis client never holds base weights). Products by the weight work — F.linear(x, W), x @ W.T, "
        "torch.mm / addmm (also with out=) on whole weights or slices of their rows — and run on the executor. "
        "What needs the values does not: DoRA (use_dora), merging adapters (merge_and_unload / merge_adapter; "
        "merge the saved adapter on a monolithic model instead), weight-based init (PiSSA, OLoRA, LoftQ, EVA, "
        "CorDA), kernels that read the weight's memory (use a torch implementation, e.g. TRL's fused LM head, "
        "or load_model(..., lm_head='client') for the LM head), and sharding or broadcasting the weight "
        "(FSDP: wrap with ignored_states=symbiosis.client.base_weights(model); DistributedDataParallel skips "
        "base weights by itself)."
    )
