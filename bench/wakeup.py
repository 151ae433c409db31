"""How fast one Python process can wake another: the candidate mechanisms for the executor's data path.

A 96-byte message (an op call's size) goes back and forth between two Python processes, each
blocked until the other's message arrives, through each mechanism (p50 / p99 round trip):

* same host: a Unix stream socket with a 1-byte doorbell (the former shared-memory channel), a Unix
  ``SOCK_SEQPACKET`` socket carrying the message itself (no framing: the kernel keeps message
  boundaries), a pipe pair, an ``eventfd`` pair and a futex pair (message in shared memory), and
  ZeroMQ's IPC transport (PAIR sockets, as vLLM's engine core uses them);
* other hosts (here over loopback): a TCP socket (``TCP_NODELAY``), ZeroMQ over TCP, and a gRPC
  bidirectional stream echo on the synchronous server and on ``grpc.aio``.

Nothing but the mechanism runs: no tensors, no executor. ZeroMQ rows need ``pyzmq`` (skipped without it).

    python -m bench.wakeup [--iterations 3000] [--out bench/results/wakeup]
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import common

MESSAGE = b"m" * 96
#: Mechanisms a same-host channel could use, and those a remote client could use.
SAME_HOST = ["unix stream doorbell", "unix seqpacket", "pipe", "eventfd", "futex", "zeromq ipc"]
OTHER_HOST = ["tcp", "zeromq tcp", "grpc stream (sync server)", "grpc stream (grpc.aio server)"]

Pair = tuple[Callable[[], None], Callable[[int], list[float]]]


def ping_pong(send: Callable[[bytes], None], receive: Callable[[], object], iterations: int) -> list[float]:
    """Round-trip times of ``iterations`` messages after a warm-up; then tells the echo to stop (empty message)."""
    for _ in range(max(50, iterations // 20)):
        send(MESSAGE)
        receive()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        send(MESSAGE)
        receive()
        samples.append(time.perf_counter() - start)
    send(b"")
    return samples


def socket_pair(kind: int, doorbell: bool) -> Pair:
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)

    def echo() -> None:
        ours.close()
        while message := theirs.recv(4096):
            theirs.send(message[:1] if doorbell else message)

    def client(iterations: int) -> list[float]:
        theirs.close()
        send = (lambda m: ours.send(m[:1])) if doorbell else ours.send
        return ping_pong(send, lambda: ours.recv(4096), iterations)

    return echo, client


def pipes() -> Pair:
    (down_r, down_w), (up_r, up_w) = os.pipe(), os.pipe()

    def echo() -> None:
        while (message := os.read(down_r, 4096)) != b"\0":
            os.write(up_w, message)

    def client(iterations: int) -> list[float]:
        return ping_pong(lambda m: os.write(down_w, m or b"\0"), lambda: os.read(up_r, 4096), iterations)

    return echo, client


def eventfds() -> Pair:
    """Messages in shared memory; an eventfd per direction wakes the reader."""
    down, up = os.eventfd(0), os.eventfd(0)
    shared = mmap.mmap(-1, 4096)

    def echo() -> None:
        while True:
            os.eventfd_read(down)
            (length,) = struct.unpack_from("<I", shared, 0)
            if not length:
                return
            shared[2048 : 2048 + length] = shared[4 : 4 + length]
            os.eventfd_write(up, 1)

    def client(iterations: int) -> list[float]:
        def send(message: bytes) -> None:
            struct.pack_into("<I", shared, 0, len(message))
            shared[4 : 4 + len(message)] = message
            os.eventfd_write(down, 1)

        def receive() -> bytes:
            os.eventfd_read(up)
            return shared[2048 : 2048 + len(MESSAGE)]

        return ping_pong(send, receive, iterations)

    return echo, client


def futexes() -> Pair:
    """Messages in shared memory; a sequence word per direction, waited on and woken with futex(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    sys_futex, wait_op, wake_op = 202, 0, 1  # x86-64
    shared = mmap.mmap(-1, 4096)
    words = (ctypes.c_int * 1024).from_buffer(shared)
    down, up, length = 0, 16, 32  # word indices (separate cache lines)

    def wait(index: int, seen: int) -> None:
        while words[index] == seen:
            libc.syscall(sys_futex, ctypes.c_void_p(ctypes.addressof(words) + 4 * index), wait_op, seen, None, None, 0)

    def wake(index: int) -> None:
        libc.syscall(sys_futex, ctypes.c_void_p(ctypes.addressof(words) + 4 * index), wake_op, 1, None, None, 0)

    def echo() -> None:
        seen = 0
        while True:
            wait(down, seen)
            seen = words[down]
            if not words[length]:
                return
            words[up] = seen
            wake(up)

    def client(iterations: int) -> list[float]:
        sequence = [0]

        def send(message: bytes) -> None:
            words[length] = len(message)
            sequence[0] += 1
            words[down] = sequence[0]
            wake(down)

        return ping_pong(send, lambda: wait(up, sequence[0] - 1), iterations)

    return echo, client


def zeromq(address: str) -> Pair:
    def echo() -> None:
        import zmq

        sock = zmq.Context().socket(zmq.PAIR)
        sock.bind(address)
        while message := sock.recv():
            sock.send(message)

    def client(iterations: int) -> list[float]:
        import zmq

        sock = zmq.Context().socket(zmq.PAIR)
        sock.connect(address)
        return ping_pong(sock.send, sock.recv, iterations)

    return echo, client


def tcp() -> Pair:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while message := conn.recv(4096):
            conn.send(message)

    def client(iterations: int) -> list[float]:
        listener.close()
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ping_pong(lambda m: conn.send(m) if m else conn.close(), lambda: conn.recv(4096), iterations)

    return echo, client


def grpc_echo(port_queue, use_aio: bool) -> None:
    """A gRPC server whose one bidirectional stream method echoes every message."""
    import grpc

    if use_aio:
        import asyncio

        async def serve() -> None:
            async def echo(requests, context):
                async for message in requests:
                    yield message

            handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})
            server = grpc.aio.server(handlers=[handler])
            port_queue.put(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            await server.wait_for_termination()

        asyncio.run(serve())
    else:
        from bench.transport import echo_server

        echo_server(port_queue)


def grpc_client(port: int, iterations: int) -> list[float]:
    import queue

    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    replies = channel.stream_stream("/bench.Echo/Echo")(iter(outbox.get, None))
    samples = ping_pong(lambda m: outbox.put(m) if m else outbox.put(None), lambda: next(replies), iterations)
    channel.close()
    return samples


def measure(name: str, iterations: int) -> list[float] | None:
    """The round trips of mechanism ``name`` (None: not available here)."""
    if name.startswith("zeromq"):
        try:
            import zmq  # noqa: F401
        except ImportError:
            return None
    if name.startswith("grpc"):  # grpc must not be forked: its server runs in a spawned process
        ctx = multiprocessing.get_context("spawn")
        ports = ctx.Queue()
        server = ctx.Process(target=grpc_echo, args=(ports, "aio" in name), daemon=True)
        server.start()
        try:
            return grpc_client(ports.get(timeout=60), iterations)
        finally:
            server.terminate()
    pairs = {
        "unix stream doorbell": lambda: socket_pair(socket.SOCK_STREAM, doorbell=True),
        "unix seqpacket": lambda: socket_pair(socket.SOCK_SEQPACKET, doorbell=False),
        "pipe": pipes,
        "eventfd": eventfds,
        "futex": futexes,
        "zeromq ipc": lambda: zeromq(f"ipc://@symbiosis-bench-{os.getpid()}"),
        "zeromq tcp": lambda: zeromq(f"tcp://127.0.0.1:{_free_port()}"),
        "tcp": tcp,
    }
    echo, client = pairs[name]()
    process = multiprocessing.get_context("fork").Process(target=echo, daemon=True)
    process.start()
    try:
        return client(iterations)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = common.parser("wakeup", __doc__)
    p.add_argument("--iterations", type=int, default=3000, help="round trips per mechanism")
    args = p.parse_args(argv)
    if args.smoke:
        args.iterations = 100
    if sys.platform != "linux":
        raise SystemExit("the same-host mechanisms measured here are Linux's")
    start = common.start(args)
    rows = []
    for scope, names in (("same host", SAME_HOST), ("other hosts (loopback)", OTHER_HOST)):
        for name in names:
            samples = measure(name, args.iterations)
            if samples is None:
                rows.append({"scope": scope, "mechanism": name, "available": False})
                continue
            stats = common.percentiles(samples, 1e6)
            rows.append({"scope": scope, "mechanism": name, "available": True, "p50_us": stats["p50"], "p99_us": stats["p99"]})
    result = {"load_at_start": start, "config": {"iterations": args.iterations, "message_bytes": len(MESSAGE)}, "rows": rows,
              "targets": {"note": "no target: the floor under the per-op round trip of bench.transport"}}
    md = common.table(["scope", "mechanism", "round trip p50 µs", "p99 µs"],
                      [[r["scope"], r["mechanism"], r.get("p50_us"), r.get("p99_us")] if r["available"] else
                       [r["scope"], r["mechanism"], "not installed", None] for r in rows])

    def draw(out: Path) -> Path:
        measured = [r for r in rows if r["available"]]
        return common.chart(out / "wakeup.png", "96-byte ping-pong between two Python processes", "", "µs (p50)",
                            {"p50": ([r["mechanism"] for r in measured], [r["p50_us"] for r in measured])}, kind="bar")

    common.write(args, "wakeup", result, md, [draw])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
