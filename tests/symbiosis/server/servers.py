"""Starting executor servers for tests: in this process (a thread pool) or as ``symbiosis serve`` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[3]

#: The lanes a client's op calls can take, as ``RemoteTransport`` options: a same-host shared-memory
#: channel, a TCP data channel, and the gRPC stream fallback.
LANES = {
    "shm": {"shared_memory": True},
    "tcp": {"shared_memory": False, "data_channel": True},
    "grpc": {"shared_memory": False, "data_channel": False},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A ``symbiosis serve`` child process and the address it serves on."""

    process: subprocess.Popen
    address: str
    port: int
    metrics_port: int | None

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the server vanishes without draining."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


def start_server_process(model_dir: Path, *args: str, port: int = 0, timeout: float = 120.0) -> ServerProcess:
    """Run ``symbiosis serve model_dir --port port *args`` and wait until it serves."""
    ready = Path(tempfile.mkdtemp(prefix="symbiosis-test-")) / "ready.json"
    command = [sys.executable, "-m", "symbiosis.cli.main", "serve", str(model_dir), "--port", str(port), "--ready-file", str(ready), *args]
    log = open(ready.with_name("server.log"), "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start: {ready.with_name('server.log').read_text()[-3000:]}")
        time.sleep(0.1)
    info = json.loads(ready.read_text())
    return ServerProcess(process, info["address"], info["port"], info["metrics_port"])


@contextmanager
def server_process(model_dir: Path, *args: str, port: int = 0) -> Iterator[ServerProcess]:
    server = start_server_process(model_dir, *args, port=port)
    try:
        yield server
    finally:
        try:
            server.terminate(timeout=60)  # graceful: the server removes its channels and socket directory
        except subprocess.TimeoutExpired:
            server.kill()


def health_status(port: int, service: str = "") -> int:
    """The gRPC health-checking status of the server on ``port``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
