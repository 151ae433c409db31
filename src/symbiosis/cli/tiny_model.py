"""``symbiosis tiny-model DIR``: a tiny random model with a trained tokenizer, for examples and tests."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tiny import save_tiny_model_with_tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiny-model",
        help="save a tiny random model with a real tokenizer and chat template",
        description="Save a tiny random-weight causal LM (Hugging Face format) with a byte-level BPE tokenizer "
        "trained on a corpus shipped with Symbiosis, and a chat template. Nothing is downloaded.",
    )
    parser.add_argument("path", type=Path, help="output directory")
    parser.add_argument("--model-type", default="llama", help="transformers model type (default llama)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer (and model) vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sizes = dict(hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size, num_hidden_layers=args.layers)
    path = save_tiny_model_with_tokenizer(args.path, args.model_type, seed=args.seed, vocab_size=args.vocab_size, **sizes)
    print(f"saved a tiny {args.model_type} model with its tokenizer to {path}")
    return 0
