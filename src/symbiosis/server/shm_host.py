"""The server side of same-host shared-memory channels (layout and protocol: ``transport.shm``).

Each channel has its own thread, memory (a memfd: no name anywhere) and abstract Unix socket, and
belongs to the tenant that attached it over the authenticated gRPC service. A channel waits at most
``accept_timeout_s`` for its client and accepts only the process id that client declared (others
are refused and the channel keeps waiting); when that process connects, the channel takes one of
the tenant's sessions — not at attach, so that a client on another host, which cannot connect and
uses a gRPC stream instead, holds none — and hands the memory over. A channel ends when its client
hangs up, crashes or sends garbage it cannot answer, when it stays idle longer than the server's
idle timeout, or when the server drains. At most ``max_channels`` exist at once, of which at most
``max_pending`` wait for their client (each costs a thread and up to ``2 * MAX_CAPACITY`` bytes).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import secrets
import socket
import threading
import time

from ..errors import BadRequestError, ExecutorUnavailableError, LimitExceededError
from ..transport import symbiosis_pb2 as pb
from ..transport.shm import (
    DEFAULT_CAPACITY,
    DOORBELL,
    MAX_CAPACITY,
    ShmLayout,
    create_memory,
    hand_over,
    listen,
    peer_pid,
    read_message,
    refuse,
    unmap,
    write_message,
    write_tensor,
)
from ..transport.wire import describe_region, status_code_of
from .handler import RequestHandler
from .tenancy import TenantState

log = logging.getLogger(__name__)

#: Default bound on channels at once (connected or waiting for their client).
DEFAULT_MAX_CHANNELS = 64
#: Default bound on channels waiting for their client.
DEFAULT_MAX_PENDING = 8
#: Default seconds a channel waits for its client to connect.
DEFAULT_ACCEPT_TIMEOUT_S = 2.0


class ShmHost:
    """Creates and serves shared-memory channels; ``drain()`` ends them after their current call."""

    def __init__(
        self,
        handler: RequestHandler,
        *,
        max_channels: int = DEFAULT_MAX_CHANNELS,
        max_pending: int = DEFAULT_MAX_PENDING,
        accept_timeout_s: float = DEFAULT_ACCEPT_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.max_channels = max_channels
        self.max_pending = max_pending
        self.accept_timeout_s = accept_timeout_s
        self._lock = threading.Lock()
        self._channels: set[_Channel] = set()
        self._draining = False

    def attach(self, tenant: TenantState, pid: int, capacity: int) -> pb.AttachReply:
        """Create a channel for process ``pid`` of ``tenant`` with ``capacity`` bytes each way.

        Raises ``BadRequestError`` for a capacity beyond ``MAX_CAPACITY``, ``LimitExceededError``
        when the server holds as many channels as it may, ``ExecutorUnavailableError`` while draining.
        """
        capacity = capacity or DEFAULT_CAPACITY
        if not 0 < capacity <= MAX_CAPACITY:
            raise BadRequestError(f"channel capacity must lie in (0, {MAX_CAPACITY}], got {capacity}")
        limit = tenant.tenant.limits.payload_bytes
        capacity = min(capacity, limit) if limit else capacity
        with self._lock:
            if self._draining:
                raise ExecutorUnavailableError("the server is shutting down")
            if len(self._channels) >= self.max_channels:
                raise LimitExceededError(f"the server has {self.max_channels} shared-memory channels, its limit")
            if sum(not channel.connected for channel in self._channels) >= self.max_pending:
                raise LimitExceededError(f"{self.max_pending} shared-memory channels are waiting for their clients, the server's limit")
            channel = _Channel(self, tenant, pid, ShmLayout(capacity))
            self._channels.add(channel)
            channel.start()  # under the lock: drain() never sees a channel it cannot join
        return pb.AttachReply(doorbell=channel.address, capacity=capacity, header_bytes=channel.layout.header)

    def drain(self, timeout_s: float | None = None) -> None:
        """Refuse new channels, end every channel after its current call and wait for them, at most
        ``timeout_s`` in all."""
        with self._lock:
            self._draining = True
            channels = list(self._channels)
        for channel in channels:
            channel.hang_up()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for channel in channels:
            channel.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def end_idle(self, idle_s: float) -> None:
        """Hang up connected channels that have not been called for more than ``idle_s`` seconds
        (unconnected ones end by themselves after ``accept_timeout_s``)."""
        now = time.monotonic()
        with self._lock:
            idle = [channel for channel in self._channels if channel.connected and now - channel.idle_since > idle_s]
        for channel in idle:
            channel.hang_up()

    def channel_count(self) -> int:
        with self._lock:
            return len(self._channels)

    def _forget(self, channel: _Channel) -> None:
        with self._lock:
            self._channels.discard(channel)


class _Channel(threading.Thread):
    """One client thread's channel: waits for its client, then answers each doorbell in shared memory."""

    def __init__(self, host: ShmHost, tenant: TenantState, pid: int, layout: ShmLayout) -> None:
        super().__init__(name=f"symbiosis-shm-{tenant.name}-{pid}", daemon=True)
        self.host = host
        self.tenant = tenant
        self.pid = pid
        self.layout = layout
        self.address = f"symbiosis-{secrets.token_hex(16)}"
        fd, self._memory = create_memory(layout.size)
        self._fd: int | None = fd
        try:
            self._listener = listen(self.address)
        except BaseException:
            os.close(fd)
            self._memory.close()
            raise
        self._buf = memoryview(self._memory)
        self._lock = threading.Lock()  # orders hang_up() against accepting and closing
        self._conn: socket.socket | None = None
        self._ended = False
        self.connected = False
        #: When the client connected or the last call ended (``inf`` during a call).
        self.idle_since = time.monotonic()

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
            hand_over(conn, self._fd)
            os.close(self._fd)  # the client holds its own descriptor now; the mapping keeps the memory
            self._fd = None
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        buf, layout = self._buf, self.layout
        requests = functools.partial(layout.region, buf, layout.request_data)
        while conn.recv(1) == DOORBELL:
            self.idle_since = math.inf
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
            self.idle_since = time.monotonic()

    def hang_up(self) -> None:
        """End the channel: at once while it waits for its client, after the call in progress otherwise."""
        with self._lock:
            self._ended = True
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a pending accept(); fails once it is closed
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RD)  # the next recv() sees end-of-file

    def _close(self) -> None:
        with self._lock:
            self._ended = True
            self._listener.close()
            if self._conn is not None:
                self._conn.close()
        if self._fd is not None:
            os.close(self._fd)
        unmap(self._memory, self._buf)
        self.host._forget(self)
