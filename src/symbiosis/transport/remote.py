"""A client's connection to an executor server (``symbiosis serve``): the ``Transport``.

gRPC carries what it is good at: authentication, the spec and frozen tensors, statistics, health,
and setting up each client thread's *lane* (``transport.lanes``) — the path its op calls take:

1. a same-host shared-memory channel when the server offers one and hands its memory over
   (tensors written in place; each call and answer one Unix socket message);
2. otherwise, or for requests too large for the channel, a TCP data channel (framed calls, TLS when
   the service uses it, the tenant's token in its first frame);
3. a gRPC ``Session`` stream where neither can be had (data channels disabled or unreachable).

A thread the server refuses a channel (its channel limits, the tenant's sessions) takes the next
path for a while and then asks again.

Op calls are stateless on the executor, so retrying one is always safe: when the server is
unreachable (restarting, draining, silent past the keepalive timeout) or ended the lane (an idle
session timed out) a call is retried with exponential backoff and jitter (tenacity) for up to
``retry_timeout_s``, on a fresh lane. A training loop therefore just waits through a restart: no
optimizer step is lost or repeated. Errors the request itself caused are never retried.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import tenacity
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..errors import ExecutorUnavailableError, LimitExceededError, SymbiosisError
from ..protocol import ModelSpec, OpRequest
from . import symbiosis_pb2 as pb
from . import symbiosis_pb2_grpc as pb_grpc
from .keepalive import DEFAULT_KEEPALIVE_S, MAX_ACK_WAIT_S, keepalive_options
from .lanes import DataLane, ShmLane, StreamLane, Transient, translate
from .shm import DEFAULT_CAPACITY, SUPPORTED
from .waiting import DEFAULT_SPIN_S
from .wire import spec_from_json

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a thread whose channel the server refused (or could not be reached) uses the next path before asking again.
SHM_RETRY_S = 10.0
#: Lane kinds in the order a thread tries them.
LANE_KINDS = ("shm", "tcp", "grpc")


class RemoteTransport:
    """``Transport`` to the executor server at ``address`` (``host:port``).

    ``token``: the tenant's token. ``tls``: connect with TLS, trusting ``root_certificates`` (PEM;
    default: the system's roots); data channels then use TLS too. ``shared_memory``: ``None``
    (default) uses a same-host channel when one can be had, ``True`` requires one, ``False`` never
    uses one. ``shm_capacity``: bytes each way of a channel. ``channel_spin_s``: how long a call on a
    shared-memory or TCP data channel polls for its answer before it sleeps (``transport.waiting``;
    0: never poll). ``data_channel``: the same choice for TCP data channels (``False``: op calls take gRPC streams where no shared-memory channel serves
    them). ``data_address``: ``host:port`` to reach the data channel at, when it differs from what
    the server reports (port forwarding, NAT). ``retry_timeout_s``: how long calls are retried while
    the server is away. ``keepalive_s``: seconds between keepalive pings (a silent server is given
    up after one more such interval, at most 10 s); a call waiting this long for its answer asks the
    server's health service whether to go on waiting. ``call_timeout_s``: deadline of each unary
    call (spec, stats, channel setup).
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        shared_memory: bool | None = None,
        shm_capacity: int = DEFAULT_CAPACITY,
        channel_spin_s: float = DEFAULT_SPIN_S,
        data_channel: bool | None = None,
        data_address: str | None = None,
        retry_timeout_s: float = 60.0,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        call_timeout_s: float = 30.0,
    ) -> None:
        self.address = address
        self._token = token
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 1000),
            *keepalive_options(keepalive_s),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging a server that sends nothing
        ]
        if tls:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options=options)
            self._tls: ssl.SSLContext | None = ssl.create_default_context(cadata=root_certificates.decode() if root_certificates else None)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
            self._tls = None
        self._stub = pb_grpc.ExecutorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._call_timeout_s = call_timeout_s
        self._keepalive_s = keepalive_s
        self._shared_memory = shared_memory
        self._shm_capacity = shm_capacity
        self._channel_spin_s = channel_spin_s
        self._data_channel = data_channel
        self._host = _host(address)
        self._data_address = _split(data_address) if data_address else None
        if shared_memory is not False and not SUPPORTED:
            self._no_lane("shm", "shared-memory channels need Linux (memfd_create, abstract Unix sockets)")
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Transient),
            wait=tenacity.wait_exponential_jitter(initial=0.05, max=2.0, jitter=0.1),
            stop=tenacity.stop_after_delay(retry_timeout_s),
            before_sleep=self._count_retry,
            reraise=True,
        )
        self._local = threading.local()
        self._lanes: weakref.WeakSet = weakref.WeakSet()
        self._call_ids = itertools.count(1)
        self._spec: ModelSpec | None = None
        self._fingerprint = ""
        self.retries = 0

    # ------------------------------------------------------------------------- Transport API
    def spec(self) -> ModelSpec:
        if self._spec is None:
            reply = self._unary(self._stub.GetSpec, pb.SpecRequest())
            self._spec, self._fingerprint = spec_from_json(reply.json), reply.fingerprint
        return self._spec

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return self._retry(self._fetch_tensors, list(names))

    def run(self, request: OpRequest) -> torch.Tensor:
        """Run one op request on the server (retried while the server is unreachable)."""
        try:
            return self._run_once(request)
        except Transient:
            return self._retry(self._run_once, request)

    # ------------------------------------------------------------------------------- extras
    def fingerprint(self) -> str:
        """The server's fingerprint of its base weights (see ``transport.fingerprint``)."""
        self.spec()
        return self._fingerprint

    def stats(self) -> dict[str, Any]:
        """This tenant's completed requests per client id; the server's batch statistics too if the
        tenant may see them (``stats = true`` in the tenants file; everyone on an open server)."""
        return json.loads(self._unary(self._stub.GetStats, pb.StatsRequest()).json)

    @property
    def uses_shared_memory(self) -> bool:
        """Whether the calling thread's requests travel through a shared-memory channel."""
        return getattr(self._local, "shm", None) is not None

    @property
    def lane_kind(self) -> str | None:
        """The path the calling thread's last op call took: ``"shm"``, ``"tcp"``, ``"grpc"`` (None before any)."""
        return getattr(self._local, "last", None)

    def close(self) -> None:
        """End every lane and the channel."""
        for lane in list(self._lanes):
            lane.close()
        self._channel.close()

    def __repr__(self) -> str:
        return f"RemoteTransport({self.address!r})"

    # ------------------------------------------------------------------------------ internals
    def _count_retry(self, state: tenacity.RetryCallState) -> None:
        self.retries += 1
        log.info("executor %s unavailable (%s); retry %d", self.address, state.outcome.exception(), state.attempt_number)

    def _retry(self, fn: Callable[..., T], *args: Any) -> T:
        return self._retrying.copy()(fn, *args)

    def _unary(self, method: Callable, message: Any) -> Any:
        def call() -> Any:
            try:
                return method(message, metadata=self._metadata, timeout=self._call_timeout_s)
            except grpc.RpcError as exc:
                raise translate(exc) from None

        return self._retry(call)

    def _alive(self) -> bool:
        """Whether the server answers its health service within the keepalive's patience."""
        try:
            self._health.Check(health_pb2.HealthCheckRequest(), timeout=min(self._keepalive_s, MAX_ACK_WAIT_S))
        except grpc.RpcError:
            return False
        return True

    def _fetch_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        try:
            for chunk in self._stub.GetTensors(pb.TensorsRequest(names=names), metadata=self._metadata):
                if chunk.name not in out:
                    dtype = getattr(torch, chunk.dtype, None)
                    if not isinstance(dtype, torch.dtype):
                        raise SymbiosisError(f"server sent tensor {chunk.name!r} with unknown dtype {chunk.dtype!r}")
                    out[chunk.name] = torch.empty(tuple(chunk.shape), dtype=dtype)
                flat = out[chunk.name].view(-1).view(torch.uint8)
                flat[chunk.offset : chunk.offset + len(chunk.data)] = torch.frombuffer(bytearray(chunk.data), dtype=torch.uint8)
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return out

    def _run_once(self, request: OpRequest) -> torch.Tensor:
        call_id = next(self._call_ids)
        lane = self._shm_lane(request)
        if lane is None or not lane.fits(request, self._output_bytes(request)):
            lane = self._data_lane() or self._stream_lane()
        local = self._local
        local.last = lane.kind
        try:
            return lane.call(request, call_id)
        except Transient:
            lane.close()
            local.shm = local.data = local.stream = None
            raise

    def _output_bytes(self, request: OpRequest) -> int:
        info = self.spec().ops.get(request.op)
        if info is None:
            return 0  # the server will refuse it; any lane will do
        dtype = request.out_dtype or (request.x.dtype if request.x.is_floating_point() else torch.float32)
        return request.rows * info.output_width(request.direction, request.features) * dtype.itemsize

    def _stream_lane(self) -> StreamLane:
        lane = getattr(self._local, "stream", None)
        if lane is None or lane.broken:
            lane = self._local.stream = StreamLane(self._stub, self._metadata)
            self._lanes.add(lane)
        return lane

    def _shm_lane(self, request: OpRequest) -> ShmLane | None:
        """The calling thread's shared-memory channel, or None: its requests take another lane (for now, or for good)."""
        lane = getattr(self._local, "shm", None)
        if lane is not None or self._shared_memory is False or time.monotonic() < getattr(self._local, "shm_retry_at", 0.0):
            return lane
        cuda = request.x.is_cuda
        attach = pb.AttachRequest(pid=os.getpid(), capacity=self._shm_capacity, cuda=cuda)
        try:
            reply = self._stub.AttachShm(attach, metadata=self._metadata, timeout=self._call_timeout_s)
            lane = ShmLane(reply, cuda=cuda, patience_s=self._keepalive_s, alive=self._alive, spin_s=self._channel_spin_s)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                return self._no_lane("shm", f"the server offers none ({exc.details()})")
            error = translate(exc)
            if not isinstance(error, LimitExceededError):
                raise error from None
            return self._refused("shm", error)
        except LimitExceededError as exc:  # the server refused the channel when we connected
            return self._refused("shm", exc)
        except OSError as exc:  # no channel can be reached from here: another host or namespace
            return self._no_lane("shm", str(exc))
        self._local.shm = lane
        self._lanes.add(lane)
        return lane

    def _data_lane(self) -> DataLane | None:
        """The calling thread's TCP data channel, or None: its requests take a gRPC stream (for now, or for good)."""
        lane = getattr(self._local, "data", None)
        if lane is not None or self._data_channel is False or time.monotonic() < getattr(self._local, "data_retry_at", 0.0):
            return lane
        try:
            reply = self._stub.AttachData(pb.AttachDataRequest(), metadata=self._metadata, timeout=self._call_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                return self._no_lane("tcp", f"the server offers none ({exc.details()})")
            raise translate(exc) from None
        host, port = self._data_address or (self._host, reply.port)
        reply.port = port
        try:
            lane = DataLane(
                host, reply, token=self._token, tls=self._tls, connect_timeout_s=min(self._call_timeout_s, self._keepalive_s),
                patience_s=self._keepalive_s, alive=self._alive, spin_s=self._channel_spin_s,
            )
        except LimitExceededError as exc:
            return self._refused("tcp", exc)
        except (OSError, ssl.SSLError) as exc:  # a firewall, a proxy that passes only gRPC, a restarting server
            return self._refused("tcp", ExecutorUnavailableError(f"the data channel at {host}:{port} cannot be reached: {exc}"))
        self._local.data = lane
        self._lanes.add(lane)
        return lane

    def _refused(self, kind: str, exc: SymbiosisError) -> None:
        """The server refused (or could not give) this thread a channel: take the next lane for a
        while (or fail if this kind is required)."""
        if (self._shared_memory if kind == "shm" else self._data_channel) is True:
            raise exc
        log.debug("no %s channel to %s for now (%s); this thread uses the next lane", kind, self.address, exc)
        setattr(self._local, f"{'shm' if kind == 'shm' else 'data'}_retry_at", time.monotonic() + SHM_RETRY_S)

    def _no_lane(self, kind: str, why: str) -> None:
        """Channels of ``kind`` cannot work with this server: use the next lane from now on (or fail if required)."""
        if (self._shared_memory if kind == "shm" else self._data_channel) is True:
            raise ExecutorUnavailableError(f"no {'shared-memory' if kind == 'shm' else 'TCP data'} channel to {self.address}: {why}")
        log.info("no %s channel to %s (%s); op calls take the next lane", "shared-memory" if kind == "shm" else "TCP data", self.address, why)
        if kind == "shm":
            self._shared_memory = False
        else:
            self._data_channel = False


def _split(address: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 hosts in brackets) -> ``(host, port)``."""
    parts = urlsplit(f"//{address}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"expected host:port, got {address!r}")
    return parts.hostname, parts.port


def _host(address: str) -> str:
    """The host part of a gRPC target ``host:port`` (the data channel's host)."""
    return _split(address)[0]
