"""``symbiosis`` entry point: one subcommand per module, each exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Modules of ``symbiosis.cli`` that each add one subcommand.
SUBCOMMANDS = ["demo", "finetune", "ray", "serve", "serve_openai", "tiny_model"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symbiosis", description="A frozen base LLM shared by many PEFT clients.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"symbiosis.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
