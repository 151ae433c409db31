"""A weight that reports shape, dtype and device but holds no data.

Proxies carry it as their ``weight`` so that PEFT (which creates adapters on the weight's device and
dtype) wraps them unchanged, while any code that would read the base weight's values — DoRA's
weight norm, merging an adapter into the base, weight-based adapter initialisation — fails with a
clear ``BaseWeightAccessError`` instead of computing something silently wrong.
"""

from __future__ import annotations

import torch

from ..errors import BaseWeightAccessError

_METADATA_OPS = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}


class PhantomWeight(torch.Tensor):
    """A storage-less tensor standing in for a frozen base weight that lives on the executor."""

    owner: str

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, owner: str) -> PhantomWeight:
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=torch.device(device), requires_grad=False)
        tensor.owner = owner
        return tensor

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"PhantomWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, on the executor: {self.owner})"

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

    def __reduce_ex__(self, protocol: int):
        raise BaseWeightAccessError(
            f"cannot copy or serialise the weight of {self.owner}: it lives on the executor. "
            "PEFT's modules_to_save on a frozen base op needs a trainable copy of that weight; "
            "load the model with that module on the client instead (e.g. lm_head='client')."
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        phantom = next(a for a in args if isinstance(a, PhantomWeight))
        if func in _METADATA_OPS:
            return PhantomWeight(tuple(phantom.shape), phantom.dtype, phantom.device, phantom.owner)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.empty_like.default):
            dtype = kwargs.get("dtype") or phantom.dtype
            device = kwargs.get("device") or phantom.device
            return PhantomWeight(tuple(phantom.shape), dtype, device, phantom.owner)
        raise BaseWeightAccessError(
            f"{func} needs the values of the frozen base weight {phantom.owner}, which lives only on the "
            "executor (the client never materialises base weights). Features that read base weights — "
            "DoRA (use_dora), merging adapters (merge_and_unload / merge_adapter), weight-based init "
            "(PiSSA, OLoRA, LoftQ, EVA, CorDA) — cannot run on a Symbiosis client; merge on a monolithic "
            "model instead (the saved adapter is standard PEFT)."
        )
