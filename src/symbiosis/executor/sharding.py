"""Which ops a shard owns when the base is split into layer ranges.

Rule: an op whose module path has a numeric component belongs to the layer that number names (the
first numeric component: ``model.layers.3.mlp.experts.1.up_proj`` is layer 3). An op outside the
layer stack belongs to the shard that owns layer 0 when it comes before the stack in module order
(the input embedding, input projections) and to the shard that owns the last layer otherwise (the
LM head, output projections). Shards with ranges ``[0, a), [a, b), ..., [z, L)`` therefore own
every op exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence


def layer_index(op: str) -> int | None:
    """The layer number of module path ``op`` (its first numeric component), or None."""
    return next((int(part) for part in op.split(".") if part.isdigit()), None)


def count_layers(ops: Sequence[str]) -> int:
    """Number of layers in the stack, from the highest layer number among ``ops``."""
    return max((i for i in map(layer_index, ops) if i is not None), default=-1) + 1


def parse_layer_range(text: str) -> tuple[int, int]:
    """``"0:12"`` -> ``(0, 12)`` (start inclusive, end exclusive)."""
    start, sep, end = text.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        raise ValueError(f"a layer range looks like START:END (e.g. 0:12), got {text!r}")
    return int(start), int(end)


def owned_ops(ops: Sequence[str], layers: tuple[int, int]) -> set[str]:
    """The ops (module paths in module order) that the shard for ``layers`` = [start, end) owns."""
    total = count_layers(ops)
    start, end = layers
    if not 0 <= start < end <= total:
        raise ValueError(f"layer range {start}:{end} is not within the model's {total} layers (0:{total})")
    indices = [layer_index(op) for op in ops]
    first_layered = next((pos for pos, i in enumerate(indices) if i is not None), len(ops))
    owned = set()
    for pos, (op, index) in enumerate(zip(ops, indices)):
        if index is None:
            index = 0 if pos < first_layered else total - 1
        if start <= index < end:
            owned.add(op)
    return owned
