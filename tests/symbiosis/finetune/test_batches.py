"""The data order is a pure function of the position: every example once per epoch, seeded, resumable."""

from __future__ import annotations

import torch

from symbiosis.finetune.batches import BatchPlan, collate, loss_tokens
from symbiosis.finetune.data import IGNORE_INDEX, Example


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
    plan = BatchPlan(num_examples=10, batch_size=3, seed=5)
    assert plan.batches_per_epoch == 4
    epochs = [[i for b in range(4 * e, 4 * e + 4) for i in plan.micro_batch(b)] for e in range(3)]
    assert all(sorted(order) == list(range(10)) for order in epochs)
    assert epochs[0] != epochs[1]
    assert [len(plan.micro_batch(b)) for b in range(4)] == [3, 3, 3, 1]
    assert plan.position(9) == (2, 1)


def test_a_fresh_plan_resumed_midway_sees_the_same_batches():
    walked = BatchPlan(7, 2, seed=1)
    sequence = [walked.micro_batch(i) for i in range(12)]
    resumed = BatchPlan(7, 2, seed=1)
    assert [resumed.micro_batch(i) for i in range(5, 12)] == sequence[5:]
    assert BatchPlan(7, 2, seed=2).micro_batch(0) != sequence[0] or BatchPlan(7, 2, seed=2).micro_batch(1) != sequence[1]


def test_collate_pads_right_and_counts_shifted_loss_tokens():
    examples = [Example("a:1", [1, 5, 6, 2], [IGNORE_INDEX, 5, 6, 2]), Example("a:2", [1, 7], [IGNORE_INDEX, 7])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert torch.equal(batch["labels"][1], torch.tensor([IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]))
    assert loss_tokens(batch) == 4
