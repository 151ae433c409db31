"""``symbiosis ray ...``: deploy, inspect, scale and remove executors on a Ray cluster; fine-tuning
jobs and the OpenAI-compatible server on it (see ``symbiosis.ray``; needs the ``ray`` extra)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import SymbiosisError
from .serve_openai import add_engine_arguments, engine_options

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ray", help="run executors, fine-tuning jobs and the OpenAI server on a Ray cluster", description=__doc__)
    parser.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS, else a cluster started on this host)")
    commands = parser.add_subparsers(dest="ray_command", required=True)

    deploy = commands.add_parser(
        "deploy",
        help="start a sharded, replicated executor",
        description="Start NAME: one actor per shard and replica on the Ray cluster, each serving its layer range of MODEL "
        "(the same path on every node) with `symbiosis serve`.",
    )
    deploy.add_argument("model", type=Path, help="local Hugging Face model directory (the same path on every node)")
    deploy.add_argument("--name", required=True, help="deployment name: clients load symbiosis+ray://NAME")
    split = deploy.add_mutually_exclusive_group()
    split.add_argument("--shards", type=int, default=1, help="split the layers into N near-equal ranges (default 1)")
    split.add_argument("--layers", type=_ranges, metavar="A:B,B:C,...", help="the shards' layer ranges, explicitly")
    deploy.add_argument("--replicas", type=int, default=1, help="replicas of every shard (default 1)")
    deploy.add_argument("--device", default="cpu", help="device of the shards' weights and GEMMs (cuda needs --num-gpus-per-shard)")
    deploy.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    deploy.add_argument("--num-cpus-per-shard", type=float, default=1.0, help="CPUs of each shard's bundle (default 1)")
    deploy.add_argument("--num-gpus-per-shard", type=float, default=0.0, help="GPUs of each shard's bundle (a fraction packs shards onto one GPU)")
    deploy.add_argument("--memory-per-shard", type=_size, metavar="SIZE", help="memory of each shard's bundle, e.g. 8GiB (default: the checkpoint's size)")
    deploy.add_argument("--strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], help="placement of a replica's shards")
    deploy.add_argument("--host", help="address the servers listen on (default: each node's address; 0.0.0.0 for every interface)")
    deploy.add_argument("--placement-timeout-s", type=float, default=120.0, help="refuse a placement not satisfied within this time (default 120)")
    deploy.add_argument("--wait-for-nodes", action="store_true", help="do not refuse bundles no current node holds (an autoscaler may add one)")
    deploy.add_argument(
        "--serve-options",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="...",
        help="last: every further argument is a `symbiosis serve` option for the shards (tenants, TLS, batching, threads, ...)",
    )
    deploy.set_defaults(func=run, action=run_deploy)

    status = commands.add_parser("status", help="deployments, their shards and replicas", description="Show the deployments the registry knows.")
    status.add_argument("name", nargs="?", help="only this deployment")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=run, action=run_status)

    scale = commands.add_parser("scale", help="change the replicas of every shard while clients run")
    scale.add_argument("name")
    scale.add_argument("--replicas", type=int, required=True)
    scale.add_argument("--drain-timeout-s", type=float, default=60.0, help="scale-in: wait this long at most for clients to move off (default 60)")
    scale.set_defaults(func=run, action=run_scale)

    shutdown = commands.add_parser("shutdown", help="remove a deployment (or a Ray Serve app with --openai)")
    target = shutdown.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?")
    target.add_argument("--all", action="store_true", help="every deployment, and the registry")
    shutdown.add_argument("--openai", action="store_true", help="NAME is a Ray Serve application of `symbiosis ray serve-openai`")
    shutdown.add_argument("--grace-s", type=float, default=10.0, help="let calls in flight finish for this long (default 10)")
    shutdown.set_defaults(func=run, action=run_shutdown)

    finetune = commands.add_parser(
        "finetune",
        help="run `symbiosis finetune` as a Ray task",
        description="Run `symbiosis finetune` (options after --) as a Ray task with its own resources, e.g. "
        "symbiosis ray finetune --num-cpus 2 -- --executor symbiosis+ray://NAME --tokenizer DIR --data d.jsonl --output OUT",
    )
    finetune.add_argument("--num-cpus", type=float, default=1.0)
    finetune.add_argument("--num-gpus", type=float, default=0.0)
    finetune.add_argument("--memory", type=_size, metavar="SIZE")
    finetune.add_argument("--max-retries", type=int, default=3, help="Ray retries the task this often if its node dies (it resumes from its checkpoint)")
    finetune.add_argument("finetune_options", nargs=argparse.REMAINDER, help="-- then `symbiosis finetune` options")
    finetune.set_defaults(func=run, action=run_finetune)

    serve = commands.add_parser(
        "serve-openai",
        help="run `symbiosis serve-openai` as a Ray Serve deployment",
        description="Deploy (or update) Serve application APP: replicas of the OpenAI-compatible server behind Ray Serve's proxy.",
    )
    serve.add_argument("app", help="Serve application name")
    serve.add_argument("--executor", action="append", required=True, metavar="URL", help="symbiosis+ray://NAME (or symbiosis:// addresses, repeated for shards)")
    serve.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory (the same path on every node)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="serve the PEFT adapter in DIR as NAME on every replica")
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of each replica (default 1)")
    serve.add_argument("--num-gpus", type=float, default=0.0)
    serve.add_argument("--memory", type=_size, metavar="SIZE")
    serve.add_argument("--device", default="cpu", help="device of the replicas' clients (attention, KV cache, adapters)")
    serve.add_argument("--base-name", default="base", help="model name of the base model (default 'base')")
    serve.add_argument("--embeddings", choices=["client", "executor"], default="client")
    serve.add_argument("--token", help="access token for the executor")
    serve.add_argument("--api-key", help="require Authorization: Bearer API_KEY on /v1")
    serve.add_argument("--admin-token", help="require Authorization: Bearer ADMIN_TOKEN on /admin")
    serve.add_argument("--http-host", default="127.0.0.1", help="address of Serve's proxies, when this starts Serve (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, default=8000, help="port of Serve's proxies, when this starts Serve (default 8000)")
    serve.add_argument("--route-prefix", default="/")
    serve.add_argument("--proxy-location", choices=["HeadOnly", "EveryNode", "Disabled"], help="where Serve runs proxies (Serve's default: EveryNode)")
    add_engine_arguments(serve)
    serve.set_defaults(func=run, action=run_serve_openai)


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``symbiosis ray`` command; a Symbiosis, Ray placement or usage error is printed (exit code 2)."""
    try:
        return args.action(args)
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        print('error: symbiosis ray needs Ray: pip install "symbiosis-atlas[ray]"', file=sys.stderr)
        return 2
    except (SymbiosisError, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_deploy(args: argparse.Namespace) -> int:
    from ..ray import deploy

    result = deploy(
        args.model,
        args.name,
        shards=args.shards,
        layers=args.layers,
        replicas=args.replicas,
        device=args.device,
        dtype=args.dtype,
        num_cpus_per_shard=args.num_cpus_per_shard,
        num_gpus_per_shard=args.num_gpus_per_shard,
        memory_per_shard=args.memory_per_shard,
        strategy=args.strategy,
        host=args.host,
        serve_options=args.serve_options,
        placement_timeout_s=args.placement_timeout_s,
        wait_for_nodes=args.wait_for_nodes,
        address=args.address,
    )
    print(format_status([result]))
    print(f"clients: load_model(\"symbiosis+ray://{args.name}\") with RAY_ADDRESS set, or --executor symbiosis+ray://{args.name}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from ..ray import status

    result = status(args.name, address=args.address)
    print(json.dumps(result, indent=2) if args.json else format_status(result) or "no deployments")
    return 0


def run_scale(args: argparse.Namespace) -> int:
    from ..ray import scale

    print(format_status([scale(args.name, args.replicas, drain_timeout_s=args.drain_timeout_s, address=args.address)]))
    return 0


def run_shutdown(args: argparse.Namespace) -> int:
    from ..ray import delete_openai, shutdown, shutdown_all

    if args.all:
        removed = shutdown_all(grace_s=args.grace_s, address=args.address)
        print(f"removed {', '.join(removed) or 'no deployments'} and the registry")
    elif args.openai:
        delete_openai(args.name, address=args.address)
        print(f"removed Serve application {args.name}")
    else:
        shutdown(args.name, grace_s=args.grace_s, address=args.address)
        print(f"removed {args.name}")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from ..ray import finetune

    options = _after_dashes(args.finetune_options)
    result = finetune(options, num_cpus=args.num_cpus, num_gpus=args.num_gpus, memory=args.memory, max_retries=args.max_retries, address=args.address)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def run_serve_openai(args: argparse.Namespace) -> int:
    from ..ray import serve_openai

    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
        adapters[name] = path
    url = serve_openai(
        args.app,
        executor=args.executor[0] if len(args.executor) == 1 else args.executor,
        tokenizer=args.tokenizer,
        adapters=adapters,
        replicas=args.replicas,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        memory=args.memory,
        device=args.device,
        base_name=args.base_name,
        engine_options=engine_options(args),
        embeddings=args.embeddings,
        token=args.token,
        api_key=args.api_key,
        admin_token=args.admin_token,
        http_host=args.http_host,
        http_port=args.http_port,
        route_prefix=args.route_prefix,
        proxy_location=args.proxy_location,
        address=args.address,
    )
    print(f"serving {', '.join([args.base_name, *adapters])} on {url} ({args.replicas} replicas behind Ray Serve's proxy)")
    return 0


def format_status(deployments: list[dict[str, Any]]) -> str:
    """Deployments as text: a header per deployment, a row per replica of each shard."""
    blocks = []
    for deployment in deployments:
        spec = deployment["spec"]
        res = spec["resources"]
        per_shard = f"{res['CPU']:g} CPU" + (f", {res['GPU']:g} GPU" if res["GPU"] else "") + f", {res['memory'] / 2**30:.2f} GiB"
        lines = [f"{deployment['name']}: {spec['model']} in {len(spec['layers'])} shards, {spec['strategy']}, {per_shard} per shard"]
        rows = [("shard", "layers", "replica", "state", "address", "node", "pid", "starts", "clients", "fingerprint")]
        for shard in deployment["shards"]:
            start, end = shard["layers"]
            for r in shard["replicas"]:
                rows.append(
                    (
                        str(shard["shard"]),
                        f"{start}:{end}",
                        str(r["replica"]),
                        r["state"],
                        r["address"] or "-",
                        (r["node_id"] or "-")[:8],
                        str(r["pid"] or "-"),
                        str(r["starts"]),
                        str(r["clients"]),
                        (r["fingerprint"] or "-")[:12],
                    )
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _after_dashes(options: list[str]) -> list[str]:
    return options[1:] if options[:1] == ["--"] else options


def _ranges(text: str) -> list[tuple[int, int]]:
    from ..executor.sharding import parse_layer_range

    return [parse_layer_range(part) for part in text.split(",")]


def _size(text: str) -> int:
    """``"8GiB"``, ``"512M"``, ``"1073741824"`` -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"a size looks like 8GiB, 512MiB or a number of bytes, got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()[:1]
    return int(number * {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])
