"""The gRPC servicer: authenticates every call, serves the spec, frozen tensors, channel set-up
(``AttachShm``, ``AttachData``) and op sessions.

A client thread holds one lane — a shared-memory channel, a TCP data channel, or a ``Session``
stream — and sends one op call at a time; each stream is served by its own server thread, which
calls ``executor.run`` — so calls from different processes meet in the executor's batches exactly
as in-process threads do (channels: ``server.channels``). Results travel back only on the lane that
carried the call. Streams are bounded (a server keeps threads for the unary calls and health
checks) and end when idle too long; the client then opens a new one for its next call.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator

import grpc

from ..errors import LimitExceededError, SymbiosisError
from ..executor import BaseExecutor
from ..transport import symbiosis_pb2 as pb
from ..transport import symbiosis_pb2_grpc as pb_grpc
from ..transport.fingerprint import base_fingerprint
from ..transport.wire import encode_tensor, spec_to_json, status_code_of, tensor_bytes
from .data_host import DataHost
from .handler import RequestHandler
from .shm_host import ShmHost
from .tenancy import TenantRegistry, TenantState

#: Bytes per chunk when streaming frozen tensors.
TENSOR_CHUNK_BYTES = 4 << 20
#: Longest error message sent back.
MAX_ERROR_CHARS = 1024


class _Sessions:
    """Open session streams (at most ``limit``) and since when each is idle (``inf`` inside a call),
    so that idle ones can be ended: after ``end_idle``'s timeout, and at once when draining."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._idle_since: dict[grpc.ServicerContext, float] = {}
        self.draining = False

    def enter(self, context: grpc.ServicerContext) -> None:
        """Register a new session; ``LimitExceededError`` when ``limit`` sessions are open."""
        with self._lock:
            if len(self._idle_since) >= self.limit:
                raise LimitExceededError(
                    f"the server has {self.limit} open sessions, its limit (its other threads serve health checks and "
                    "setup calls); retry later or use fewer client threads"
                )
            self._idle_since[context] = time.monotonic()

    def leave(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._idle_since.pop(context, None)

    def begin_call(self, context: grpc.ServicerContext) -> bool:
        """Mark the session busy; False when it was ended or the server is draining (refuse the call)."""
        with self._lock:
            if self.draining or context not in self._idle_since:
                return False
            self._idle_since[context] = math.inf
            return True

    def end_call(self, context: grpc.ServicerContext) -> bool:
        """Mark the session idle; False when the server is draining (the session must end)."""
        with self._lock:
            self._idle_since[context] = time.monotonic()
            return not self.draining

    def end_idle(self, idle_s: float) -> None:
        """Cancel sessions idle for more than ``idle_s`` seconds (their clients open new ones)."""
        now = time.monotonic()
        with self._lock:
            idle = [context for context, since in self._idle_since.items() if now - since > idle_s]
            for context in idle:
                del self._idle_since[context]
        for context in idle:
            context.cancel()

    def drain(self) -> None:
        """Refuse new calls; cancel idle sessions (busy ones end after their call)."""
        with self._lock:
            self.draining = True
            idle = [context for context, since in self._idle_since.items() if since != math.inf]
        for context in idle:
            context.cancel()


class ExecutorService(pb_grpc.ExecutorServicer):
    """Serves one executor to the tenants of ``registry``, with at most ``max_sessions`` open streams."""

    def __init__(
        self,
        executor: BaseExecutor,
        registry: TenantRegistry,
        handler: RequestHandler,
        shm: ShmHost | None,
        data: DataHost | None,
        *,
        max_sessions: int,
    ) -> None:
        self.executor = executor
        self.registry = registry
        self.handler = handler
        self.shm = shm
        self.data = data
        self.sessions = _Sessions(max_sessions)
        spec = executor.spec()
        self._spec = pb.SpecReply(json=spec_to_json(spec), fingerprint=base_fingerprint(executor.tensors(spec.tensors)))

    # ------------------------------------------------------------------------------- helpers
    def _tenant(self, context: grpc.ServicerContext) -> TenantState:
        token = None
        for key, value in context.invocation_metadata():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value.removeprefix("Bearer ")
        try:
            return self.registry.authenticate(token)
        except SymbiosisError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
        context.abort(status_code_of(exc), str(exc)[:MAX_ERROR_CHARS])

    # ---------------------------------------------------------------------------------- RPCs
    def GetSpec(self, request: pb.SpecRequest, context: grpc.ServicerContext) -> pb.SpecReply:
        self._tenant(context)
        return self._spec

    def GetTensors(self, request: pb.TensorsRequest, context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        self._tenant(context)
        try:
            tensors = self.executor.tensors(list(request.names))
        except SymbiosisError as exc:
            self._abort(context, exc)
        for name, tensor in tensors.items():
            data = tensor_bytes(tensor)
            for offset in range(0, max(data.nbytes, 1), TENSOR_CHUNK_BYTES):
                yield pb.TensorChunk(
                    name=name,
                    dtype=str(tensor.dtype).removeprefix("torch."),
                    shape=list(tensor.shape),
                    offset=offset,
                    data=bytes(data[offset : offset + TENSOR_CHUNK_BYTES]),
                )

    def Session(self, request_iterator: Iterator[pb.OpCall], context: grpc.ServicerContext) -> Iterator[pb.OpResult]:
        tenant = self._tenant(context)
        with contextlib.ExitStack() as stack:
            try:
                self.sessions.enter(context)
                stack.callback(self.sessions.leave, context)
                stack.enter_context(tenant.session())
            except SymbiosisError as exc:
                self._abort(context, exc)
            for call in request_iterator:
                if not self.sessions.begin_call(context):
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the session ended (idle timeout or shutdown)")
                result = pb.OpResult(call_id=call.call_id)
                try:
                    encode_tensor(self.handler.handle(call, tenant), result.y)
                except Exception as exc:  # reported to this caller only; the session goes on
                    result.error.code = status_code_of(exc).name
                    result.error.message = str(exc)[:MAX_ERROR_CHARS]
                yield result
                if not self.sessions.end_call(context):
                    return

    def AttachShm(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> pb.AttachReply:
        tenant = self._tenant(context)
        if self.shm is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "shared-memory channels are disabled on this server")
        try:
            return self.shm.attach(tenant, request.pid, request.capacity, cuda=request.cuda)
        except SymbiosisError as exc:
            self._abort(context, exc)

    def AttachData(self, request: pb.AttachDataRequest, context: grpc.ServicerContext) -> pb.AttachDataReply:
        self._tenant(context)
        if self.data is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "TCP data channels are disabled on this server")
        if self.data.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return self.data.reply()

    def GetStats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        """The caller's tenant's completed requests per client id; the executor's batch statistics
        and queue depth (which reflect every tenant's traffic) only for tenants with ``stats = true``
        (on an open server: everyone)."""
        tenant = self._tenant(context)
        reply: dict = {"completed_by_client": self.handler.completed_by_client(tenant.name)}
        if tenant.tenant.stats:
            stats = self.executor.stats
            reply["total"] = stats.total()
            reply["ops"] = [
                {"op": family, "direction": direction.name.lower(), **summary} for (family, direction), summary in stats.by_family().items()
            ]
            reply["queue_depth"] = self.executor.queue_depth()
        return pb.StatsReply(json=json.dumps(reply))
