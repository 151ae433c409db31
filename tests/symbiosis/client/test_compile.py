"""``torch.compile`` of a client: requests to the executor are graph breaks (proxies are not traced),
everything around them compiles, and the results equal eager execution."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from symbiosis import BaseExecutor, load_model

from ..equivalence import assert_close, assert_gradients_close, trainable_grads


@pytest.fixture(scope="module")
def executor(model_dir):
    return BaseExecutor.from_pretrained(model_dir("llama"))


def peft_client(executor):
    torch.manual_seed(0)
    return get_peft_model(load_model(executor), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))


def batch():
    return torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(1))


def test_compiled_forward_equals_eager(executor):
    eager, compiled = peft_client(executor), peft_client(executor)
    for model in (eager, compiled):
        model.train()
        with torch.no_grad():  # non-zero LoRA B, so every adapter gradient is non-trivial
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.01)
    compiled.forward = torch.compile(compiled.forward)
    ids = batch()
    outputs = [model(input_ids=ids, labels=ids) for model in (eager, compiled)]
    assert_close(outputs[1].logits, outputs[0].logits, "logits")
    for output in outputs:
        output.loss.backward()
    assert_gradients_close(trainable_grads(compiled), trainable_grads(eager))


def test_trainer_torch_compile_equals_eager(executor, tmp_path):
    data = [{"input_ids": row, "labels": row} for row in batch()]
    results = []
    for compile_model in (False, True):
        model = peft_client(executor)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(compile_model)), per_device_train_batch_size=2, max_steps=3, learning_rate=0.1, optim="sgd",
            report_to=[], use_cpu=True, torch_compile=compile_model, logging_steps=1, save_strategy="no", disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=copy.deepcopy(data))
        trainer.train()
        losses = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
        results.append((losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (eager_losses, eager_adapter), (compiled_losses, compiled_adapter) = results
    assert len(eager_losses) == 3
    assert_close(compiled_losses, eager_losses, "loss curve")
    for name, value in eager_adapter.items():
        assert_close(compiled_adapter[name], value, name)
