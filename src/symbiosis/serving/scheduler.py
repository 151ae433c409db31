"""Which sequences run at the next step, and how many of their tokens: continuous batching with
chunked prefill under a token budget, admission by free KV blocks, preemption by recomputation.

A sequence's positions are its adapter's virtual tokens (prompt and prefix tuning), then its prompt,
then what it generated; ``computed`` of them have keys and values in the cache. Each step:

1. Running sequences, oldest first, each get their remaining positions — one when decoding, a
   chunk of a prompt being prefilled — while the step's token budget lasts. A sequence that needs a
   block when none is free takes it from the newest running sequence, which is preempted: its
   blocks are freed and it goes back to the front of the queue, to be recomputed (prompt and
   generated tokens) when it is admitted again.
2. Then, unless step 1 preempted, queued sequences in arrival order are admitted while the budget,
   the running-sequence limit and free blocks allow (a sequence whose adapter is still loading is
   passed over, without holding back the others; the first that finds no free blocks stops
   admission, so load beyond capacity waits in the queue). A sequence admitted without blocks first
   takes the cached blocks of the longest start it shares with sequences computed before (prefix
   caching: full blocks, keyed by their tokens, everything before them and the adapter), and
   computes only the rest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .kv import PagedKVCache
from .sampling import TokenLogprob
from .text import TextStream

if TYPE_CHECKING:
    from .adapters import AdapterInfo, LoadedAdapter


@dataclass(eq=False)
class Sequence:
    """One choice of one request, from queueing to its last token."""

    request: Any  # engine.GenerationRequest
    choice: int
    tokens: list[int]
    prompt_len: int
    arrival: int
    generator: torch.Generator
    stream: TextStream
    info: AdapterInfo | None = None
    forks: int = 0
    adapter: LoadedAdapter | None = None
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sent_prompt_logprobs: bool = False
    pending_tokens: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_at: float | None = None  # time.monotonic() of its first generated token
    registered: int = 0  # leading blocks registered in the prefix cache
    serial: int = 0  # content serial of the last of them (0: none)

    @property
    def virtual(self) -> int:
        """Positions ahead of the prompt: the adapter's virtual tokens or prefix."""
        return self.info.virtual_tokens if self.info is not None else 0

    @property
    def written_prefix(self) -> int:
        """Positions whose keys and values are written, not computed (prefix tuning's prefix)."""
        return self.virtual if self.adapter is not None and self.adapter.prefix is not None else 0

    @property
    def total(self) -> int:
        return self.virtual + len(self.tokens)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled.is_set()


@dataclass(frozen=True)
class Chunk:
    """Positions ``[start, start + count)`` of ``seq`` computed this step; ``write_prefix``: the adapter's
    prefix keys and values go into positions ``[0, start)`` first."""

    seq: Sequence
    start: int
    count: int
    write_prefix: bool = False

    @property
    def stop(self) -> int:
        return self.start + self.count


class Scheduler:
    """Queued and running sequences of one engine (used by the engine's thread only)."""

    def __init__(self, cache: PagedKVCache, *, max_seqs: int, max_step_tokens: int, prefix_caching: bool = True) -> None:
        if max_seqs < 1 or max_step_tokens < 1:
            raise ValueError("max_seqs and max_step_tokens must be >= 1")
        self.cache = cache
        self.max_seqs = max_seqs
        self.max_step_tokens = max_step_tokens
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.cached_tokens = 0  # positions admitted from the prefix cache instead of computed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ready: Callable[[Sequence], bool]) -> list[Chunk]:
        """The next step's chunks; ``ready(seq)`` says whether a queued sequence's adapter is resident."""
        budget, chunks, preempted = self.max_step_tokens, [], False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(seq.total - seq.computed, budget)
            if count <= 0:
                index += 1
                continue
            if not self._reserve(seq, seq.computed + count):
                victim = self.running.pop()
                self.preempt(victim)
                preempted = True
                continue
            chunks.append(Chunk(seq, seq.computed, count))
            budget -= count
            index += 1
        if preempted:
            return chunks
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_seqs:
                break
            if not ready(seq):
                continue
            reused = self._reuse(seq)
            start = max(seq.computed, seq.written_prefix)
            count = min(seq.total - start, budget)
            if not self._reserve(seq, start + count):
                self._forget(seq)
                break
            self.cached_tokens += reused
            self.waiting.remove(seq)
            self.running.append(seq)
            chunks.append(Chunk(seq, start, count, write_prefix=start > seq.computed))
            budget -= count
        return chunks

    def register_computed(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that its computed positions fill, for other sequences to reuse."""
        if not self._cacheable(seq):
            return
        pool = self.cache.pool
        for index in range(seq.registered, seq.computed // self.cache.block_size):
            seq.serial = pool.register(seq.blocks[index], self._block_key(seq, index, seq.serial))
            seq.registered = index + 1

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first, to be recomputed (from its cached blocks, where they last)."""
        self._forget(seq)
        if seq.prompt_logprobs is not None and not seq.sent_prompt_logprobs:
            seq.prompt_logprobs = [None]
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _cacheable(self, seq: Sequence) -> bool:
        """Whether ``seq``'s blocks go through the prefix cache: not for adapters' virtual tokens or prefix."""
        return self.prefix_caching and seq.virtual == 0

    def _reuse(self, seq: Sequence) -> int:
        """Give a sequence that has no blocks yet the cached blocks of its longest cached start (always
        leaving its last position to compute, whose logits it needs; all of it when the prompt's
        log-probabilities are still to be reported); returns the positions reused."""
        if seq.blocks or not self._cacheable(seq) or (seq.prompt_logprobs is not None and not seq.sent_prompt_logprobs):
            return 0
        size, pool = self.cache.block_size, self.cache.pool
        blocks, serial = [], 0
        for index in range((seq.total - 1) // size):
            hit = pool.lookup(self._block_key(seq, index, serial))
            if hit is None:
                break
            block, serial = hit
            blocks.append(block)
        pool.share(blocks)
        seq.blocks, seq.computed, seq.registered, seq.serial = blocks, len(blocks) * size, len(blocks), serial
        return seq.computed

    def _block_key(self, seq: Sequence, index: int, before: int) -> tuple:
        """The prefix cache's key of block ``index`` of cacheable ``seq``: the serial of the content
        ``before`` it, the adapter, and the block's tokens."""
        size = self.cache.block_size
        return before, seq.info, tuple(seq.tokens[index * size : (index + 1) * size])

    def _forget(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks; it has computed nothing."""
        self.cache.pool.release(seq.blocks)
        seq.blocks, seq.computed, seq.registered, seq.serial = [], 0, 0, 0

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or cancelled) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.pool.release(seq.blocks)
        seq.blocks = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run ``child`` from ``parent``'s cache: full blocks shared, the partial last block copied
        (recomputed from scratch if no block is free)."""
        child.computed = parent.computed
        size = self.cache.block_size
        full = parent.computed // size
        child.blocks = list(parent.blocks[:full])
        child.registered, child.serial = parent.registered, parent.serial
        self.cache.pool.share(child.blocks)
        if parent.computed % size:
            block = self.cache.pool.allocate(1)
            if block is None:
                self._forget(child)
                self.waiting.appendleft(child)
                return
            self.cache.copy_block(parent.blocks[full], block[0])
            child.blocks += block
        self.running.append(child)

    def _reserve(self, seq: Sequence, positions: int) -> bool:
        """Give ``seq`` the blocks for ``positions`` positions; False (nothing taken) if too few are free."""
        missing = self.cache.blocks_for(positions) - len(seq.blocks)
        if missing <= 0:
            return True
        blocks = self.cache.pool.allocate(missing)
        if blocks is None:
            return False
        seq.blocks += blocks
        return True
