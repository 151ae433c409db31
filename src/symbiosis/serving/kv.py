"""A running batch's KV cache: rows join (left-padded to a common length) and leave at any step.

Every row's cache entries are right-aligned: row ``i`` holds ``lengths[i]`` real entries at the end
of the time axis and padding before them, which its attention mask hides. Positions are passed
explicitly, so padding never shifts a row's positions; the causal mask of transformers indexes the
cache, not positions, so right-aligned rows attend exactly to their own entries (a sliding window
compares distances, which the shift keeps). Sliding-window layers are batched while every row stays
shorter than the window, so that no layer ever drops entries (``batch_limit``).
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import UnsupportedFeatureError

_BATCHABLE = (DynamicLayer, DynamicSlidingWindowLayer)


def batch_limit(cache: Cache) -> int | None:
    """The longest sequence a row of ``cache`` may reach in a running batch (None: no limit).

    Raises ``UnsupportedFeatureError`` for caches other than growing key/value layers (full or
    sliding-window attention), e.g. static or linear-attention state.
    """
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(layer) not in _BATCHABLE for layer in layers):
        kinds = ", ".join(sorted({type(layer).__name__ for layer in layers or []})) or "no layers"
        raise UnsupportedFeatureError(
            f"continuous batching needs key/value caches of full or sliding-window attention; this model uses {type(cache).__name__} ({kinds})"
        )
    windows = [layer.sliding_window for layer in layers if isinstance(layer, DynamicSlidingWindowLayer)]
    return min(windows) - 1 if windows else None


def seq_length(cache: Cache | None) -> int:
    return 0 if cache is None else cache.get_seq_length()


def merge(running: DynamicCache | None, joining: DynamicCache) -> DynamicCache:
    """``running`` with ``joining``'s rows appended; the shorter side is left-padded with zeros."""
    if running is None or seq_length(running) == 0:
        return joining
    width = max(seq_length(running), seq_length(joining))
    for mine, theirs in zip(running.layers, joining.layers, strict=True):
        mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
        mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        _sync_length(mine)
    return running


def keep_rows(cache: DynamicCache, rows: list[int], width: int) -> None:
    """Keep only ``rows`` (in that order) and the last ``width`` time steps (the longest kept row)."""
    index = torch.tensor(rows, dtype=torch.long, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, -width:]
        layer.values = layer.values.index_select(0, index)[:, :, -width:]
        _sync_length(layer)


def repeat_rows(cache: DynamicCache, times: int) -> None:
    """Each row repeated ``times`` times in place (n choices sharing one prompt)."""
    if times > 1:
        cache.batch_repeat_interleave(times)


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[-2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:-2], missing, tensor.shape[-1])
    return torch.cat([pad, tensor], dim=-2)


def _sync_length(layer: DynamicLayer) -> None:
    """A sliding-window layer counts the tokens it has seen; below its window that is its width."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = layer.keys.shape[-2]
