"""One rank of a data-parallel fine-tuning job on a shared executor (run by ``torchrun``).

Every rank is a Symbiosis client of the executor at ``--executor``, wrapped by PEFT and then by
``DistributedDataParallel`` (gloo), trains LoRA on its half of a fixed global batch, and rank 0 saves
the adapter; then the same with ``transformers.Trainer``, which sets up DDP itself (accelerate), and
with FSDP (``use_orig_params=True``, the base weights as ``ignored_states``). The test compares the
adapters with a single-process run on the full batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainingArguments

from symbiosis import load_model
from symbiosis.client import base_weights

STEPS = 3
#: Plain SGD: the comparison is of what DDP computes (AdamW's normalised first steps would amplify
#: float32 rounding differences between an all-reduced mean and a full-batch gradient).
LR = 0.5


def lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")


def global_batch() -> torch.Tensor:
    """Four sequences of equal length (so the mean over the batch is the mean of the ranks' means)."""
    return torch.randint(3, 250, (4, 12), generator=torch.Generator().manual_seed(11))


def peft_client(executor: str, rank: int):
    torch.manual_seed(0)  # identical adapter initialisation on every rank and in the reference
    return get_peft_model(load_model(executor, client_id=f"rank{rank}"), lora())


def train_half(wrapped: torch.nn.Module, rank: int, world: int) -> None:
    """``STEPS`` SGD steps of ``wrapped`` on this rank's half of the global batch."""
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    ids = global_batch().chunk(world)[rank]
    for _ in range(STEPS):
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def manual_ddp(executor: str, rank: int, world: int, out: Path) -> None:
    model = peft_client(executor, rank)
    model.train()
    train_half(DistributedDataParallel(model), rank, world)
    if rank == 0:
        model.save_pretrained(out / "ddp")


def fsdp(executor: str, rank: int, world: int, out: Path) -> None:
    model = peft_client(executor, rank)
    model.train()
    sharded = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True, ignored_states=base_weights(model))
    train_half(sharded, rank, world)
    with FullyShardedDataParallel.summon_full_params(sharded):
        if rank == 0:
            model.save_pretrained(out / "fsdp")


def trainer(executor: str, rank: int, world: int, out: Path) -> None:
    ids = global_batch()
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(out / "trainer-run"),
        per_device_train_batch_size=len(dataset) // world,
        num_train_epochs=STEPS,  # one global batch per epoch: every step sees the whole dataset
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    model = peft_client(executor, rank)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    if rank == 0:
        model.save_pretrained(out / "trainer")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--executor", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    manual_ddp(args.executor, rank, world, args.out)
    dist.barrier()
    trainer(args.executor, rank, world, args.out)
    dist.barrier()
    fsdp(args.executor, rank, world, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
