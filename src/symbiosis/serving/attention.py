"""Attention over the paged KV cache, as a transformers attention function (``ATTENTION``).

The engine's model runs with ``attn_implementation = ATTENTION``; transformers then builds no mask
and hands this function each layer's queries and the new tokens' keys and values (rotary
embeddings applied), ``[1, heads, N, head_dim]`` for the N packed token rows of the step. It
stores the keys and values in their slots, then attends:

* rows that add one token to their sequence (decoding, or a one-token chunk) all at once: every
  sequence's keys gathered into ``[B, kv_heads, longest, head_dim]``, shorter ones padded with the
  null slot and masked out;
* each longer chunk (a prompt being prefilled) on its own, causally from its offset.

Sliding windows (``sliding_window``), chunked attention (Llama 4), logit soft-capping
(``softcap``, Gemma 2) and attention sinks (GPT-OSS) are applied as the model's own attention
applies them; grouped-query attention folds each key/value head's query heads into one product;
values may be narrower than keys (multi-head latent attention, DeepSeek V2/V3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..errors import UnsupportedFeatureError
from . import batch
from .kv import PagedKVCache

#: The attention implementation name the engine sets on its model.
ATTENTION = "symbiosis_paged"


@dataclass(frozen=True)
class PrefillSegment:
    """``count`` query rows from packed row ``start``, the last ``count`` of ``keys`` positions whose slots are ``slots``."""

    start: int
    count: int
    slots: torch.Tensor

    @property
    def keys(self) -> int:
        return self.slots.shape[0]


@dataclass
class AttentionPlan:
    """Where the step's keys go (``write_slots``, one per packed row) and what each query attends to."""

    cache: PagedKVCache
    write_slots: torch.Tensor
    decode_rows: torch.Tensor | None = None
    decode_slots: torch.Tensor | None = None
    decode_lengths: torch.Tensor | None = None
    prefills: list[PrefillSegment] = field(default_factory=list)
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, window: int | None, chunk: int | None = None) -> torch.Tensor:
        """``[B, 1, 1, longest]``: which gathered keys each decoding row sees (within ``window`` of it, or
        within its own ``chunk`` of positions)."""
        key = ("decode", window, chunk)
        if key not in self._masks:
            lengths = self.decode_lengths[:, None]
            index = torch.arange(self.decode_slots.shape[1], device=lengths.device)[None, :]
            mask = index < lengths
            if window is not None:
                mask &= index >= lengths - window
            if chunk is not None:
                mask &= index >= (lengths - 1) // chunk * chunk
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, segment: PrefillSegment, window: int | None, chunk: int | None = None) -> torch.Tensor:
        """``[count, keys]``: causal from the segment's offset (and within ``window``, or the query's ``chunk``)."""
        key = (segment.start, window, chunk)
        if key not in self._masks:
            device = segment.slots.device
            query = torch.arange(segment.keys - segment.count, segment.keys, device=device)[:, None]
            index = torch.arange(segment.keys, device=device)[None, :]
            mask = index <= query
            if window is not None:
                mask &= index > query - window
            if chunk is not None:
                mask &= index >= query // chunk * chunk
            self._masks[key] = mask
        return self._masks[key]


@dataclass
class LayoutProbe:
    """A plan that only records each layer's ``(kv_heads, key_dim, value_dim)`` (one forward at engine start)."""

    layers: dict[int, tuple[int, int, int]] = field(default_factory=dict)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention of one layer for the current engine step; returns ``[1, N, heads, head_dim]``."""
    step = batch.current()
    plan = step.attention if step is not None else None
    layer = getattr(module, "layer_idx", None)
    if plan is None or layer is None:
        raise UnsupportedFeatureError("the paged attention runs only inside an engine step, on attention modules with a layer_idx")
    if isinstance(plan, LayoutProbe):
        plan.layers[layer] = (key.shape[1], key.shape[-1], value.shape[-1])
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    cache = plan.cache
    cache.write(layer, plan.write_slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    queries = query[0].transpose(0, 1)  # [N, heads, head_dim]
    heads, kv_heads, dim, value_dim = queries.shape[1], key.shape[1], queries.shape[2], value.shape[-1]
    group = heads // kv_heads
    chunk = _attention_chunk(module, layer)
    sinks = getattr(module, "sinks", None)  # per head, GPT-OSS: one more logit in each softmax, attending to nothing
    sinks = sinks.detach().to(queries.dtype).view(kv_heads, group, 1) if sinks is not None else None
    out = queries.new_empty(queries.shape[0], heads, value_dim)
    keys, values = cache.keys[layer], cache.values[layer]
    if plan.decode_rows is not None:
        rows, slots = plan.decode_rows, plan.decode_slots
        count, width = slots.shape
        every_row = count == queries.shape[0]  # a step of decoding rows only: no gather or scatter of queries
        gathered = slots.view(-1)
        k = keys.index_select(0, gathered).view(count, width, kv_heads, dim).transpose(1, 2)
        v = values.index_select(0, gathered).view(count, width, kv_heads, value_dim).transpose(1, 2)
        q = (queries if every_row else queries.index_select(0, rows)).reshape(count, kv_heads, group, dim)
        o = _attend(q, k, v, plan.decode_mask(sliding_window, chunk), scaling, softcap, sinks).reshape(count, heads, value_dim)
        if every_row:
            return o[None], None
        out.index_copy_(0, rows, o)
    for segment in plan.prefills:
        n = segment.count
        k = keys.index_select(0, segment.slots).transpose(0, 1)[None]  # [1, kv_heads, keys, dim]
        v = values.index_select(0, segment.slots).transpose(0, 1)[None]
        q = queries[segment.start : segment.start + n].transpose(0, 1).reshape(1, kv_heads, group * n, dim)
        mask = plan.prefill_mask(segment, sliding_window, chunk)
        segment_sinks = sinks.expand(kv_heads, group, n).reshape(kv_heads, group * n, 1) if sinks is not None else None
        o = _attend(q, k, v, mask.repeat(group, 1)[None, None], scaling, softcap, segment_sinks)
        out[segment.start : segment.start + n] = o.view(heads, n, value_dim).transpose(0, 1)
    return out[None], None


def _attention_chunk(module: torch.nn.Module, layer: int) -> int | None:
    """The chunk size of a chunked-attention layer (Llama 4: a query sees the keys of its own chunk of
    ``attention_chunk_size`` positions only; transformers applies it through the mask), else None."""
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None)
    if not types or types[layer] != "chunked_attention":
        return None
    return int(config.attention_chunk_size)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float | None, softcap: float | None, sinks: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of ``q`` over ``k``/``v`` where ``mask`` is True; soft-capped logits as Gemma 2
    does; ``sinks`` (one logit per query row, broadcast over the scores' leading dimensions) join each
    softmax and attend to nothing, as GPT-OSS's do."""
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.expand(*scores.shape[:-1], 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


AttentionInterface.register(ATTENTION, paged_attention)
