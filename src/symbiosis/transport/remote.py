"""A client's connection to an executor server (``symbiosis serve``): the ``Transport`` over gRPC.

Every client thread gets its own lane: a same-host shared-memory channel when the server offers
one and hands its memory over (tensors are written in place; the socket carries one doorbell
byte), otherwise a gRPC ``Session`` stream (tensors inline as raw bytes). Requests whose input or
output exceed the channel's capacity take the stream, and so do a thread's requests while the
server refuses it a channel (its channel limits, the tenant's sessions).

Op calls are stateless on the executor, so retrying one is always safe: when the server is
unreachable (restarting, draining, silent past the keepalive timeout) or ended the lane (an idle
session timed out) a call is retried with exponential backoff and jitter (tenacity) for up to
``retry_timeout_s``, on a fresh lane. A training loop therefore just waits through a restart: no
optimizer step is lost or repeated. Errors the request itself caused are never retried.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
import tenacity
import torch

from ..errors import ExecutorUnavailableError, LimitExceededError, SymbiosisError
from ..protocol import ModelSpec, OpRequest
from . import symbiosis_pb2 as pb
from . import symbiosis_pb2_grpc as pb_grpc
from .keepalive import DEFAULT_KEEPALIVE_S, keepalive_options
from .shm import DEFAULT_CAPACITY, DOORBELL, SUPPORTED, ShmLayout, open_channel, read_message, unmap, write_message, write_tensor
from .wire import RegionReader, decode_tensor, describe_region, encode_call, encode_tensor, exception_for, spec_from_json

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Status codes that mean "the server is not there right now" (or ended the session): the call is retried.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
#: Seconds a thread whose channel the server refused sends its requests on the stream before asking again.
SHM_RETRY_S = 10.0


class _Transient(ExecutorUnavailableError):
    """The server could not be reached or hung up; the call may be retried."""


def _translate(exc: grpc.RpcError) -> SymbiosisError:
    if exc.code() in _TRANSIENT:
        return _Transient(f"executor unavailable: {exc.code().name}: {exc.details()}")
    return exception_for(exc.code(), exc.details() or exc.code().name)


class RemoteTransport:
    """``Transport`` to the executor server at ``address`` (``host:port``).

    ``token``: the tenant's token. ``tls``: connect with TLS, trusting ``root_certificates`` (PEM;
    default: the system's roots). ``shared_memory``: ``None`` (default) uses a same-host channel
    when one can be had, ``True`` requires one, ``False`` never uses one. ``shm_capacity``: bytes
    each way of a channel. ``retry_timeout_s``: how long calls are retried while the server is away.
    ``keepalive_s``: seconds between keepalive pings (a silent server is given up after one more
    such interval, at most 10 s). ``call_timeout_s``: deadline of each unary call (spec, stats,
    channel setup).
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
        retry_timeout_s: float = 60.0,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        call_timeout_s: float = 30.0,
    ) -> None:
        self.address = address
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
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.ExecutorStub(self._channel)
        self._call_timeout_s = call_timeout_s
        self._shared_memory = shared_memory
        self._shm_capacity = shm_capacity
        if shared_memory is not False and not SUPPORTED:
            self._no_shared_memory("shared-memory channels need Linux (memfd_create, abstract Unix sockets)")
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
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
        except _Transient:
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
                raise _translate(exc) from None

        return self._retry(call)

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
            raise _translate(exc) from None
        return out

    def _run_once(self, request: OpRequest) -> torch.Tensor:
        call_id = next(self._call_ids)
        lane = self._shm_lane()
        if lane is None or not lane.fits(request, self._output_bytes(request)):
            lane = self._stream_lane()
        try:
            y = lane.call(request, call_id)
        except _Transient:
            lane.close()
            self._local.shm = self._local.stream = None
            raise
        return y.to(request.x.device)

    def _output_bytes(self, request: OpRequest) -> int:
        info = self.spec().ops.get(request.op)
        if info is None:
            return 0  # the server will refuse it; any lane will do
        dtype = request.out_dtype or (request.x.dtype if request.x.is_floating_point() else torch.float32)
        return request.rows * info.output_width(request.direction, request.features) * dtype.itemsize

    def _stream_lane(self) -> _StreamLane:
        lane = getattr(self._local, "stream", None)
        if lane is None or lane.broken:
            lane = self._local.stream = _StreamLane(self._stub, self._metadata)
            self._lanes.add(lane)
        return lane

    def _shm_lane(self) -> _ShmLane | None:
        """The calling thread's channel, or None: its requests take the stream (for now, or for good)."""
        if self._shared_memory is False:
            return None
        lane = getattr(self._local, "shm", None)
        if lane is None:
            if time.monotonic() < getattr(self._local, "shm_retry_at", 0.0):
                return None
            request = pb.AttachRequest(pid=os.getpid(), capacity=self._shm_capacity)
            try:
                lane = _ShmLane(self._stub.AttachShm(request, metadata=self._metadata, timeout=self._call_timeout_s))
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    return self._no_shared_memory(f"the server offers none ({exc.details()})")
                error = _translate(exc)
                if not isinstance(error, LimitExceededError):
                    raise error from None
                return self._refused(error)
            except LimitExceededError as exc:  # the server refused the channel when we connected
                return self._refused(exc)
            except OSError as exc:  # no channel can be reached from here: another host or namespace
                return self._no_shared_memory(str(exc))
            self._local.shm = lane
            self._lanes.add(lane)
        return lane

    def _refused(self, exc: LimitExceededError) -> None:
        """The server refused this thread a channel: take the stream for a while (or fail if required)."""
        if self._shared_memory:
            raise exc
        log.debug("no shared-memory channel to %s for now (%s); this thread uses gRPC", self.address, exc)
        self._local.shm_retry_at = time.monotonic() + SHM_RETRY_S

    def _no_shared_memory(self, why: str) -> None:
        """Shared memory cannot work with this server: use gRPC from now on (or fail if required)."""
        if self._shared_memory:
            raise ExecutorUnavailableError(f"no shared-memory channel to {self.address}: {why}")
        log.info("no shared-memory channel to %s (%s); tensors travel over gRPC", self.address, why)
        self._shared_memory = False


def _check_result(result: pb.OpResult, call_id: int, regions: RegionReader | None) -> torch.Tensor:
    """The output tensor of ``result`` (a copy the caller owns), or the error it reports raised."""
    if result.call_id != call_id:
        raise SymbiosisError(f"protocol error: answer to call {result.call_id} received for call {call_id}")
    if result.WhichOneof("outcome") == "error":
        raise exception_for(result.error.code, result.error.message)
    return decode_tensor(result.y, regions=regions, copy=True)


class _StreamLane:
    """One gRPC ``Session`` stream: one call at a time, answers in order."""

    def __init__(self, stub: pb_grpc.ExecutorStub, metadata: tuple) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = stub.Session(iter(self._requests.get, None), metadata=metadata)
        self.broken = False  # the stream ended with an error: the next call needs a new one
        weakref.finalize(self, self._requests.put, None)

    def call(self, request: OpRequest, call_id: int) -> torch.Tensor:
        msg = encode_call(request, call_id)
        encode_tensor(request.x, msg.x)
        self._requests.put(msg)
        try:
            result = next(self._responses)
        except StopIteration:
            self.broken = True
            raise _Transient("the server ended the session") from None
        except grpc.RpcError as exc:
            self.broken = True
            raise _translate(exc) from None
        return _check_result(result, call_id, None)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


class _ShmLane:
    """One same-host shared-memory channel (see ``transport.shm``)."""

    def __init__(self, reply: pb.AttachReply) -> None:
        self.layout = ShmLayout(reply.capacity, reply.header_bytes)
        self._sock, self._memory = open_channel(reply.doorbell, self.layout.size)
        self._buf = memoryview(self._memory)
        self._responses = functools.partial(self.layout.region, self._buf, self.layout.response_data)
        weakref.finalize(self, self._sock.close)

    def fits(self, request: OpRequest, output_bytes: int) -> bool:
        return max(request.x.numel() * request.x.element_size(), output_bytes) <= self.layout.capacity

    def call(self, request: OpRequest, call_id: int) -> torch.Tensor:
        buf, layout = self._buf, self.layout
        write_tensor(buf, layout.request_data, request.x)
        msg = encode_call(request, call_id)
        describe_region(request.x, layout.request_data, msg.x)
        write_message(buf, layout.request_header, msg, layout.header)
        try:
            self._sock.sendall(DOORBELL)
            answer = self._sock.recv(1)
        except OSError as exc:
            raise _Transient(f"shared-memory channel lost: {exc}") from None
        if answer != DOORBELL:
            raise _Transient("the server closed the shared-memory channel")
        return _check_result(read_message(buf, layout.response_header, pb.OpResult, layout.header), call_id, self._responses)

    def close(self) -> None:
        self._sock.close()
        self._responses = None
        unmap(self._memory, self._buf)

