"""Command-line options shared by tools that attach clients to an executor, and what they open."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..executor.quantized import ALIASES, QUANTIZATIONS
from ..executor_ref import ExecutorRef


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--executor`` (repeatable), ``--token``, ``--tokenizer``, ``--dtype``, ``--device``."""
    group = parser.add_argument_group("base model and executor")
    group.add_argument("--model", type=Path, help="local Hugging Face model directory: runs the executor in this process and supplies the tokenizer")
    group.add_argument(
        "--executor",
        action="append",
        default=[],
        metavar="URL",
        help="symbiosis://host:port of a running executor instead of --model (repeat for a sharded base)",
    )
    group.add_argument("--token", help="access token for --executor")
    group.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: --model)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of an in-process executor")
    group.add_argument("--device", default="cpu", help="device of the clients (and of an in-process executor)")
    add_quantize_argument(group)


def add_quantize_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--quantize {int8,nf4,fp4,4bit}``: hold the base's linear ops quantized by bitsandbytes."""
    parser.add_argument("--quantize", choices=[*QUANTIZATIONS, *ALIASES], type=str.lower,
                        help="hold the linear ops of an executor run here quantized (bitsandbytes; 4bit = nf4): "
                             "a QLoRA base shared by every client")


def open_executor(args: argparse.Namespace, **executor_options: Any) -> ExecutorRef:
    """The executor named by the arguments: ``--executor`` addresses, else ``--model`` in this process."""
    if not args.executor and args.model is None:
        raise SystemExit("error: give --model DIR (an in-process executor) or --executor symbiosis://HOST:PORT")
    if args.quantize:
        executor_options["quantization"] = args.quantize
    return ExecutorRef.open(
        model_dir=args.model, addresses=args.executor, token=args.token, dtype=args.dtype, device=args.device, **executor_options
    )


def load_tokenizer(args: argparse.Namespace) -> PreTrainedTokenizerBase:
    """The tokenizer from ``--tokenizer``, else from ``--model``."""
    source = args.tokenizer or args.model
    if source is None:
        raise SystemExit("error: with --executor, give --tokenizer DIR (or --model DIR) for the tokenizer")
    return AutoTokenizer.from_pretrained(source)
