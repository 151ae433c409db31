"""Per-op round trip of every transport path: in-process, shared memory, TCP data channel, gRPC stream.

One linear op of width 64 (float32) is called with 16 rows (4 KiB) and 4096 rows (1 MiB) each way,
in-process (``executor.run``), and from one client thread over each lane to a ``symbiosis serve``
process on this host (separate, so that client and server do not share a GIL): a shared-memory
channel (``shm``), a TCP data channel on loopback (``tcp``, what a client on another host uses)
and the gRPC stream fallback (``grpc``). Every process computes with ``--threads`` torch threads
(default 1: with two threads on a 2-core host, each small GEMM waits for an OpenMP thread whose
core the client holds). Paths are measured in interleaved rounds (each path once per round) and
the rounds' samples pooled. Writes ``transport.json``, ``transport.md`` and ``transport.png`` under
``--out``. The GEMM itself is part of every path; ``overhead`` subtracts the in-process p50. For
reference, ``grpc-echo`` is the bare gRPC stack on the same machine at the same moment: a stream
whose server (another process) echoes the bytes back, with no tensors, no protobuf messages and no
executor; ``socket-echo`` is the floor of the shared-memory path: a 96-byte message (an op call's
size) back and forth over a Unix ``SOCK_SEQPACKET`` socket to another Python process that echoes
it — the two wake-ups every call costs, nothing else (``bench.wakeup`` compares wake-up mechanisms).

    python -m bench.transport [--iterations 2000] [--rounds 5] [--threads 1] [--out bench/results/transport]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bench.procs import start_server  # noqa: E402
from symbiosis import BaseExecutor  # noqa: E402
from symbiosis.protocol import Direction, OpRequest  # noqa: E402
from symbiosis.tiny import save_random_model, tiny_config  # noqa: E402
from symbiosis.transport import RemoteTransport  # noqa: E402
from symbiosis.transport.metered import percentiles_us  # noqa: E402

OP = "model.layers.0.self_attn.o_proj"  # 64 -> 64
PAYLOADS = {"4 KiB": 16, "1 MiB": 4096}
TARGETS_US = {("shm", "4 KiB"): 50.0, ("tcp", "4 KiB"): 150.0}
TARGET_SHM_GBPS = 8.0


def echo_server(port_queue) -> None:
    """A gRPC server (in its own process) whose one stream method echoes every message."""
    import grpc
    from concurrent import futures

    def echo(requests, context):
        yield from requests

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def echo_client(port: int):
    """A call that sends ``request.x``'s bytes on a gRPC stream and waits for them to come back."""
    import queue

    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)])
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    replies = channel.stream_stream("/bench.Echo/Echo")(iter(outbox.get, None))

    def run(request: OpRequest) -> bytes:
        outbox.put(request.x.cpu().numpy().tobytes())
        return next(replies)

    return run


ECHO = "import socket, sys\nsock = socket.socket(fileno=int(sys.argv[1]))\nwhile message := sock.recv(65536):\n    sock.send(message)\n"


def socket_echo():
    """A call that sends a 96-byte message over a ``SOCK_SEQPACKET`` socket to an echoing process
    and waits for it to come back; and that process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    message = b"m" * 96

    def run(request: OpRequest) -> bytes:
        ours.send(message)
        return ours.recv(65536)

    return run, echo


def measure(run, rows: int, iterations: int, device: str, warm_up: bool = True) -> list[float]:
    x = torch.randn(rows, 64, device=device)
    request = OpRequest(OP, Direction.FORWARD, x)
    for _ in range(max(20, iterations // 20) if warm_up else 0):
        run(request)
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        run(request)
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000, help="calls per path and payload in all rounds (1 MiB: a quarter)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (every path once per round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the client and the server (default 1)")
    parser.add_argument("--device", default="cpu", help="device of the executor (server and in-process); cuda on a GPU machine")
    parser.add_argument("--client-device", help="device of the client's rows (default: --device): a GPU client of a GPU server "
                                                  "exchanges them through CUDA buffers, a CPU client through pinned shared memory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transport")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="symbiosis-bench-"))
    model_dir = save_random_model(tiny_config("llama"), scratch / "model")
    client_device = args.client_device or args.device
    executor = BaseExecutor.from_pretrained(model_dir, device=args.device)
    server = start_server(model_dir, device=args.device, threads=args.threads)
    address = server.address.removeprefix("symbiosis://")
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    echo = ctx.Process(target=echo_server, args=(ports,), daemon=True)
    echo.start()
    socket_run, socket_process = socket_echo()
    paths = {
        "socket-echo": socket_run,
        "grpc-echo": echo_client(ports.get(timeout=60)),
        "in-process": executor.run,
        "shm": RemoteTransport(address, shared_memory=True).run,
        "tcp": RemoteTransport(address, shared_memory=False, data_channel=True).run,
        "grpc": RemoteTransport(address, shared_memory=False, data_channel=False).run,
    }
    rows = []
    for payload, n in PAYLOADS.items():
        iterations = args.iterations if n <= 16 else max(50, args.iterations // 4)
        samples: dict[str, list[float]] = {path: [] for path in paths}
        for round_ in range(args.rounds):
            for path, run in paths.items():
                device = "cpu" if path.endswith("-echo") else client_device
                samples[path] += measure(run, n, max(1, iterations // args.rounds), device, warm_up=round_ == 0)
        for path in paths:
            nbytes = n * 64 * 4
            rows.append({"path": path, "payload": payload, "bytes_each_way": nbytes, **percentiles_us(samples[path])})
    server.stop()
    echo.terminate()
    socket_process.terminate()
    base = {r["payload"]: r["p50"] for r in rows if r["path"] == "in-process"}
    for r in rows:
        r["overhead_p50_us"] = r["p50"] - (0.0 if r["path"].endswith("-echo") else base[r["payload"]])  # echoes run no GEMM
        carries = r["path"] != "socket-echo"  # which sends 96 bytes whatever the payload
        r["gbps_each_way_p50"] = r["bytes_each_way"] / (r["p50"] * 1e-6) / 1e9 if carries else None
        # bytes moved both ways per second of time spent beyond the in-process call (the transfer's own cost)
        r["transfer_gbps"] = 2 * r["bytes_each_way"] / (r["overhead_p50_us"] * 1e-6) / 1e9 if carries and r["overhead_p50_us"] > 0 else None
        r["target_p50_us"] = TARGETS_US.get((r["path"], r["payload"]))
        if r["path"] == "shm" and r["payload"] == "1 MiB":
            r["target_gbps"] = TARGET_SHM_GBPS
    (args.out / "transport.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| path | payload | p50 µs | p99 µs | overhead vs in-process (p50) µs | GB/s each way (p50, GEMM included) | transfer GB/s (2 × payload / overhead) | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = f"p50 ≤ {r['target_p50_us']:.0f} µs" if r["target_p50_us"] else (f"≥ {r['target_gbps']} GB/s" if r.get("target_gbps") else "")
        lines.append(
            f"| {r['path']} | {r['payload']} | {r['p50']:.0f} | {r['p99']:.0f} | {r['overhead_p50_us']:.0f} | {_number(r['gbps_each_way_p50'])} | "
            f"{_number(r['transfer_gbps'])} | {target} |"
        )
    (args.out / "transport.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, payload in zip(axes, PAYLOADS):
        subset = [r for r in rows if r["payload"] == payload]
        ax.bar([r["path"] for r in subset], [r["p50"] for r in subset], label="p50")
        ax.scatter([r["path"] for r in subset], [r["p99"] for r in subset], color="red", zorder=3, label="p99")
        ax.set_title(f"per-op round trip, {payload} each way")
        ax.set_ylabel("µs")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "transport.png", dpi=120)
    print("\n".join(lines))
    return 0


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
