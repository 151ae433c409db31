"""A sharded base: several executors, each serving a layer range, seen by a client as one.

Each op is routed to the shard that serves it (the ownership rule is ``executor.sharding``); frozen
tensors come from the first shard (every shard holds them all), except an op's own weight
(``<op>.weight``, e.g. for a client-side LM head), which comes from that op's owner. The shards must
tile the model's layers and serve one base: the same config and the same weights (by fingerprint).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import BadRequestError
from ..protocol import ModelSpec, OpRequest, config_from_spec
from .base import Transport
from .fingerprint import fingerprint_of


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
        _check_same_base(self.shards, specs)
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
    if any(_architecture(spec) != _architecture(specs[0]) for spec in specs):
        raise ValueError("the shards serve different models (their configs differ)")
    expected = 0
    for start, end in ranges:
        if start != expected:
            raise ValueError(f"the shards' layer ranges {ranges} leave a gap or overlap at layer {expected}")
        expected = end
    layers = getattr(config_from_spec(specs[0]), "num_hidden_layers", expected)
    if expected != layers:
        raise ValueError(f"the shards' layer ranges {ranges} stop at layer {expected}; the model has {layers}")


def _architecture(spec: ModelSpec) -> dict:
    """The config without where it was loaded from (copies of one checkpoint on different hosts agree)."""
    return {key: value for key, value in spec.config.items() if key != "_name_or_path"}


def _check_same_base(shards: list[Transport], specs: list[ModelSpec]) -> None:
    """The shards must hold the same frozen weights, not just the same config."""
    if len(shards) == 1:
        return
    fingerprints = [fingerprint_of(shard, spec) for shard, spec in zip(shards, specs)]
    if len(set(fingerprints)) > 1:
        raise ValueError(f"the shards serve different base weights (fingerprints {', '.join(f[:12] for f in fingerprints)})")
