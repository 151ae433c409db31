"""Data-parallel and sharded training of clients: the frozen base stays out of every collective.

Every rank of a data-parallel job is a client of the same executor, so the base is shared already;
only the client's own tensors take part in broadcasts, all-reduces and sharding. ``load_model``
marks a client for ``DistributedDataParallel`` (what ``transformers.Trainer`` and accelerate use
under ``torchrun``): DDP reads the names to leave alone from the wrapped module's
``_ddp_params_and_buffers_to_ignore``, which a client and a PEFT model around it (which forwards
unknown attributes to the model it wraps) both answer with the base weights' names. For a module of
your own around a client, or for FSDP, use the helpers below.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .phantom import PhantomWeight

#: Where PEFT's ``PeftModel`` / ``PeftMixedModel`` keep the model they wrap.
_PEFT_PREFIX = "base_model.model."


def base_weights(module: nn.Module) -> list[nn.Parameter]:
    """The frozen base weights (executor ops) among ``module``'s parameters, e.g. for FSDP's
    ``ignored_states`` or FSDP2's ``fully_shard(..., ignored_params=...)``."""
    return [param for param in module.parameters() if isinstance(param, PhantomWeight)]


def base_weight_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s frozen base weights, relative to ``module`` (for
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``)."""
    return [name for name, param in module.named_parameters() if isinstance(param, PhantomWeight)]


class DdpIgnoredNames:
    """What a client answers for ``_ddp_params_and_buffers_to_ignore``: its base weights' names,
    relative to itself and to a PEFT model wrapping it, computed when DDP asks (after PEFT wrapped
    the layers)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def __iter__(self) -> Iterator[str]:
        for name in base_weight_names(self._model):
            yield name
            yield _PEFT_PREFIX + name

    def __repr__(self) -> str:
        return f"DdpIgnoredNames({len(base_weight_names(self._model))} base weights)"


def exclude_base_from_ddp(model: nn.Module) -> None:
    """Make ``DistributedDataParallel`` skip ``model``'s base weights, wrapped by PEFT or not."""
    model._ddp_params_and_buffers_to_ignore = DdpIgnoredNames(model)
