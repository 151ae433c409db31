"""The server side of same-host shared-memory channels (layout and protocol: ``transport.shm``).

Each channel has its own thread, segment and Unix socket, and belongs to the tenant that attached
it over the authenticated gRPC service. The segment name and socket path are random and handed
only to that tenant; the socket lives in a private 0700 directory, accepts exactly one connection,
and (on Linux) only from the process id the client declared. A channel ends when its client hangs
up, crashes or sends garbage it cannot answer, or when the server drains; its segment is unlinked.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading

from ..errors import BadRequestError, LimitExceededError
from ..transport import symbiosis_pb2 as pb
from ..transport.shm import (
    DEFAULT_CAPACITY,
    DOORBELL,
    MAX_CAPACITY,
    ShmLayout,
    create_segment,
    read_message,
    release_segment,
    write_message,
    write_tensor,
)
from ..transport.wire import describe_region, status_code_of
from .handler import RequestHandler
from .tenancy import TenantState

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")


class ShmHost:
    """Creates and serves shared-memory channels; ``drain()`` ends them after their current call."""

    def __init__(self, handler: RequestHandler, *, accept_timeout_s: float = 10.0) -> None:
        self.handler = handler
        self.accept_timeout_s = accept_timeout_s
        self._dir = tempfile.mkdtemp(prefix="symbiosis-shm-")
        self._lock = threading.Lock()
        self._channels: set[_Channel] = set()
        self._draining = False

    def attach(self, tenant: TenantState, pid: int, capacity: int) -> pb.AttachReply:
        """Create a channel for process ``pid`` of ``tenant`` with ``capacity`` bytes each way."""
        capacity = capacity or DEFAULT_CAPACITY
        if not 0 < capacity <= MAX_CAPACITY:
            raise BadRequestError(f"channel capacity must lie in (0, {MAX_CAPACITY}], got {capacity}")
        limit = tenant.tenant.limits.payload_bytes
        capacity = min(capacity, limit) if limit else capacity
        stack = contextlib.ExitStack()
        stack.enter_context(tenant.session())
        try:
            channel = _Channel(self, tenant, pid, ShmLayout(capacity), stack)
        except BaseException:
            stack.close()
            raise
        with self._lock:
            if self._draining:
                channel.close()
                raise LimitExceededError("the server is shutting down")
            self._channels.add(channel)
        channel.start()
        return pb.AttachReply(
            segment=channel.shm.name,
            nonce=channel.nonce,
            doorbell=channel.path,
            capacity=capacity,
            header_bytes=channel.layout.header,
        )

    def drain(self, timeout_s: float | None = None) -> None:
        """End every channel after its current call and wait for them (at most ``timeout_s``)."""
        with self._lock:
            self._draining = True
            channels = list(self._channels)
        for channel in channels:
            channel.hang_up()
        for channel in channels:
            channel.join(timeout_s)
        shutil.rmtree(self._dir, ignore_errors=True)

    def channel_count(self) -> int:
        with self._lock:
            return len(self._channels)

    def _forget(self, channel: _Channel) -> None:
        with self._lock:
            self._channels.discard(channel)


class _Channel(threading.Thread):
    """One client thread's channel: waits for doorbells, answers each call in shared memory."""

    def __init__(self, host: ShmHost, tenant: TenantState, pid: int, layout: ShmLayout, stack: contextlib.ExitStack) -> None:
        super().__init__(name=f"symbiosis-shm-{tenant.name}-{pid}", daemon=True)
        self.host = host
        self.tenant = tenant
        self.pid = pid
        self.layout = layout
        self._stack = stack
        self.shm = create_segment(layout.size)
        self.nonce = secrets.token_bytes(16)
        self.shm.buf[: len(self.nonce)] = self.nonce
        self.path = os.path.join(host._dir, f"{secrets.token_hex(12)}.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._listener.settimeout(host.accept_timeout_s)
        self._conn: socket.socket | None = None

    def run(self) -> None:
        try:
            conn = self._accept()
            if conn is not None:
                self._conn = conn
                self._serve(conn)
        except OSError as exc:
            log.debug("shared-memory channel of %s ended: %s", self.tenant.name, exc)
        finally:
            self.close()

    def _accept(self) -> socket.socket | None:
        try:
            conn, _ = self._listener.accept()
        except (TimeoutError, OSError):
            return None
        finally:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if hasattr(socket, "SO_PEERCRED"):
            peer_pid, _, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            if peer_pid != self.pid:
                log.warning("shared-memory channel of %s: connection from pid %d, expected %d; refused", self.tenant.name, peer_pid, self.pid)
                conn.close()
                return None
        return conn

    def _serve(self, conn: socket.socket) -> None:
        buf, layout = self.shm.buf, self.layout
        requests = functools.partial(layout.region, buf, layout.request_data)
        while conn.recv(1) == DOORBELL:
            result = pb.OpResult()
            try:
                call = read_message(buf, layout.request_header, pb.OpCall, layout.header)
                result.call_id = call.call_id
                y = self.host.handler.handle(call, self.tenant, regions=requests)
                if y.numel() * y.element_size() > layout.capacity:
                    raise LimitExceededError(f"an output of {y.numel() * y.element_size()} bytes exceeds the channel's {layout.capacity} bytes")
                write_tensor(buf, layout.response_data, y)
                describe_region(y, layout.response_data, result.y)
                del y
            except Exception as exc:
                result.error.code = status_code_of(exc).name
                result.error.message = str(exc)[:1024]
            write_message(buf, layout.response_header, result, layout.header)
            conn.sendall(DOORBELL)

    def hang_up(self) -> None:
        """Stop reading doorbells: the channel ends after the call in progress, if any."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a pending accept()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        release_segment(self.shm, unlink=True)
        self._stack.close()
        self.host._forget(self)
