"""The engine's key/value cache: fixed-size blocks of slots in one pool per layer, handed to sequences
as they grow (paged, as in vLLM), within a memory budget fixed at start.

Slot ``s`` of layer ``l`` holds one token's key and value: ``keys[l][s]`` is ``[kv_heads, key_dim]``,
``values[l][s]`` ``[kv_heads, value_dim]`` (the two differ in multi-head latent attention, DeepSeek V2/V3).
Block ``b`` owns slots ``[b * block_size, (b + 1) * block_size)``; a sequence's block table lists its
blocks in order, so its position ``p`` lives in slot ``table[p // block_size] * block_size + p %
block_size``. Block 0 is never handed out: it stays zero and pads gathers (a padded key is masked
out, and zeros keep uninitialised memory, possibly NaN, out of the products). Blocks are counted
references: the choices of one prompt share its full blocks, and sequences whose prompts start
alike share the blocks of their common start (prefix caching, ``BlockPool.register``).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

NULL_BLOCK = 0


@dataclass(frozen=True)
class CacheLayout:
    """The shape of one token's cache entry: ``(kv_heads, key_dim, value_dim)`` per attention layer."""

    layers: tuple[tuple[int, int, int], ...]
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return sum(heads * (key_dim + value_dim) * element for heads, key_dim, value_dim in self.layers)


class BlockPool:
    """Reference-counted blocks ``1 .. num_blocks - 1`` (block 0 is the null block), and the prefix cache.

    A block whose content is registered (``register``: a full block of computed keys and values, under
    a key naming that content) stays findable (``lookup``) while it is used and after: released by
    every sequence, it waits in least-recently-used order and is only reused for other content, its
    registration dropped, when no never-registered block is free. So ``free`` counts both kinds.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody holds, least recently used first
        self._by_key: dict[Hashable, int] = {}
        self._key_of: dict[int, Hashable] = {}
        self._serial: dict[int, int] = {}
        self._serials = 0

    @property
    def free(self) -> int:
        """Blocks that ``allocate`` can hand out (cached ones included)."""
        return len(self._free) + len(self._cached)

    @property
    def cached(self) -> int:
        """Registered blocks nobody holds (findable until reused)."""
        return len(self._cached)

    @property
    def capacity(self) -> int:
        """Blocks a single sequence could ever own."""
        return self.num_blocks - 1

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks for new content, or None (and nothing taken) when fewer are free; never-registered
        blocks first, then the least recently used cached ones (which lose their registration)."""
        if count > self.free:
            return None
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._by_key[self._key_of.pop(block)], self._serial[block]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def register(self, block: int, key: Hashable) -> int:
        """Record that held ``block`` holds the content ``key`` names; returns that content's serial (an
        integer never reused, for keys that chain on it): ``block``'s, or that of a block registered
        before with the same content."""
        known = self._by_key.get(key)
        if known is not None:
            return self._serial[known]
        if block not in self._key_of:
            self._by_key[key] = block
            self._key_of[block] = key
            self._serials += 1
            self._serial[block] = self._serials
        return self._serial[block]

    def lookup(self, key: Hashable) -> tuple[int, int] | None:
        """``(block, serial)`` of the content ``key`` names, if a block holds it (take it with ``share``)."""
        block = self._by_key.get(key)
        return None if block is None else (block, self._serial[block])


class PagedKVCache:
    """The key and value pools of every layer, ``num_blocks`` blocks of ``block_size`` slots each."""

    def __init__(self, layout: CacheLayout, num_blocks: int, block_size: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        slots = num_blocks * block_size
        # empty, not zeros: a slot is read only after it was written, except the null block's
        self.keys = [torch.empty(slots, heads, key_dim, dtype=layout.dtype, device=device) for heads, key_dim, _ in layout.layers]
        self.values = [torch.empty(slots, heads, value_dim, dtype=layout.dtype, device=device) for heads, _, value_dim in layout.layers]
        for tensor in (*self.keys, *self.values):
            tensor[:block_size].zero_()
        self._offsets = torch.arange(block_size, device=device)

    @classmethod
    def within(cls, layout: CacheLayout, budget_bytes: int, block_size: int, device: torch.device | str = "cpu") -> PagedKVCache:
        """As many blocks as ``budget_bytes`` holds (at least 2)."""
        blocks = max(2, budget_bytes // (block_size * layout.bytes_per_token))
        return cls(layout, blocks, block_size, device)

    @property
    def capacity_tokens(self) -> int:
        """The longest sequence the cache could ever hold."""
        return self.pool.capacity * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def slots(self, table: Sequence[int], start: int, stop: int) -> torch.Tensor:
        """The slots of positions ``[start, stop)`` of a sequence with block ``table``."""
        first, last = start // self.block_size, (stop - 1) // self.block_size + 1
        blocks = torch.tensor(table[first:last], device=self._offsets.device)
        slots = (blocks[:, None] * self.block_size + self._offsets).view(-1)
        offset = start - first * self.block_size
        return slots[offset : offset + stop - start]

    def padded_slots(self, tables: Sequence[Sequence[int]], lengths: Sequence[int]) -> torch.Tensor:
        """``[len(tables), max(lengths)]`` slots of every table's first ``lengths[i]`` positions; beyond
        a table's length, the null block's first slot (zeros, masked out by the caller)."""
        width = max(lengths)
        blocks = self.blocks_for(width)
        table = torch.tensor([list(t[:blocks]) + [NULL_BLOCK] * (blocks - min(len(t), blocks)) for t in tables], device=self._offsets.device)
        slots = (table[:, :, None] * self.block_size + self._offsets).view(len(tables), -1)[:, :width]
        within = torch.arange(width, device=slots.device)[None, :] < torch.tensor(lengths, device=slots.device)[:, None]
        return slots.where(within, NULL_BLOCK)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (``[n, kv_heads, key_dim / value_dim]``) of layer ``layer`` in ``slots``."""
        self.keys[layer].index_copy_(0, slots, keys.to(self.layout.dtype))
        self.values[layer].index_copy_(0, slots, values.to(self.layout.dtype))

    def copy_block(self, source: int, target: int) -> None:
        """Block ``target`` becomes a copy of block ``source`` in every layer."""
        size = self.block_size
        for tensor in (*self.keys, *self.values):
            tensor[target * size : (target + 1) * size] = tensor[source * size : (source + 1) * size]
