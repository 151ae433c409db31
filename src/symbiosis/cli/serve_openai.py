"""``symbiosis serve-openai``: an OpenAI-compatible multi-adapter server on the client side of the split."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from ..serving import HttpServer, ModelRegistry, create_app
from .executor_args import add_executor_arguments, load_tokenizer, open_executor


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve-openai",
        help="serve the base model and PEFT adapters through an OpenAI-compatible API",
        description="Serve the base model and any number of PEFT adapters (LoRA, IA3, LoHa, LoKr, OFT, AdaLoRA, prefix "
        "tuning, prompt tuning, p-tuning, ...) through /v1/models, /v1/completions and /v1/chat/completions; request "
        "model = adapter name or the base model's name. One engine steps every adapter's requests in one forward. "
        "Adapters are added and removed at run time through /admin/adapters.",
    )
    add_executor_arguments(parser)
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the PEFT adapter in DIR as NAME (repeatable; the first --max-adapters are loaded at start, the rest when first requested)",
    )
    parser.add_argument("--base-name", help="model name of the base model (default: the --model directory's name, or 'base')")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port; default 8000)")
    add_engine_arguments(parser)
    parser.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="in-process executor: wait this long for a batch to fill")
    parser.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="in-process executor: compute with the plain weights only (default: a second, prepacked copy of the "
        "linear weights for forward products, 1.5-2.3x faster GEMMs on CPU for the linear weights' memory again)",
    )
    parser.add_argument(
        "--embeddings",
        choices=["client", "executor"],
        default="client",
        help="client (default): each served model keeps the embedding table, token ids stay here; executor: one table on the executor",
    )
    parser.add_argument("--api-key", help="require Authorization: Bearer API_KEY on /v1")
    parser.add_argument("--admin-token", help="require Authorization: Bearer ADMIN_TOKEN on /admin (open without it)")
    parser.add_argument("--ready-file", type=Path, help="write {url, port} as JSON here once serving")
    parser.set_defaults(func=run)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving engine's options (``engine_options`` turns them into ``ModelRegistry`` keywords)."""
    group = parser.add_argument_group("serving engine")
    group.add_argument("--max-seqs", "--max-rows", type=int, default=64, help="sequences (choices) running at once, all adapters together (default 64)")
    group.add_argument("--max-step-tokens", type=int, default=256, help="tokens computed per step: decode rows plus prompt chunks (default 256)")
    group.add_argument("--kv-cache-gib", type=float, help="KV cache memory budget in GiB (default: a full context per sequence, at most 1)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    group.add_argument("--max-adapters", type=int, default=64, help="adapters resident at once, least recently used evicted first (default 64)")
    group.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full (default: reuse the cached KV blocks of prompt starts computed before)",
    )
    group.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        metavar="N",
        help="intra-op threads of the engine's own computation: model code, adapters, attention (default 1; the base GEMMs use --threads)",
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine keywords of ``ModelRegistry`` (and ``Engine``) from ``add_engine_arguments``' options."""
    return dict(
        max_seqs=args.max_seqs,
        max_step_tokens=args.max_step_tokens,
        kv_cache_bytes=int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None,
        block_size=args.block_size,
        max_adapters=args.max_adapters,
        prefix_caching=args.prefix_caching,
        threads=args.engine_threads,
    )


def run(args: argparse.Namespace) -> int:
    adapters = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --adapter takes NAME=DIR, got {spec!r}")
        adapters.append((name, Path(path)))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    executor = open_executor(args, **({} if args.executor else {"max_wait_s": args.max_wait_ms / 1000, "pack_weights": args.pack_weights}))
    base_name = args.base_name or (args.model.resolve().name if args.model is not None and not args.executor else "base")
    registry = ModelRegistry(
        executor,
        load_tokenizer(args),
        base_name=base_name,
        device=args.device,
        embeddings=args.embeddings,
        **engine_options(args),
    )
    try:
        for index, (name, path) in enumerate(adapters):
            (registry.load_adapter if index < args.max_adapters else registry.register_adapter)(name, path)
        server = HttpServer(create_app(registry, api_key=args.api_key, admin_token=args.admin_token), host=args.host, port=args.port, log_level="info")
        names = [m.name for m in registry.models()]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        print(f"serving {shown} on {server.url}/v1", flush=True)
        # what exists now (model, tokenizer, adapters) lives as long as the server: keep it out of the
        # collector's passes, which otherwise walk it during steps (1.5-2 ms of a 60 ms step measured)
        gc.freeze()
        server.run(ready_file=args.ready_file)
    finally:
        registry.close()
    return 0
