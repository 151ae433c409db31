"""Data-parallel training of clients: ``torchrun`` + DDP (gloo), ``transformers.Trainer`` under
``torchrun`` and FSDP, every rank a client of one executor server; the base never enters a collective."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from symbiosis import BaseExecutor, load_model
from symbiosis.client import base_weight_names, base_weights

from ..equivalence import assert_close
from ..server.servers import free_port, server_process
from . import ddp_worker

WORKER = Path(ddp_worker.__file__)


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def reference_loop(path: Path) -> dict[str, torch.Tensor]:
    """The monolithic model, one process, the whole global batch per step."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), ddp_worker.lora())
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=ddp_worker.LR)
    ids = ddp_worker.global_batch()
    for _ in range(ddp_worker.STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return _adapter_state(model)


def reference_trainer(path: Path, out: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), ddp_worker.lora())
    dataset = [{"input_ids": row, "labels": row} for row in ddp_worker.global_batch()]
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=len(dataset), num_train_epochs=ddp_worker.STEPS, learning_rate=ddp_worker.LR,
        optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    return _adapter_state(model)


def _adapter_state(model) -> dict[str, torch.Tensor]:
    model.save_pretrained(Path(os.environ.get("TMPDIR", "/tmp")) / f"ref-{os.getpid()}")
    return adapter(Path(os.environ.get("TMPDIR", "/tmp")) / f"ref-{os.getpid()}")


def assert_adapters_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], name)


def test_torchrun_ddp_trainer_and_fsdp_equal_one_process_on_the_full_batch(model_dir, tmp_path):
    path = model_dir("llama")
    # the server waits up to 50 ms for the other rank to reach an op, so the ranks' GEMMs meet
    with server_process(path, "--max-wait-ms", "50", "--active-window-ms", "2000") as server:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(WORKER), "--executor", server.address, "--out", str(tmp_path),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-4000:]
        stats = load_model(server.address).symbiosis.transport.stats()
    assert {"rank0", "rank1"} <= set(stats["completed_by_client"])
    assert stats["total"]["shared_gemm_fraction"] > 0, stats["total"]  # the ranks' requests met in GEMMs
    expected = reference_loop(path)
    assert_adapters_equal(adapter(tmp_path / "ddp"), expected)
    assert_adapters_equal(adapter(tmp_path / "fsdp"), expected)
    assert_adapters_equal(adapter(tmp_path / "trainer"), reference_trainer(path, tmp_path / "reference"))


def test_base_weights_are_named_for_ddp_through_peft(model_dir):
    client = load_model(BaseExecutor.from_pretrained(model_dir("llama")))
    model = get_peft_model(client, ddp_worker.lora())
    ignored = set(model._ddp_params_and_buffers_to_ignore)  # what DDP reads from the module it wraps
    names = {name for name, _ in model.named_parameters()}
    assert set(base_weight_names(model)) == ignored & names
    assert len(base_weights(model)) == len(base_weight_names(model)) == 15  # 2 layers x 7 + the LM head
    assert not any(param.requires_grad for param in base_weights(model))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_fsdp_without_ignored_base_weights_names_the_fix(model_dir):
    """FSDP flattens every parameter it manages; a base weight cannot be flattened on a client."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from symbiosis import BaseWeightAccessError

    client = load_model(BaseExecutor.from_pretrained(model_dir("llama")))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(BaseWeightAccessError, match="ignored_states"):
            FullyShardedDataParallel(client, device_id=torch.device("cpu"), use_orig_params=True)
    finally:
        torch.distributed.destroy_process_group()
