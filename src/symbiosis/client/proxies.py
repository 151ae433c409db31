"""Proxy modules: subclasses of the module types they replace, whose weights live on the executor.

A proxy keeps its original's attributes (``in_features``, ``nf``, ``padding_idx``, ...), its bias as
a real frozen tensor, and a ``PhantomWeight`` in place of its weight, so PEFT and transformers
treat it as the module it replaced. Subclasses of nn.Linear / nn.Embedding that call
``super().forward`` (e.g. scaled word embeddings) keep their own forward: the proxy class is
inserted *below* them in the method resolution order.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import BaseWeightAccessError
from ..protocol import Direction, OpInfo
from .phantom import PhantomWeight
from .remote_ops import FusionGroup, RemoteLinear
from .session import ClientSession

_MODULE_INTERNALS = frozenset(vars(nn.Module()))


class _ProxyMixin:
    """Behaviour shared by every proxy.

    The phantom weight is a registered (frozen) parameter, as in the module it replaces, so
    ``num_parameters()``, ``model.dtype`` and PEFT's lookups see the real model; it follows
    dtype/device moves, stays out of state dicts (there is nothing to save), and the module
    refuses to be copied.
    """

    weight: PhantomWeight

    def _apply(self, fn: Callable, recurse: bool = True):
        params = self._parameters
        weight = params.pop("weight")
        try:
            super()._apply(fn, recurse)
            weight = nn.Parameter(fn(weight), requires_grad=False)
        finally:
            self._parameters = {"weight": weight, **params}
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self._parameters.pop("weight")
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters = {"weight": weight, **self._parameters}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")

    def __deepcopy__(self, memo: dict) -> None:
        raise BaseWeightAccessError(
            f"cannot copy {type(self).__name__} ({self.weight.owner}): its weight lives on the executor. "
            "PEFT's modules_to_save needs a trainable copy of a base op; keep that module on the client "
            "(load_model(..., lm_head='client') for the LM head) instead."
        )


class LinearProxy(_ProxyMixin, nn.Linear):
    """An nn.Linear whose ``x·Wᵀ`` runs on the executor.

    ``torch.compile`` does not trace into a proxy (a request to the executor is a graph break): the
    code around it — norms, attention, adapters — compiles as usual.
    """

    _remote: RemoteLinear
    _group: FusionGroup | None
    _role: str  # "single", "leader" or "member"

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self._role == "leader":
            y = self._group.leader_call(x)
        elif self._role == "member":
            y = self._group.member_call(self.weight.owner, x)
        if y is None:
            y = self._remote(x)
        # under autocast y is in the autocast dtype, and so is the bias F.linear would add
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, on the executor"


class Conv1DProxy(_ProxyMixin, Conv1D):
    """GPT-2's Conv1D (``x·W + b`` with W stored ``[in, out]``) whose product runs on the executor."""

    forward = LinearProxy.forward

    def __repr__(self) -> str:
        return f"Conv1DProxy(nf={self.nf}, nx={self.nx}, on the executor)"


class EmbeddingProxy(_ProxyMixin, nn.Embedding):
    """An nn.Embedding whose row lookup runs on the executor (token ids leave the client)."""

    _session: ClientSession
    _info: OpInfo

    @torch.compiler.disable
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        priority = self._session.request_priority(Direction.FORWARD)
        rows = self._session.run(self._info.name, Direction.FORWARD, ids.reshape(-1), priority, out_dtype=self.weight.dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, on the executor"


_PROXY_BASES: dict[type, type] = {nn.Linear: LinearProxy, Conv1D: Conv1DProxy, nn.Embedding: EmbeddingProxy}
_proxy_classes: dict[type, type] = {}


def proxy_class(cls: type) -> type:
    """The proxy type for module type ``cls``: a subclass of ``cls`` with the proxy below it in the MRO."""
    if cls in _proxy_classes:
        return _proxy_classes[cls]
    root = next((r for r in _PROXY_BASES if issubclass(cls, r)), None)
    if root is None:
        raise TypeError(f"no proxy for {cls.__name__}: only nn.Linear, Conv1D and nn.Embedding ops run on the executor")
    proxy = _PROXY_BASES[root] if cls is root else type(f"{cls.__name__}Proxy", (cls, _PROXY_BASES[root]), {})
    _proxy_classes[cls] = proxy
    return proxy


def make_proxy(original: nn.Module, name: str, device: torch.device) -> nn.Module:
    """A proxy of ``original`` (usually on the meta device) with a phantom weight on ``device``.

    Everything but the weight is kept: attributes, bias (still to be loaded), buffers, submodules.
    """
    proxy = proxy_class(type(original)).__new__(proxy_class(type(original)))
    nn.Module.__init__(proxy)
    for key, value in vars(original).items():
        if key not in _MODULE_INTERNALS:
            proxy.__dict__[key] = value
    proxy.training = original.training
    weight = original.weight
    phantom = PhantomWeight(tuple(weight.shape), weight.dtype, device, name, transposed=isinstance(original, Conv1D))
    proxy.weight = nn.Parameter(phantom, requires_grad=False)
    for key, param in original._parameters.items():
        if key != "weight":
            proxy.register_parameter(key, param)
    for key, buffer in original._buffers.items():
        proxy.register_buffer(key, buffer, persistent=key not in original._non_persistent_buffers_set)
    for key, child in original._modules.items():
        proxy.add_module(key, child)
    return proxy


def connect_linear(proxy: LinearProxy | Conv1DProxy, remote: RemoteLinear, group: FusionGroup | None, role: str) -> None:
    """Route a linear proxy's product to ``remote`` (and its fusion group, as ``role``); products that
    client code computes with the proxy's weight go to ``remote`` too."""
    proxy.weight.connect(remote)
    proxy._remote = remote
    proxy._group = group
    proxy._role = role


def connect_embedding(proxy: EmbeddingProxy, session: ClientSession, info: OpInfo) -> None:
    """Route an embedding proxy's lookups to the executor op ``info``."""
    proxy._session = session
    proxy._info = info
