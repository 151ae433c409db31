"""A sharded base: several executors, each serving a layer range, seen by a client as one.

Each op is routed to the shard that serves it (the ownership rule is ``executor.sharding``); frozen
tensors come from the first shard (every shard holds them all), except an op's own weight
(``<op>.weight``, e.g. for a client-side LM head), which comes from that op's owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import BadRequestError
from ..protocol import ModelSpec, OpRequest
from .base import Transport


class ShardedTransport:
    """Routes each op to its owner among ``shards`` (transports whose layer ranges tile the model)."""

    def __init__(self, shards: Sequence[Transport]) -> None:
        if not shards:
            raise ValueError("a sharded base needs at least one shard")
        specs = [shard.spec() for shard in shards]
        order = sorted(range(len(shards)), key=lambda i: (specs[i].layer_range or (0, 0))[0])
        self.shards = [shards[i] for i in order]
        specs = [specs[i] for i in order]
        _check_tiling(specs)
        self._owner: dict[str, Transport] = {}
        for shard, spec in zip(self.shards, specs):
            for op in spec.ops:
                if op in self._owner:
                    raise ValueError(f"op {op} is served by two shards")
                self._owner[op] = shard
        first = specs[0]
        self._spec = ModelSpec(
            config=first.config,
            generation_config=first.generation_config,
            dtype=first.dtype,
            device=",".join(spec.device for spec in specs),
            ops={op: info for spec in specs for op, info in spec.ops.items()},
            fusion_groups={leader: fused for spec in specs for leader, fused in spec.fusion_groups.items()},
            tensors=first.tensors,
        )

    def spec(self) -> ModelSpec:
        return self._spec

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[int, list[str]] = {}
        for name in names:
            owner = self._owner.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
            index = self.shards.index(owner) if owner is not None and name not in self._spec.tensors else 0
            by_shard.setdefault(index, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for index, group in by_shard.items():
            out.update(self.shards[index].tensors(group))
        return out

    def run(self, request: OpRequest) -> torch.Tensor:
        owner = self._owner.get(request.op)
        if owner is None:
            raise BadRequestError(f"unknown op {request.op!r}")
        return owner.run(request)

    def owner_of(self, op: str) -> Transport:
        """The shard that serves ``op``."""
        return self._owner[op]


def _check_tiling(specs: list[ModelSpec]) -> None:
    """The shards' layer ranges must be [0, a), [a, b), ..., [z, L) of one model with L layers."""
    if len(specs) == 1 and specs[0].layer_range is None:
        return
    ranges = [spec.layer_range for spec in specs]
    if any(r is None for r in ranges):
        raise ValueError("every shard of a sharded base must serve a layer range (serve --layers A:B)")
    if any(spec.config != specs[0].config for spec in specs):
        raise ValueError("the shards serve different models")
    expected = 0
    for start, end in ranges:
        if start != expected:
            raise ValueError(f"the shards' layer ranges {ranges} leave a gap or overlap at layer {expected}")
        expected = end
    from ..client.model import config_from_spec  # deferred: the client package imports this one

    layers = getattr(config_from_spec(specs[0]), "num_hidden_layers", expected)
    if expected != layers:
        raise ValueError(f"the shards' layer ranges {ranges} stop at layer {expected}; the model has {layers}")
