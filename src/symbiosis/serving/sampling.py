"""Sampling parameters of one request and the choice of each next token (per choice, own RNG)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling parameters: ``temperature`` 0 is greedy; ``top_p`` keeps the smallest set of
    most likely tokens whose probability reaches ``top_p``; ``seed`` makes sampling repeatable
    (choice ``i`` of a call draws from a generator seeded with ``seed + i``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.n < 1:
            raise ValueError("max_tokens and n must be >= 1")
        if not 0 <= self.temperature <= 2:
            raise ValueError("temperature must lie in [0, 2]")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must lie in (0, 1]")

    def generators(self, first_choice: int = 0) -> list[torch.Generator]:
        """Generators of choices ``first_choice`` .. ``first_choice + n - 1``, seeded from ``seed`` or the OS."""
        base = self.seed if self.seed is not None else random.SystemRandom().getrandbits(62)
        return [torch.Generator().manual_seed(base + first_choice + i) for i in range(self.n)]


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token id from a row of logits (``[vocab]``) under ``params``."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # mass before this token already enough
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))
