"""The server side of same-host shared-memory channels (layout and protocol: ``transport.shm``).

Each channel has its own thread, memory (a memfd: no name anywhere) and abstract Unix socket, and
belongs to the tenant that attached it over the authenticated gRPC service. A channel waits at most
``accept_timeout_s`` for its client and accepts only the process id that client declared (others
are refused and the channel keeps waiting); when that process connects, the channel takes one of
the tenant's sessions — not at attach, so that a client on another host, which cannot connect and
uses another lane instead, holds none — and hands the memory over. Calls then follow
``server.channels``: the output of each is computed straight into the channel's response area. On a
GPU executor the channel's memory is registered as pinned host memory (its copies to and from the
GPU are DMA transfers), and a client that computes on a GPU also gets buffers in the executor's GPU
memory, shared by CUDA IPC (``transport.cuda_ipc``). At most ``max_channels`` exist at once, of
which at most ``max_pending`` wait for their client (each costs a thread and up to
``2 * MAX_CAPACITY`` bytes).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

import torch

from ..errors import BadRequestError, LimitExceededError
from ..transport import cuda_ipc
from ..transport import symbiosis_pb2 as pb
from ..transport.shm import (
    DEFAULT_CAPACITY,
    MAX_CAPACITY,
    MAX_MESSAGE_BYTES,
    Area,
    ShmLayout,
    aligned_capacity,
    create_memory,
    hand_over,
    listen,
    map_tensor,
    peer_pid,
    refuse,
    unmap,
)
from ..transport.waiting import DEFAULT_SPIN_S, Receiver
from ..transport.wire import RegionReader
from .channels import Channel, ChannelHost
from .handler import RequestHandler
from .tenancy import TenantState

log = logging.getLogger(__name__)

#: Default bound on channels at once (connected or waiting for their client).
DEFAULT_MAX_CHANNELS = 64
#: Default bound on channels waiting for their client.
DEFAULT_MAX_PENDING = 8
#: Default seconds a channel waits for its client to connect.
DEFAULT_ACCEPT_TIMEOUT_S = 2.0


class ShmHost(ChannelHost):
    """Creates and serves shared-memory channels; ``drain()`` ends them after their current call."""

    what = "shared-memory channels"

    def __init__(
        self,
        handler: RequestHandler,
        *,
        max_channels: int = DEFAULT_MAX_CHANNELS,
        max_pending: int = DEFAULT_MAX_PENDING,
        accept_timeout_s: float = DEFAULT_ACCEPT_TIMEOUT_S,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        super().__init__(handler, max_channels=max_channels, max_pending=max_pending, spin_s=spin_s)
        self.accept_timeout_s = accept_timeout_s
        self.device = handler.executor.device
        #: Makes a channel's CUDA buffers (``capacity`` bytes each way) for clients that compute on a
        #: GPU: on a GPU executor, buffers in its memory; None (clients use host memory) otherwise.
        self.device_buffers: Callable[[int], cuda_ipc.CudaBuffers] | None = (
            (lambda capacity: cuda_ipc.CudaBuffers.allocate(self.device, capacity)) if self.device.type == "cuda" else None
        )

    def attach(self, tenant: TenantState, pid: int, capacity: int, *, cuda: bool = False) -> pb.AttachReply:
        """Create a channel for process ``pid`` of ``tenant`` with ``capacity`` bytes each way (and,
        with ``cuda`` on a GPU executor, CUDA buffers as large).

        Raises ``BadRequestError`` for a capacity beyond ``MAX_CAPACITY``, ``LimitExceededError``
        when the server holds as many channels as it may, ``ExecutorUnavailableError`` while draining.
        """
        capacity = capacity or DEFAULT_CAPACITY
        if not 0 < capacity <= MAX_CAPACITY:
            raise BadRequestError(f"channel capacity must lie in (0, {MAX_CAPACITY}], got {capacity}")
        limit = tenant.tenant.limits.payload_bytes
        capacity = aligned_capacity(min(capacity, limit) if limit else capacity)
        cuda = cuda and self.device_buffers is not None
        channel = self.add(lambda: _ShmChannel(self, tenant, pid, ShmLayout(capacity), cuda))
        return pb.AttachReply(doorbell=channel.address, capacity=capacity)


class _ShmChannel(Channel):
    """One client thread's channel: waits for its client, then answers its calls in shared memory."""

    def __init__(self, host: ShmHost, tenant: TenantState, pid: int, layout: ShmLayout, cuda: bool) -> None:
        super().__init__(host, f"symbiosis-shm-{tenant.name}-{pid}")
        self.tenant = tenant
        self.pid = pid
        self.layout = layout
        self.address = f"symbiosis-{secrets.token_hex(16)}"
        self._cuda = cuda
        fd, self._memory = create_memory(layout.size)
        self._fd: int | None = fd
        try:
            self._listener = listen(self.address)
        except BaseException:
            os.close(fd)
            self._memory.close()
            raise
        self._bytes = map_tensor(self._memory)
        self._requests = Area(self._bytes, layout.request_data, layout.capacity)
        self._responses = Area(self._bytes, layout.response_data, layout.capacity)
        self._receiver: Receiver | None = None
        self._lock = threading.Lock()  # orders hang_up() against accepting and closing
        self._conn: socket.socket | None = None
        self._ended = False
        self._device_buffers: cuda_ipc.CudaBuffers | None = None
        self._device_requests = self._device_responses = None
        self._call_on_device = False
        self._unpin = lambda: None

    def run(self) -> None:
        try:
            conn = self._accept()
            if conn is not None:
                self._open(conn)
        except OSError as exc:
            log.debug("shared-memory channel of %s ended: %s", self.tenant.name, exc)
        finally:
            self._close()

    def _accept(self) -> socket.socket | None:
        """The declared process's connection, or None when the channel is hung up first: by the
        server, or by itself after ``accept_timeout_s``. (A blocking accept(), which shutdown() wakes;
        a timed one polls, and spins until its timeout once the listener is shut down.)"""
        expiry = threading.Timer(self.host.accept_timeout_s, self.hang_up)
        expiry.daemon = True
        expiry.start()
        try:
            while True:
                conn, _ = self._listener.accept()
                pid = peer_pid(conn)
                if pid == self.pid:
                    return conn if self._admit(conn) else None
                log.warning("shared-memory channel of %s: connection from pid %d, expected %d; refused", self.tenant.name, pid, self.pid)
                conn.close()
        except OSError:  # hang_up() shut the listener down
            return None
        finally:
            expiry.cancel()
            with self._lock:
                self._listener.close()

    def _admit(self, conn: socket.socket) -> bool:
        """Make ``conn`` the channel's connection unless the channel was hung up meanwhile (then close it)."""
        with self._lock:
            if not self._ended:
                self._conn = conn
                self._receiver = Receiver(conn, MAX_MESSAGE_BYTES, spin_s=self.host.spin_s)
                self.idle_since = time.monotonic()
                self.connected = True
                return True
        conn.close()
        return False

    def _open(self, conn: socket.socket) -> None:
        """Take one of the tenant's sessions and hand the memory over, or tell the client why not; then serve."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.tenant.session())
            except LimitExceededError as exc:
                refuse(conn, str(exc))
                return
            grant = pb.ChannelGrant()
            if self.host.device.type == "cuda":
                self._unpin = cuda_ipc.pin(self._bytes)
            if self._cuda and self.host.device_buffers is not None:
                self._device_buffers = self.host.device_buffers(self.layout.capacity)
                self._device_requests = Area(self._device_buffers.request)
                self._device_responses = Area(self._device_buffers.response)
                grant.cuda.CopyFrom(self._device_buffers.grant())
            hand_over(conn, self._fd, grant.SerializeToString())
            os.close(self._fd)  # the client holds its own descriptor now; the mapping keeps the memory
            self._fd = None
            self.serve()

    # ------------------------------------------------------------------------------ the calls
    def receive(self) -> tuple[memoryview, RegionReader, None] | None:
        message = self._receiver.receive()
        if message is None:
            return None
        self._call_on_device = False  # a repeat of a planned call reads host memory
        return message, self._request_region, None

    def decoded(self, call: pb.OpCall) -> bool:
        self._call_on_device = call.x.WhichOneof("payload") == "region" and call.x.region.device
        if self._call_on_device:
            if self._device_buffers is None:
                raise BadRequestError("a device region on a channel without CUDA buffers")
            self._device_buffers.await_request()
        return not self._call_on_device

    def _request_region(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: bool) -> torch.Tensor:
        return (self._device_requests if device else self._requests).tensor(offset, shape, dtype)

    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.layout.capacity:
            raise LimitExceededError(f"an output of {nbytes} bytes exceeds the channel's {self.layout.capacity} bytes")
        # the answer to a call that came through the CUDA buffers goes back through them
        if self._call_on_device:
            return self._device_responses.tensor(0, shape, dtype)
        return self._responses.tensor(self.layout.response_data, shape, dtype)

    def region(self, y: torch.Tensor) -> tuple[int, bool]:
        if self._call_on_device:
            self._device_buffers.mark_response()
            return 0, True
        return self.layout.response_data, False

    def send(self, result: bytes, y: torch.Tensor | None) -> None:
        self._conn.send(result)

    def hang_up(self) -> None:
        with self._lock:
            self._ended = True
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a pending accept(); fails once it is closed
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RD)  # the next receive sees end-of-file

    def _close(self) -> None:
        with self._lock:
            self._ended = True
            self._listener.close()
            if self._conn is not None:
                self._conn.close()
        if self._receiver is not None:
            self._receiver.close()  # this thread's own receives are over
        self.forget_plans()  # they view the channel's memory
        if self._fd is not None:
            os.close(self._fd)
        self._unpin()
        self._device_buffers = self._device_requests = self._device_responses = None
        self._bytes = self._requests = self._responses = None
        unmap(self._memory)
        self.host.forget(self)
