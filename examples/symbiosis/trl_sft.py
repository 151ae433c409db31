"""TRL's ``SFTTrainer`` fine-tuning a LoRA adapter on a shared Symbiosis executor.

The script is a plain TRL script: the one Symbiosis line is the model, ``load_model(executor)``,
instead of ``AutoModelForCausalLM.from_pretrained(...)``. Everything else — the dataset formats TRL
reads (``text``, ``prompt``/``completion``, ``messages``), its defaults (bfloat16 autocast,
gradient checkpointing, the fused chunked LM-head loss), the saved adapter — is TRL's own.

    symbiosis tiny-model /tmp/sym/base                       # or any local Hugging Face model
    symbiosis serve /tmp/sym/base --port 50051 &             # the one copy of the base
    python examples/symbiosis/trl_sft.py --executor symbiosis://127.0.0.1:50051 --tokenizer /tmp/sym/base \\
        --data examples/symbiosis/data/chat.jsonl --output /tmp/sym/trl-sft

``--model DIR`` runs the executor in this process instead. The adapter in ``--output`` is standard
PEFT: serve it with ``symbiosis serve-openai --adapter NAME=DIR`` or merge it on a monolithic model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from symbiosis import BaseExecutor, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--executor", help="a shared executor: symbiosis://HOST:PORT")
    where.add_argument("--model", type=Path, help="a model directory: run the executor in this process")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: --model)")
    parser.add_argument("--data", type=Path, required=True, help="JSONL with text, prompt/completion or messages rows")
    parser.add_argument("--output", type=Path, required=True, help="where the adapter is saved")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    if args.tokenizer is None and args.model is None:
        parser.error("--tokenizer is required with --executor")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    executor = args.executor or BaseExecutor.from_pretrained(args.model)
    model = load_model(executor)  # the only line that differs from a plain TRL script
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    config = SFTConfig(
        output_dir=str(args.output),
        max_steps=args.steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        max_length=256,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=str(args.data), split="train"),
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model(str(args.output))
    return args.output


if __name__ == "__main__":
    print(f"adapter saved to {main()}")
