"""A client thread's lanes to an executor server: how one op call travels, one call at a time.

* ``ShmLane`` — a same-host shared-memory channel (``transport.shm``): the rows are written into
  shared memory (or, for a GPU client of a GPU executor, into the channel's CUDA buffers:
  ``transport.cuda_ipc``), the ``OpCall`` is one socket message, the answer another.
* ``DataLane`` — a TCP data channel (``transport.frames``), TLS when the service uses it, for
  clients on other hosts (or requests too large for the shared memory).
* ``StreamLane`` — a gRPC ``Session`` stream: the fallback where neither channel can be had.

Every lane raises ``Transient`` when the connection is lost (the caller retries on a fresh lane)
and the error the server reported for a refused request. A lane whose answer takes longer than its
``patience`` asks ``alive()`` (a gRPC health check) whether the server is still there, and gives up
with ``Transient`` when it is not: a stopped or vanished server fails calls instead of hanging them.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import weakref
from collections.abc import Callable

import grpc
import torch

from ..errors import ExecutorUnavailableError, LimitExceededError, SymbiosisError
from ..protocol import OpRequest
from . import cuda_ipc
from . import symbiosis_pb2 as pb
from . import symbiosis_pb2_grpc as pb_grpc
from .frames import PREFIX, receive_into, receive_prefix, send_frame, tensor_view
from .keepalive import enable_tcp_keepalive
from .shm import MAX_MESSAGE_BYTES, Area, ShmLayout, map_tensor, open_channel, set_receive_timeout, unmap
from .waiting import DEFAULT_SPIN_S, Receiver, StreamWaiter
from .wire import WIRE_DTYPES, decode_tensor, describe_region, encode_call, encode_tensor, exception_for

#: Serialized call descriptions a channel lane keeps (see ``_SocketLane._header``).
MAX_DESCRIPTIONS = 256
#: Status codes that mean "the server is not there right now" (or ended the session): the call is retried.
TRANSIENT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


class Transient(ExecutorUnavailableError):
    """The server could not be reached or hung up; the call may be retried."""


def translate(exc: grpc.RpcError) -> SymbiosisError:
    """The client-side exception for a failed gRPC call."""
    if exc.code() in TRANSIENT_CODES:
        return Transient(f"executor unavailable: {exc.code().name}: {exc.details()}")
    return exception_for(exc.code(), exc.details() or exc.code().name)


def _checked(result: pb.OpResult, call_id: int) -> pb.Tensor:
    """The output message of ``result``, or the error it reports raised."""
    if result.call_id != call_id:
        raise SymbiosisError(f"protocol error: answer to call {result.call_id} received for call {call_id}")
    if result.WhichOneof("outcome") == "error":
        raise exception_for(result.error.code, result.error.message)
    return result.y


class StreamLane:
    """One gRPC ``Session`` stream: one call at a time, answers in order (tensors inline)."""

    kind = "grpc"

    def __init__(self, stub: pb_grpc.ExecutorStub, metadata: tuple) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = stub.Session(iter(self._requests.get, None), metadata=metadata)
        self.broken = False  # the stream ended with an error: the next call needs a new one
        weakref.finalize(self, self._requests.put, None)

    def fits(self, request: OpRequest, output_bytes: int) -> bool:
        return True

    def call(self, request: OpRequest, call_id: int) -> torch.Tensor:
        msg = encode_call(request, call_id)
        encode_tensor(request.x, msg.x)
        self._requests.put(msg)
        try:
            result = next(self._responses)
        except StopIteration:
            self.broken = True
            raise Transient("the server ended the session") from None
        except grpc.RpcError as exc:
            self.broken = True
            raise translate(exc) from None
        return decode_tensor(_checked(result, call_id), copy=True)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


class _SocketLane:
    """What both channel lanes share: waiting for answers with patience, noticing a lost connection."""

    def __init__(self, sock: socket.socket, patience_s: float, alive: Callable[[], bool]) -> None:
        self._sock = sock
        self._patience_s = patience_s
        self._alive = alive
        self._msg = pb.OpCall()
        self._descriptions: dict[tuple, bytes] = {}
        weakref.finalize(self, sock.close)

    def _header(self, request: OpRequest, call_id: int, x: torch.Tensor, offset: int, device: bool = False) -> bytes:
        """The serialized ``OpCall`` of ``request``, its rows ``x`` at ``offset`` of the channel's
        request memory (``device``: of its CUDA request buffer): the call id, then the call's
        ``_description`` (two serialized messages concatenated parse as their merge; the server
        recognises a call it has seen by the bytes after its call id)."""
        return pb.OpCall(call_id=call_id).SerializeToString() + self._description(request, x, offset, device)

    def _description(self, request: OpRequest, x: torch.Tensor, offset: int, device: bool) -> bytes:
        """The serialized ``OpCall`` of ``request`` without its call id, kept per distinct call (a
        thread makes the same few calls, one per op and shape, again and again)."""
        key = (
            request.op, request.direction, request.priority, request.out_dtype, request.client_id,
            request.compute_dtype, request.weight_dtype, request.features, x.shape, x.dtype, offset, device,
        )
        description = self._descriptions.get(key)
        if description is None:
            msg = encode_call(request, 0, self._msg)
            describe_region(x, offset, msg.x, device=device)
            if len(self._descriptions) >= MAX_DESCRIPTIONS:
                self._descriptions.clear()
            description = self._descriptions[key] = msg.SerializeToString()
        return description

    def _impatient(self) -> None:
        """A receive timed out: go on waiting while the server is alive, else ``Transient``."""
        if not self._alive():
            raise Transient("the executor stopped answering (its health check failed)")

    def _send(self, send: Callable[[], None]) -> None:
        try:
            send()
        except OSError as exc:
            raise Transient(f"the connection to the executor was lost: {exc}") from None

    def _fill(self, view: memoryview, *, at_start: bool = False) -> bool:
        """Fill ``view`` from the socket (see ``frames.receive_into``), waiting with patience."""
        got, total = 0, view.nbytes
        while got < total:
            try:
                n = self._sock.recv_into(view[got:], total - got)
            except (BlockingIOError, TimeoutError):
                self._impatient()
                continue
            except OSError as exc:
                raise Transient(f"the connection to the executor was lost: {exc}") from None
            if n == 0:
                if at_start and got == 0:
                    return False
                raise Transient(f"the connection to the executor ended {got} bytes into a {total}-byte read")
            got += n
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):  # ends the connection even while a receive holds a duplicate of it
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class ShmLane(_SocketLane):
    """One same-host shared-memory channel (see ``transport.shm``); ``cuda``: the thread's rows live
    on a GPU (use the channel's CUDA buffers when the executor offers them, else pinned host memory);
    ``spin_s``: how long a call polls for its answer before it sleeps (``transport.waiting``)."""

    kind = "shm"

    def __init__(
        self, reply: pb.AttachReply, *, cuda: bool, patience_s: float, alive: Callable[[], bool], spin_s: float = DEFAULT_SPIN_S
    ) -> None:
        self.layout = ShmLayout(reply.capacity)
        sock, self._memory, grant = open_channel(reply.doorbell, self.layout.size)
        super().__init__(sock, patience_s, alive)
        set_receive_timeout(sock, patience_s)
        self._bytes = map_tensor(self._memory)
        self._requests = Area(self._bytes, self.layout.request_data, self.layout.capacity)
        self._responses = Area(self._bytes, self.layout.response_data, self.layout.capacity)
        self._receiver = Receiver(sock, MAX_MESSAGE_BYTES, spin_s=spin_s)
        #: Per call description: its last answer without the call id, and the output it describes.
        self._answers: dict[bytes, tuple[bytes, torch.Tensor]] = {}
        parsed = pb.ChannelGrant.FromString(grant)
        self.cuda = cuda_ipc.CudaBuffers.open(parsed.cuda) if cuda and parsed.HasField("cuda") else None
        self._unpin = cuda_ipc.pin(self._bytes) if cuda and self.cuda is None else _nothing

    def fits(self, request: OpRequest, output_bytes: int) -> bool:
        return max(request.x.numel() * request.x.element_size(), output_bytes) <= self.layout.capacity

    def call(self, request: OpRequest, call_id: int) -> torch.Tensor:
        x = request.x
        if x.requires_grad:
            x = x.detach()
        on_device = self.cuda is not None and self.cuda.holds(x)
        if on_device:
            self.cuda.send(x)
        else:
            self._requests.tensor(self.layout.request_data, tuple(x.shape), x.dtype).copy_(x)
        description = self._description(request, x, 0 if on_device else self.layout.request_data, on_device)
        prefix = pb.OpCall(call_id=call_id).SerializeToString()  # OpResult's call id has the same field number
        message = prefix + description
        self._send(lambda: self._sock.send(message))
        while True:
            try:
                answer = self._receiver.receive()
                break
            except BlockingIOError:
                self._impatient()
            except OSError as exc:
                raise Transient(f"the shared-memory channel was lost: {exc}") from None
        if answer is None:
            raise Transient("the server closed the shared-memory channel")
        # an answer exactly like the last one to this call (but for its call id) needs no decoding
        known = self._answers.get(description)
        led = answer[: len(prefix)] == prefix
        if led and known is not None and answer[len(prefix) :] == known[0]:
            out = known[1].clone()
        else:
            y = _checked(pb.OpResult.FromString(answer), call_id)
            if y.region.device:
                return self.cuda.receive(y.region.offset, tuple(y.shape), _dtype(y), x.device)
            output = decode_tensor(y, regions=self._response_region)
            out = output.clone()
            if led and output.is_floating_point():  # a view of the response memory
                if len(self._answers) >= MAX_DESCRIPTIONS:
                    self._answers.clear()
                self._answers[description] = (bytes(answer[len(prefix) :]), output)
        return out if out.device == x.device else out.to(x.device)

    def _response_region(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: bool) -> torch.Tensor:
        if device:
            raise SymbiosisError("protocol error: a device region on a channel without CUDA buffers")
        return self._responses.tensor(offset, shape, dtype)

    def close(self) -> None:
        super().close()
        self._unpin()
        self._answers.clear()  # they view the channel's memory
        self._bytes = self._requests = self._responses = None
        unmap(self._memory)


class DataLane(_SocketLane):
    """One TCP data channel (see ``transport.frames``), TLS when ``tls`` is a context; ``spin_s``: how
    long a call polls for its answer before it sleeps (``transport.waiting``)."""

    kind = "tcp"

    def __init__(
        self,
        host: str,
        reply: pb.AttachDataReply,
        *,
        token: str | None,
        tls: ssl.SSLContext | None,
        connect_timeout_s: float,
        patience_s: float,
        alive: Callable[[], bool],
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        sock = socket.create_connection((host, reply.port), timeout=connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            enable_tcp_keepalive(sock, patience_s)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            send_frame(sock, pb.DataHello(token=token or "").SerializeToString())
            welcome = pb.DataWelcome.FromString(_receive_frame_header(sock))
        except BaseException:
            sock.close()
            raise
        if welcome.HasField("error"):
            sock.close()
            raise exception_for(welcome.error.code, welcome.error.message)
        if tls is None:  # a kernel timeout: no extra system call per receive
            sock.settimeout(None)
            set_receive_timeout(sock, patience_s)
        else:
            sock.settimeout(patience_s)
        super().__init__(sock, patience_s, alive)
        self.max_payload = reply.max_payload_bytes
        self._prefix = bytearray(PREFIX.size)
        self._waiter = StreamWaiter(spin_s=spin_s)

    def fits(self, request: OpRequest, output_bytes: int) -> bool:
        return True

    def call(self, request: OpRequest, call_id: int) -> torch.Tensor:
        x = request.x.detach().to("cpu").contiguous()
        nbytes = x.numel() * x.element_size()
        if nbytes > self.max_payload:
            raise LimitExceededError(f"a tensor of {nbytes} bytes exceeds the limit of {self.max_payload} bytes per message")
        header = self._header(request, call_id, x, 0)
        self._send(lambda: send_frame(self._sock, header, x))
        self._waiter.wait(self._sock)
        if not self._fill(memoryview(self._prefix), at_start=True):
            raise Transient("the server closed the data channel")
        self._waiter.read()
        header_bytes, payload_bytes = PREFIX.unpack(self._prefix)
        if header_bytes > MAX_MESSAGE_BYTES:
            raise SymbiosisError(f"protocol error: a result header of {header_bytes} bytes")
        data = bytearray(header_bytes)
        self._fill(memoryview(data))
        y = _checked(pb.OpResult.FromString(data), call_id)
        out = torch.empty(tuple(y.shape), dtype=_dtype(y))
        if out.numel() * out.element_size() != payload_bytes:
            raise SymbiosisError(f"protocol error: a result of {payload_bytes} bytes for a {tuple(y.shape)} {y.dtype} tensor")
        if payload_bytes:
            self._fill(tensor_view(out))
        return out.to(request.x.device)


def _nothing() -> None:
    pass


def _receive_frame_header(sock: socket.socket) -> bytes:
    """The header of the next frame, which must carry no payload (set-up frames)."""
    lengths = receive_prefix(sock, bytearray(PREFIX.size), 0)
    if lengths is None:
        raise ConnectionError("the server closed the data channel")
    data = bytearray(lengths[0])
    receive_into(sock, memoryview(data))
    return bytes(data)


def _dtype(t: pb.Tensor) -> torch.dtype:
    dtype = WIRE_DTYPES.get(t.dtype)
    if dtype is None:
        raise SymbiosisError(f"protocol error: the server sent a tensor of dtype {t.dtype!r}")
    return dtype


