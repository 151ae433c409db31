"""``symbiosis finetune``: a PEFT fine-tuning job as a client of an executor (see ``symbiosis.finetune``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SymbiosisError
from ..finetune import METHODS, FineTuneConfig, FineTuneJob, load_config_file, method_config
from .executor_args import add_executor_arguments, load_tokenizer, open_executor


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a PEFT adapter against an executor",
        description="Fine-tune a PEFT adapter on JSONL data as a client of a (shared) executor. Data: "
        '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]} per line. The final adapter '
        "is saved in PEFT format in --output; rerun with --resume after an interruption.",
    )
    add_executor_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", type=Path, required=True, metavar="FILE", help="training JSONL (repeatable)")
    data.add_argument("--eval-data", action="append", type=Path, default=[], metavar="FILE", help="evaluation JSONL (repeatable)")
    data.add_argument("--eval-fraction", type=float, default=0.1, help="without --eval-data: share of the data held out for eval (default 0.1)")
    data.add_argument("--max-length", type=int, help="longest sequence in tokens (default: the model's context, at most 1024)")
    data.add_argument("--truncate", action="store_true", help="cut longer sequences instead of reporting them as errors")
    data.add_argument("--loss-on", choices=["completion", "all"], default="completion", help="completion/assistant tokens only (default) or all")

    method = parser.add_argument_group("PEFT method")
    method.add_argument("--method", choices=METHODS, help="PEFT method (default lora)")
    method.add_argument("--peft-config", type=Path, help="PEFT config JSON (adapter_config.json format) or adapter directory")
    method.add_argument("--r", type=int, default=8, help="rank for lora/loha/lokr (default 8)")
    method.add_argument("--alpha", type=float, default=16, help="alpha for lora/loha/lokr (default 16)")
    method.add_argument("--dropout", type=float, default=0.0, help="dropout for lora (rank dropout for loha/lokr)")
    method.add_argument("--target-modules", help="comma-separated module names, or all-linear (default: PEFT's for the model)")
    method.add_argument("--num-virtual-tokens", type=int, default=16, help="for prefix/prompt/p-tuning (default 16)")

    train = parser.add_argument_group("training")
    train.add_argument("--output", type=Path, required=True, help="output directory (adapter, checkpoints, log.jsonl)")
    train.add_argument("--resume", action="store_true", help="continue the job in --output from its newest checkpoint")
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--eval-batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    train.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name: linear, cosine, constant, ...")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    train.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    train.add_argument("--eval-every", type=int, help="evaluate every N steps (default: with each checkpoint) and at the end")
    train.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true", help="no progress bar (the log is still written)")
    parser.set_defaults(func=run)


def peft_config_from_args(args: argparse.Namespace):
    """The PEFT config chosen by ``--peft-config`` or ``--method`` and its options."""
    if args.peft_config is not None:
        if args.method is not None:
            raise ValueError("give either --method or --peft-config, not both")
        return load_config_file(args.peft_config)
    targets = args.target_modules
    if targets and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return method_config(
        args.method or "lora", r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=targets, num_virtual_tokens=args.num_virtual_tokens
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = FineTuneConfig(
            data=args.data,
            output=args.output,
            peft=peft_config_from_args(args),
            eval_data=args.eval_data,
            eval_fraction=args.eval_fraction,
            max_length=args.max_length,
            loss_on=args.loss_on,
            truncate=args.truncate,
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
            grad_accum=args.grad_accum,
            epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            lr_scheduler=args.lr_scheduler,
            warmup_steps=args.warmup_steps,
            max_grad_norm=args.max_grad_norm or None,
            save_every=args.save_every,
            eval_every=args.eval_every,
            keep_checkpoints=args.keep_checkpoints,
            seed=args.seed,
            device=args.device,
        )
        job = FineTuneJob(config, open_executor(args), load_tokenizer(args))
        result = job.run(resume=args.resume, progress=not args.no_progress)
    except (SymbiosisError, ValueError) as exc:  # bad data, settings or output directory
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loss = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(f"adapter saved to {result.adapter_dir} after {result.steps} steps{loss}")
    return 0
