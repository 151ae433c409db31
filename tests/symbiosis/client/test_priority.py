"""Each client chooses its own priority, and its backward requests carry it as well as its forward ones."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from symbiosis import BaseExecutor, load_model
from symbiosis.protocol import PRIORITY_INFERENCE, PRIORITY_TRAINING, Direction

from ..recording import RecordingTransport

IDS = torch.tensor([[3, 4, 5, 6, 7]])


@pytest.fixture(scope="module")
def executor(model_dir):
    return BaseExecutor.from_pretrained(model_dir("llama"))


@pytest.mark.parametrize(
    ("priority", "expected"),
    [(5, 5), ("inference", PRIORITY_INFERENCE), ("training", PRIORITY_TRAINING), ("auto", PRIORITY_TRAINING), (None, PRIORITY_TRAINING)],
)
def test_a_training_step_carries_the_clients_priority_both_ways(executor, priority, expected):
    recorder = RecordingTransport(executor)
    model = get_peft_model(load_model(recorder, priority=priority), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear"))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert recorder.priorities(Direction.FORWARD) == {expected}
    assert recorder.priorities(Direction.BACKWARD) == {expected}


@pytest.mark.parametrize(("priority", "expected"), [(5, 5), ("training", PRIORITY_TRAINING), ("auto", PRIORITY_INFERENCE)])
def test_generation_carries_the_clients_priority(executor, priority, expected):
    recorder = RecordingTransport(executor)
    load_model(recorder, priority=priority).generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
    assert recorder.priorities(Direction.FORWARD) == {expected}
    assert recorder.priorities(Direction.BACKWARD) == set()

