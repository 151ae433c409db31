"""``symbiosis serve MODEL_DIR``: run a base executor as a service until SIGTERM/SIGINT.

Clients connect to its gRPC port; their op calls then travel on same-host shared-memory channels or
TCP data channels (``--data-port``), or on gRPC streams where neither can be had."""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import NoReturn

import torch

from ..executor import BaseExecutor
from ..executor.ops import PACKED_DIRECTIONS
from ..executor.scheduler import ACTIVE_WINDOW_S
from ..executor.sharding import parse_layer_range
from .executor_args import add_quantize_argument
from ..server import ExecutorServer, TenantRegistry
from ..server.app import DEFAULT_SESSION_IDLE_S, UNARY_THREADS
from ..server.shm_host import DEFAULT_MAX_CHANNELS
from ..transport.waiting import DEFAULT_SPIN_S
from ..transport.keepalive import DEFAULT_KEEPALIVE_S

#: How often the main thread wakes to run signal handlers while it waits for SIGTERM/SIGINT.
SIGNAL_POLL_S = 0.5


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a base executor to client processes", description=__doc__)
    parser.add_argument("model_dir", type=Path, help="local Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port; default 50051)")
    parser.add_argument("--device", default="cpu", help="device of the executor's weights and GEMMs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the weights (and of the products of a --quantize'd base; default float32)")
    add_quantize_argument(parser)
    parser.add_argument("--layers", type=parse_layer_range, metavar="A:B", help="serve only layers [A, B) (one shard of a sharded base)")
    parser.add_argument("--tenants", type=Path, metavar="FILE", help="tenants file (.toml or .json); without it the service is open")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain (with --tls-key: serve TLS only)")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    parser.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on this HTTP port (0: any)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch intra-op threads of the GEMMs (default: torch's, one per core); 1 where clients share the host's cores")
    parser.add_argument("--pack-weights", choices=list(PACKED_DIRECTIONS), default=False,
                        help="keep a prepacked copy of the linear weights for forward products (forward: 1.5-2.3x faster "
                             "GEMMs on CPU with oneDNN, for the linear weights' memory again) or one for each direction "
                             "(both: fine-tuning clients' backward products 1.1-1.3x faster too, for twice that memory)")
    parser.add_argument("--max-workers", type=int, default=64,
                        help=f"server threads (default 64): gRPC client sessions get all but {UNARY_THREADS}, kept for health checks and setup calls")
    parser.add_argument("--max-message-mb", type=int, default=256, help="largest request message in MiB (default 256)")
    parser.add_argument("--no-shared-memory", action="store_true", help="do not offer same-host shared-memory channels")
    parser.add_argument("--shm-channels", type=int, default=DEFAULT_MAX_CHANNELS,
                        help=f"same-host shared-memory channels at once (default {DEFAULT_MAX_CHANNELS}; further client threads use another lane)")
    parser.add_argument("--channel-spin-us", type=float, default=DEFAULT_SPIN_S * 1e6, metavar="US",
                        help=f"a shared-memory or TCP data channel polls for its client's next call this long before it sleeps (default "
                             f"{DEFAULT_SPIN_S * 1e6:.0f}; only while the client calls that often; 0: never poll, saves CPU)")
    parser.add_argument("--data-port", type=int, default=0,
                        help="port of the TCP data channels, which carry op calls without gRPC (default 0: any free port; "
                             "clients learn it over gRPC)")
    parser.add_argument("--no-data-channel", action="store_true",
                        help="do not offer TCP data channels (clients on other hosts send op calls over gRPC streams)")
    parser.add_argument("--data-channels", type=int, default=DEFAULT_MAX_CHANNELS,
                        help=f"TCP data channels at once (default {DEFAULT_MAX_CHANNELS}; further client threads use gRPC streams)")
    parser.add_argument("--session-idle-s", type=float, default=DEFAULT_SESSION_IDLE_S,
                        help=f"end client sessions idle this long; clients reopen them (default {DEFAULT_SESSION_IDLE_S:.0f})")
    parser.add_argument("--keepalive-s", type=float, default=DEFAULT_KEEPALIVE_S,
                        help=f"ping quiet client connections this often, drop those that do not answer (default {DEFAULT_KEEPALIVE_S:.0f})")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="wait up to this long for a batch to fill while an active client is still on its way to it (default 0)")
    parser.add_argument("--active-window-ms", type=float, default=ACTIVE_WINDOW_S * 1e3,
                        help=f"a client idle this long no longer holds back a filling batch (default {ACTIVE_WINDOW_S * 1e3:.0f})")
    parser.add_argument("--max-rows", type=int, help="rows per GEMM at most")
    parser.add_argument("--aging-ms", type=float, default=20.0,
                        help="a fine-tuning request that waited this long outranks new inference requests (default 20)")
    parser.add_argument("--batch-credit-ms", type=float, default=5.0,
                        help="each extra request waiting for an op makes it this much more urgent (default 5)")
    parser.add_argument("--no-inference-lane", action="store_true",
                        help="run inference GEMMs in the same lane as fine-tuning (ahead in the queue, but behind a running GEMM)")
    parser.add_argument("--drain-s", type=float, default=10.0, help="on SIGTERM, let calls in flight finish for this long")
    parser.add_argument("--ready-file", type=Path, help="write {address, port, metrics_port, data_port, parameter_bytes} as JSON here once serving")
    parser.set_defaults(func=run)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``symbiosis serve`` options (``[MODEL_DIR, *options]``) as the command parses them; a bad
    option raises ``ValueError`` with argparse's message instead of exiting."""
    parser = _RaisingParser(prog="symbiosis")
    register(parser.add_subparsers(parser_class=_RaisingParser))
    return parser.parse_args(["serve", *argv])


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(f"symbiosis serve: {message}")


def start_server(args: argparse.Namespace) -> ExecutorServer:
    """Load the executor and start serving it as ``args`` (parsed ``symbiosis serve`` options) say."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    registry = TenantRegistry.from_file(args.tenants) if args.tenants else None
    tls = (args.tls_cert.read_bytes(), args.tls_key.read_bytes()) if args.tls_cert else None
    executor = BaseExecutor.from_pretrained(
        args.model_dir,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantize,
        layers=args.layers,
        max_wait_s=args.max_wait_ms / 1e3,
        max_rows=args.max_rows,
        aging_s=args.aging_ms / 1e3,
        batch_credit_s=args.batch_credit_ms / 1e3,
        inference_lane=not args.no_inference_lane,
        active_window_s=args.active_window_ms / 1e3,
        pack_weights=args.pack_weights,
    )
    return ExecutorServer(
        executor,
        host=args.host,
        port=args.port,
        registry=registry,
        tls=tls,
        metrics_port=args.metrics_port,
        max_workers=args.max_workers,
        shared_memory=not args.no_shared_memory,
        shm_channels=args.shm_channels,
        channel_spin_s=args.channel_spin_us / 1e6,
        data_channel=not args.no_data_channel,
        data_port=args.data_port,
        data_channels=args.data_channels,
        max_message_bytes=args.max_message_mb << 20,
        session_idle_s=args.session_idle_s,
        keepalive_s=args.keepalive_s,
    ).start()


def run(args: argparse.Namespace) -> int:
    server = start_server(args)
    executor = server.executor
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    print(f"serving {executor} on {server.url}" + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""), flush=True)
    if args.ready_file:
        ready = {"address": server.url, "port": server.port, "metrics_port": server.metrics_port, "data_port": server.data_port,
                 "parameter_bytes": executor.parameter_bytes()}
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(args.ready_file)
    # Python runs signal handlers in the main thread, between bytecodes: a signal the kernel delivers
    # to another thread (gRPC's, torch's) is handled when this sleep ends, while an untimed wait would
    # sleep on; and a handler that took a lock (Event.set) could deadlock the wait it interrupted.
    while not signals:
        time.sleep(SIGNAL_POLL_S)
    print("draining", flush=True)
    server.stop(args.drain_s)
    return 0
