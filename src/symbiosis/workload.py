"""Synthetic learnable tasks and client jobs, shared by the demo, the tests and the benchmarks.

The task: sequences over ``span`` token ids that follow ``x[t+1] = (a * x[t] + b) mod span`` for
client-specific ``(a, b)``. A model that learns its client's rule predicts every token after the
first, so the loss of a working fine-tuning job falls fast and differently for each client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class AffineTask:
    """Sequences of ids ``low + s`` with ``s[t+1] = (a * s[t] + b) mod span`` (ids below ``low`` unused)."""

    vocab: int
    a: int = 1
    b: int = 1
    low: int = 3
    span: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.span <= self.vocab - self.low:
            raise ValueError(f"span must lie in [1, {self.vocab - self.low}] for a vocabulary of {self.vocab}")

    def sequences(self, count: int, length: int, *, seed: int) -> torch.Tensor:
        """``count`` sequences of ``length`` tokens, with random first tokens from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(0, self.span, (count, 1), generator=generator)
        steps = [first]
        for _ in range(length - 1):
            steps.append((self.a * steps[-1] + self.b) % self.span)
        return torch.cat(steps, dim=1) + self.low


@dataclass
class TrainResult:
    """Losses per step and the throughput of a fine-tuning job."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train(
    model: nn.Module,
    task: AffineTask,
    *,
    steps: int,
    batch_size: int = 4,
    seq_len: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    optimizer_factory: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """A plain PyTorch fine-tuning loop over the trainable parameters of ``model`` (a PEFT model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (wrap it with PEFT first)")
    optimizer = optimizer_factory(params, lr=lr)
    device = params[0].device
    data = task.sequences(steps * batch_size, seq_len, seed=seed).to(device)
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = data[step * batch_size : (step + 1) * batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        result.tokens += batch.numel()
        if on_step is not None:
            on_step(step, result.losses[-1])
    result.seconds = time.perf_counter() - start
    return result


def generate(
    model: nn.Module,
    task: AffineTask,
    *,
    requests: int,
    prompt_len: int = 4,
    new_tokens: int = 8,
    seed: int = 0,
    on_request: Callable[[int, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """Greedy generation for ``requests`` prompts of ``task``, one request at a time."""
    device = next(model.parameters()).device
    prompts = task.sequences(requests, prompt_len, seed=seed).to(device)
    model.eval()
    outputs = []
    for index in range(requests):
        prompt = prompts[index : index + 1]
        tokens = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False
        )
        outputs.append(tokens[0, prompt_len:].cpu())
        if on_request is not None:
            on_request(index, outputs[-1])
    return outputs
