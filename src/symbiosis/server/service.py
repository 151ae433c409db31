"""The gRPC servicer: authenticates every call, serves the spec, frozen tensors and op sessions.

A client thread holds one ``Session`` stream (or one shared-memory channel) and sends one op call
at a time; each stream is served by its own server thread, which calls ``executor.run`` — so calls
from different processes meet in the executor's batches exactly as in-process threads do. Results
travel back only on the stream (or channel) that carried the call.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

import grpc

from ..errors import SymbiosisError
from ..executor import BaseExecutor
from ..transport import symbiosis_pb2 as pb
from ..transport import symbiosis_pb2_grpc as pb_grpc
from ..transport.wire import encode_tensor, spec_to_json, status_code_of, tensor_bytes
from .handler import RequestHandler
from .shm_host import ShmHost
from .tenancy import TenantRegistry, TenantState

#: Bytes per chunk when streaming frozen tensors.
TENSOR_CHUNK_BYTES = 4 << 20
#: Longest error message sent back.
MAX_ERROR_CHARS = 1024


class _Sessions:
    """Open session streams and whether each is inside a call, so that draining can end idle ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[grpc.ServicerContext, bool] = {}
        self.draining = False

    def enter(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._busy[context] = False

    def leave(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._busy.pop(context, None)

    def begin_call(self, context: grpc.ServicerContext) -> bool:
        """Mark the session busy; False when the server is draining (the call must be refused)."""
        with self._lock:
            if self.draining:
                return False
            self._busy[context] = True
            return True

    def end_call(self, context: grpc.ServicerContext) -> bool:
        """Mark the session idle; False when the server is draining (the session must end)."""
        with self._lock:
            self._busy[context] = False
            return not self.draining

    def drain(self) -> None:
        """Refuse new calls; cancel idle sessions (busy ones end after their call)."""
        with self._lock:
            self.draining = True
            idle = [context for context, busy in self._busy.items() if not busy]
        for context in idle:
            context.cancel()


class ExecutorService(pb_grpc.ExecutorServicer):
    """Serves one executor to the tenants of ``registry``."""

    def __init__(self, executor: BaseExecutor, registry: TenantRegistry, handler: RequestHandler, shm: ShmHost | None) -> None:
        self.executor = executor
        self.registry = registry
        self.handler = handler
        self.shm = shm
        self.sessions = _Sessions()
        self._spec_json = spec_to_json(executor.spec())

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
        return pb.SpecReply(json=self._spec_json)

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
                stack.enter_context(tenant.session())
            except SymbiosisError as exc:
                self._abort(context, exc)
            self.sessions.enter(context)
            stack.callback(self.sessions.leave, context)
            for call in request_iterator:
                if not self.sessions.begin_call(context):
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the executor is shutting down")
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
            return self.shm.attach(tenant, request.pid, request.capacity)
        except SymbiosisError as exc:
            self._abort(context, exc)

    def GetStats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        """Batch statistics of the executor (all tenants) and the caller's own tenant's request counts."""
        tenant = self._tenant(context)
        stats = self.executor.stats
        return pb.StatsReply(
            json=json.dumps(
                {
                    "total": stats.total(),
                    "ops": [
                        {"op": family, "direction": direction.name.lower(), **summary}
                        for (family, direction), summary in stats.by_family().items()
                    ],
                    "completed_by_client": self.handler.completed_by_client(tenant.name),
                    "queue_depth": self.executor.queue_depth(),
                }
            )
        )
