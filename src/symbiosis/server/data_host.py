"""The server side of TCP data channels (framing: ``transport.frames``): op calls from other hosts.

One listening socket beside the gRPC port (``--data-port``, any free port by default; clients learn
it from ``AttachData``). Each accepted connection becomes a channel with its own thread: TLS when the
service uses TLS (the same certificate), then the client's ``DataHello`` — its tenant's token,
checked exactly as gRPC metadata is — and the server's ``DataWelcome``; then calls follow
``server.channels``, each output computed into the channel's response buffer and sent from there.
A channel takes one of its tenant's sessions while connected. At most ``max_channels`` exist at
once, of which at most ``max_pending`` are still in their handshake (which must finish within
``handshake_timeout_s``). TCP keepalive probes find clients whose host vanished.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..errors import AuthenticationError, BadRequestError, LimitExceededError, SymbiosisError
from ..transport import symbiosis_pb2 as pb
from ..transport.frames import PREFIX, receive_into, receive_prefix, send_frame, tensor_view
from ..transport.keepalive import DEFAULT_KEEPALIVE_S, enable_tcp_keepalive
from ..transport.shm import Area
from ..transport.waiting import DEFAULT_SPIN_S, StreamWaiter
from ..transport.wire import RegionReader, status_code_of
from .channels import MAX_ERROR_CHARS, Channel, ChannelHost
from .handler import RequestHandler
from .tenancy import TenantRegistry, TenantState

log = logging.getLogger(__name__)

#: Default bound on data channels at once.
DEFAULT_MAX_CHANNELS = 64
#: Default bound on data channels still in their handshake.
DEFAULT_MAX_PENDING = 8
#: Default seconds a new connection has for TLS and its hello.
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0


def server_tls_context(certificate_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context for a certificate chain and key given as PEM bytes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="symbiosis-tls-") as scratch:  # ssl loads chains from files only
        cert, key = Path(scratch) / "cert.pem", Path(scratch) / "key.pem"
        cert.write_bytes(certificate_pem)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        context.load_cert_chain(cert, key)
    return context


class DataHost(ChannelHost):
    """Listens for TCP data channels and serves them; ``drain()`` stops listening and ends them
    after their current call."""

    what = "data channels"

    def __init__(
        self,
        handler: RequestHandler,
        registry: TenantRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[bytes, bytes] | None = None,
        max_payload_bytes: int,
        max_channels: int = DEFAULT_MAX_CHANNELS,
        max_pending: int = DEFAULT_MAX_PENDING,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        spin_s: float = DEFAULT_SPIN_S,
    ) -> None:
        super().__init__(handler, max_channels=max_channels, max_pending=max_pending, spin_s=spin_s)
        self.registry = registry
        self.max_payload_bytes = max_payload_bytes
        self.keepalive_s = keepalive_s
        self.handshake_timeout_s = handshake_timeout_s
        self.tls = server_tls_context(*tls) if tls is not None else None
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.create_server((host, port), family=family)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="symbiosis-data-accept", daemon=True)

    def start(self) -> DataHost:
        self._acceptor.start()
        return self

    def reply(self) -> pb.AttachDataReply:
        """What ``AttachData`` tells a client."""
        return pb.AttachDataReply(port=self.port, max_payload_bytes=self.max_payload_bytes)

    def drain(self, timeout_s: float | None = None) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor
        self._listener.close()
        super().drain(timeout_s)
        self._acceptor.join(timeout_s)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # the listener was closed: the server drains
                return
            try:
                self.add(lambda: _DataChannel(self, conn))
            except SymbiosisError as exc:
                _welcome(conn, exc)
                conn.close()


def _welcome(sock: socket.socket, error: BaseException | None = None) -> None:
    """Send a ``DataWelcome``: the channel is open, or why it is not."""
    welcome = pb.DataWelcome()
    if error is not None:
        welcome.error.code = status_code_of(error).name
        welcome.error.message = str(error)[:MAX_ERROR_CHARS]
    with contextlib.suppress(OSError, ssl.SSLError):
        send_frame(sock, welcome.SerializeToString())


class _DataChannel(Channel):
    """One client thread's TCP data channel."""

    def __init__(self, host: DataHost, conn: socket.socket) -> None:
        super().__init__(host, "symbiosis-data")
        self._sock = conn
        self._lock = threading.Lock()  # orders hang_up() against the handshake and closing
        self._ended = False
        self._prefix = bytearray(PREFIX.size)
        self._waiter = StreamWaiter(spin_s=host.spin_s)
        self._requests = Area(torch.empty(64, dtype=torch.uint8))
        self._responses = Area(torch.empty(64, dtype=torch.uint8))

    def run(self) -> None:
        try:
            tenant = self._handshake()
            if tenant is not None:
                with contextlib.ExitStack() as stack:
                    try:
                        stack.enter_context(tenant.session())
                    except LimitExceededError as exc:
                        _welcome(self._sock, exc)
                        return
                    if self._connect(tenant):
                        _welcome(self._sock)
                        self.serve()
        except (OSError, ssl.SSLError, EOFError, BadRequestError) as exc:
            log.debug("data channel ended: %s", exc)
        finally:
            self._close()

    def _handshake(self) -> TenantState | None:
        """TLS (if any) and the hello, within the handshake timeout: the tenant, or None (refused)."""
        host: DataHost = self.host
        sock = self._sock
        sock.settimeout(host.handshake_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        enable_tcp_keepalive(sock, host.keepalive_s)
        if host.tls is not None:
            sock = host.tls.wrap_socket(sock, server_side=True)
            with self._lock:
                self._sock = sock
        lengths = receive_prefix(sock, self._prefix, 0)
        if lengths is None:
            return None
        header = bytearray(lengths[0])
        receive_into(sock, memoryview(header))
        try:
            hello = pb.DataHello.FromString(bytes(header))
            return host.registry.authenticate(hello.token or None)
        except AuthenticationError as exc:
            _welcome(sock, exc)
        except Exception as exc:  # a malformed hello
            _welcome(sock, BadRequestError(f"malformed DataHello: {exc}"))
        return None

    def _connect(self, tenant: TenantState) -> bool:
        """Mark the channel connected unless it was hung up during the handshake."""
        with self._lock:
            if self._ended:
                return False
            self.tenant = tenant
            self.connected = True
            self.idle_since = time.monotonic()
            self._sock.settimeout(None)
            return True

    # ------------------------------------------------------------------------------ the calls
    def receive(self) -> tuple[bytearray, RegionReader, int] | None:
        sock = self._sock
        self._waiter.wait(sock)
        lengths = receive_prefix(sock, self._prefix, self.host.max_payload_bytes)
        self._waiter.read()
        if lengths is None:
            return None
        header_bytes, payload_bytes = lengths
        header = bytearray(header_bytes)
        try:
            receive_into(sock, memoryview(header))
            if self._requests.memory.numel() < payload_bytes:
                self._requests = Area(torch.empty(_rounded(payload_bytes), dtype=torch.uint8))
                self.forget_plans()  # their rows view the old buffer
            self._requests.size = payload_bytes  # a region must lie within this frame's payload
            receive_into(sock, tensor_view(self._requests.memory[:payload_bytes]))
        except EOFError as exc:
            raise ConnectionError(str(exc)) from None
        return header, self._request_region, payload_bytes

    def _request_region(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: bool) -> torch.Tensor:
        if device:
            raise BadRequestError("a device region on a TCP data channel")
        try:
            return self._requests.tensor(offset, shape, dtype)
        except BadRequestError:
            raise BadRequestError(f"the tensor lies outside the frame's {self._requests.size}-byte payload") from None

    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._responses.size < nbytes:
            self._responses = Area(torch.empty(_rounded(nbytes), dtype=torch.uint8))
            self.forget_plans()  # their outputs view the old buffer
        return self._responses.tensor(0, shape, dtype)

    def region(self, y: torch.Tensor) -> tuple[int, bool]:
        return 0, False

    def send(self, result: bytes, y: torch.Tensor | None) -> None:
        send_frame(self._sock, result, y)

    def hang_up(self) -> None:
        with self._lock:
            self._ended = True
            with contextlib.suppress(OSError):
                # the next receive (or the handshake) sees end-of-file; on the raw socket, because
                # SSLSocket.shutdown() drops the TLS state (an answer still being sent would go out in clear)
                socket.socket.shutdown(self._sock, socket.SHUT_RD)

    def _close(self) -> None:
        with self._lock:
            self._ended = True
            with contextlib.suppress(OSError):
                self._sock.close()
        self.forget_plans()
        self.host.forget(self)


def _rounded(nbytes: int) -> int:
    """``nbytes`` rounded up to a power of two, at least 64 (buffers grow rarely)."""
    return 1 << max(nbytes - 1, 63).bit_length()

