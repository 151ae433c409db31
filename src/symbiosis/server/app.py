"""An executor served over gRPC: service, health checking, metrics, TLS, graceful shutdown."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..executor import BaseExecutor
from ..transport import symbiosis_pb2 as pb
from ..transport import symbiosis_pb2_grpc as pb_grpc
from .handler import RequestHandler
from .metrics import ServerMetrics
from .service import ExecutorService
from .shm_host import ShmHost
from .tenancy import TenantRegistry

log = logging.getLogger(__name__)

#: The gRPC service name, as the health-checking protocol knows it.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Executor"].full_name
#: Default largest message a client may send (one op request's rows).
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20


class ExecutorServer:
    """Serves ``executor`` on ``host:port`` (port 0: any free port) until ``stop()``.

    ``registry``: tenants (default: open, no tokens). ``tls``: ``(certificate_pem, key_pem)`` to
    serve TLS only. ``metrics_port``: serve Prometheus metrics over HTTP there (0: any free port).
    ``max_workers``: server threads, i.e. concurrent session streams and unary calls; further RPCs
    are refused with RESOURCE_EXHAUSTED. ``shared_memory``: offer same-host channels.
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
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.executor = executor
        self.host = host
        self.registry = registry or TenantRegistry.open()
        self.tls = tls is not None
        self.metrics = ServerMetrics(executor, self.registry.tenants())
        self.handler = RequestHandler(executor, self.metrics)
        self.shm = ShmHost(self.handler) if shared_memory else None
        self.service = ExecutorService(executor, self.registry, self.handler, self.shm)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="symbiosis-rpc"),
            maximum_concurrent_rpcs=max_workers,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing it
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
            raise OSError(f"could not listen on {address}")
        self._metrics_port = metrics_port
        self.metrics_port: int | None = None

    @property
    def url(self) -> str:
        """The address clients pass to ``load_model``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"symbiosis{'+tls' if self.tls else ''}://{host}:{self.port}"

    def start(self) -> ExecutorServer:
        self._server.start()
        if self._metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.host, self._metrics_port)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %r on %s", self.executor, self.url)
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """Drain: report NOT_SERVING, refuse new calls and sessions, let calls in flight finish
        (at most ``grace_s``), end idle sessions and channels, then stop."""
        self.health.enter_graceful_shutdown()
        self.service.sessions.drain()  # before stop(): cancellations are processed while the server runs
        stopped = self._server.stop(grace_s)
        if self.shm is not None:
            self.shm.drain(grace_s)
        if not stopped.wait(grace_s + 5.0):
            log.warning("gRPC shutdown did not complete %.0f s after the grace period; exiting anyway", 5.0)
        self.metrics.close()

    def wait(self) -> None:
        """Block until the server stops."""
        self._server.wait_for_termination()
