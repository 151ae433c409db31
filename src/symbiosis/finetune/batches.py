"""The order in which a job sees its data, addressable by position, and padding examples into batches.

Micro-batch ``i`` is a pure function of (number of examples, batch size, seed, ``i``): epoch ``e``
walks a permutation drawn from a generator seeded with ``seed + e``. A job that resumes at
micro-batch ``i`` therefore sees exactly the batches an uninterrupted job would have seen, without
replaying or storing an iterator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .data import IGNORE_INDEX, Example


class BatchPlan:
    """Seeded per-epoch shuffling of ``num_examples`` examples into micro-batches of ``batch_size``."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if num_examples < 1 or batch_size < 1:
            raise ValueError("need at least one example and a batch size >= 1")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = math.ceil(num_examples / batch_size)
        self._epoch: tuple[int, list[int]] = (-1, [])

    def _permutation(self, epoch: int) -> list[int]:
        if self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch = (epoch, torch.randperm(self.num_examples, generator=generator).tolist())
        return self._epoch[1]

    def position(self, index: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of micro-batch ``index``."""
        return divmod(index, self.batches_per_epoch)

    def micro_batch(self, index: int) -> list[int]:
        """Indices of the examples in micro-batch ``index`` (the last batch of an epoch may be smaller)."""
        epoch, batch = self.position(index)
        start = batch * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the shifted causal-LM loss counts: labelled positions after the first of each row."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
