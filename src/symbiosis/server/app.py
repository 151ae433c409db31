"""An executor served to client processes: the gRPC service, shared-memory and TCP data channels,
health checking, metrics, TLS, keepalive, idle timeouts, graceful shutdown."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..executor import BaseExecutor
from ..transport import symbiosis_pb2 as pb
from ..transport import symbiosis_pb2_grpc as pb_grpc
from ..transport.keepalive import DEFAULT_KEEPALIVE_S, MIN_CLIENT_PING_INTERVAL_S, keepalive_options
from ..transport.shm import SUPPORTED as SHM_SUPPORTED
from .handler import RequestHandler
from .metrics import ServerMetrics
from .data_host import DataHost
from .service import ExecutorService
from ..transport.waiting import DEFAULT_SPIN_S
from .shm_host import DEFAULT_MAX_CHANNELS, ShmHost
from .tenancy import TenantRegistry

log = logging.getLogger(__name__)

#: The gRPC service name, as the health-checking protocol knows it.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Executor"].full_name
#: Default largest message a client may send (one op request's rows).
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
#: Server threads kept from session streams for unary calls (health, spec, stats, channel setup).
UNARY_THREADS = 4
#: Default seconds a session (stream or channel) may stay idle before the server ends it.
DEFAULT_SESSION_IDLE_S = 300.0
#: Seconds after which the server closes a connection without calls (the client reconnects when it needs to).
CONNECTION_IDLE_S = 600.0


class ExecutorServer:
    """Serves ``executor`` on ``host:port`` (port 0: any free port) until ``stop()``.

    ``registry``: tenants (default: open, no tokens). ``tls``: ``(certificate_pem, key_pem)`` to
    serve TLS only. ``metrics_port``: serve Prometheus metrics over HTTP there (0: any free port).
    ``max_workers``: server threads; session streams may hold all but ``UNARY_THREADS`` of them
    (further sessions are refused with RESOURCE_EXHAUSTED), the rest serve health checks and unary
    calls. ``shared_memory``: offer same-host channels (Linux only), at most ``shm_channels`` at
    once. ``data_channel``: offer TCP data channels (op calls without gRPC for clients on other
    hosts), at most ``data_channels`` at once, listening on ``data_port`` (0: any free port; TLS
    when the service uses TLS). A channel of either kind polls for its client's next call for up to
    ``channel_spin_s`` before it blocks (``transport.waiting``; 0: never poll). ``session_idle_s``:
    end sessions and channels idle longer than this (their clients open new ones). ``keepalive_s``: ping quiet connections this often and drop
    those that do not answer.
    """

    def __init__(
        self,
        executor: BaseExecutor,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        registry: TenantRegistry | None = None,
        tls: tuple[bytes, bytes] | None = None,
        metrics_port: int | None = None,
        max_workers: int = 64,
        shared_memory: bool = True,
        shm_channels: int = DEFAULT_MAX_CHANNELS,
        channel_spin_s: float = DEFAULT_SPIN_S,
        data_channel: bool = True,
        data_port: int = 0,
        data_channels: int = DEFAULT_MAX_CHANNELS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        session_idle_s: float = DEFAULT_SESSION_IDLE_S,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
    ) -> None:
        if max_workers <= UNARY_THREADS:
            raise ValueError(f"max_workers must exceed the {UNARY_THREADS} threads kept for unary calls, got {max_workers}")
        if shared_memory and not SHM_SUPPORTED:
            log.warning("shared-memory channels need Linux (memfd_create, abstract Unix sockets); serving over gRPC only")
        self.executor = executor
        self.host = host
        self.registry = registry or TenantRegistry.open()
        self.tls = tls is not None
        self.session_idle_s = session_idle_s
        self.metrics = ServerMetrics(executor, self.registry.tenants())
        self.handler = RequestHandler(executor, self.metrics)
        self.shm = ShmHost(self.handler, max_channels=shm_channels, spin_s=channel_spin_s) if shared_memory and SHM_SUPPORTED else None
        self.data = (
            DataHost(
                self.handler, self.registry, host=host, port=data_port, tls=tls, max_payload_bytes=max_message_bytes,
                max_channels=data_channels, keepalive_s=keepalive_s, spin_s=channel_spin_s,
            )
            if data_channel
            else None
        )
        self.service = ExecutorService(
            executor, self.registry, self.handler, self.shm, self.data, max_sessions=max_workers - UNARY_THREADS
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="symbiosis-rpc"),
            maximum_concurrent_rpcs=max_workers,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing it
                *keepalive_options(keepalive_s),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", int(MIN_CLIENT_PING_INTERVAL_S * 1000)),
                ("grpc.max_connection_idle_ms", int(CONNECTION_IDLE_S * 1000)),
            ],
        )
        pb_grpc.add_ExecutorServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        address = f"{host}:{port}"
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            if self.data is not None:
                self.data.drain(0)
            raise OSError(f"could not listen on {address}")
        self._metrics_port = metrics_port
        self.metrics_port: int | None = None
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._end_idle_sessions, name="symbiosis-idle", daemon=True)

    @property
    def url(self) -> str:
        """The address clients pass to ``load_model``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"symbiosis{'+tls' if self.tls else ''}://{host}:{self.port}"

    @property
    def data_port(self) -> int | None:
        """The TCP data channels' port (None when they are disabled)."""
        return None if self.data is None else self.data.port

    def start(self) -> ExecutorServer:
        self._server.start()
        if self.data is not None:
            self.data.start()
        if self._metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.host, self._metrics_port)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._reaper.start()
        log.info("serving %r on %s", self.executor, self.url)
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """Drain: report NOT_SERVING, refuse new calls and sessions, let calls in flight finish
        (at most ``grace_s``), end idle sessions and channels, then stop."""
        self.health.enter_graceful_shutdown()
        self._stopping.set()
        self.service.sessions.drain()  # before stop(): cancellations are processed while the server runs
        stopped = self._server.stop(grace_s)
        for channels in (self.shm, self.data):
            if channels is not None:
                channels.drain(grace_s)
        if not stopped.wait(grace_s + 5.0):
            log.warning("gRPC shutdown did not complete %.0f s after the grace period; exiting anyway", 5.0)
        self.metrics.close()

    def wait(self) -> None:
        """Block until the server stops."""
        self._server.wait_for_termination()

    def _end_idle_sessions(self) -> None:
        """Until the server stops, end sessions and channels idle longer than ``session_idle_s``."""
        while not self._stopping.wait(min(self.session_idle_s / 4, 5.0)):
            self.service.sessions.end_idle(self.session_idle_s)
            for channels in (self.shm, self.data):
                if channels is not None:
                    channels.end_idle(self.session_idle_s)
