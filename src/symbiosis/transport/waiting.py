"""Waiting for a channel's next message: poll briefly, then block.

A thread blocked in ``recv`` is woken by the kernel when the other end sends; on a virtual machine
whose idle vCPUs halt (no guest halt-polling), waking a thread on another vCPU costs about 25 µs,
twice per op call — more than the rest of a small call's transfer (measured in
``docs/architecture-service.md``). A ``Receiver`` therefore first polls the socket for up to
``spin_s`` (in C, without the GIL, calling ``sched_yield`` between polls: a hint that lets other
threads runnable on that CPU run) and only then blocks. It polls only while the other end answers
within that time: after a longer wait, the next one blocks at once (a slow or idle peer costs no
CPU), until a wait is short again.

``Receiver`` does this for the messages of a shared-memory channel's ``SOCK_SEQPACKET`` socket;
``StreamWaiter`` for a TCP data channel's byte stream, whose frames the caller then reads as before.

The polling is a C extension built at install time (``_wait.c``). Without it (no compiler at
install, or ``SYMBIOSIS_PURE_PYTHON=1``) both block at once: the same messages, errors and
timeouts, only the wake-ups cost more.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
import weakref

from ..errors import BadRequestError

try:
    from ._wait import readable as _compiled_readable
    from ._wait import receive as _compiled_receive
except ImportError:  # pragma: no cover - the install could not compile the extension
    _compiled_readable = _compiled_receive = None

#: Whether receives poll before blocking (the compiled extension is there and not turned off).
COMPILED = _compiled_receive is not None and os.environ.get("SYMBIOSIS_PURE_PYTHON", "") in ("", "0")
#: Default longest poll before blocking (a small op call is answered well within it).
DEFAULT_SPIN_S = 200e-6
_TRUNCATED = int(socket.MSG_TRUNC)  # a plain int: testing an IntFlag costs an enum construction per message


class _Polling:
    """How long the next wait polls: up to ``spin_s``, and only while the other end answered the last
    wait within that time. ``compiled``: poll (default: when the extension is available)."""

    def __init__(self, spin_s: float, compiled: bool | None) -> None:
        if compiled and _compiled_receive is None:
            raise RuntimeError("the compiled receive (symbiosis.transport._wait) is not built")
        self._compiled = COMPILED if compiled is None else compiled
        self._spin_ns = max(0, int(spin_s * 1e9)) if self._compiled else 0
        self._next_spin_ns = self._spin_ns

    def _waited(self, waited_ns: int) -> None:
        self._next_spin_ns = self._spin_ns if waited_ns <= self._spin_ns else 0


class Receiver(_Polling):
    """Receives the messages of a ``SOCK_SEQPACKET`` socket into one buffer of ``size`` bytes,
    polling up to ``spin_s`` before blocking (see the module docstring; 0: never poll) while the
    socket is in blocking mode (a socket with a Python-level timeout is read as Python reads it).

    The compiled receive reads its own duplicate of the socket's descriptor, closed by ``close`` or
    when the receiver is collected: a thread that closes the socket meanwhile cannot hand a running
    receive a descriptor number the process reused. Whoever ends the connection must therefore
    ``shutdown`` the socket before closing it (the duplicate keeps the connection open).
    """

    def __init__(self, sock: socket.socket, size: int, *, spin_s: float = DEFAULT_SPIN_S, compiled: bool | None = None) -> None:
        super().__init__(spin_s, compiled)
        self._sock = sock
        self.buffer = bytearray(size)
        self._view = memoryview(self.buffer)
        self._fd = os.dup(sock.fileno()) if self._compiled else -1
        self.close = weakref.finalize(self, os.close, self._fd) if self._fd >= 0 else _nothing

    def receive(self) -> memoryview | None:
        """The next message (a view of ``buffer``, valid until the next receive), None at end-of-file.

        Raises ``BadRequestError`` for a message longer than the buffer (discarded whole),
        ``BlockingIOError`` when the socket's receive timeout (``SO_RCVTIMEO``) expires, ``OSError``
        when the connection broke.
        """
        if self._compiled and self._sock.gettimeout() is None:
            if self._sock.fileno() < 0:
                raise OSError("the channel's socket is closed")
            nbytes, truncated, waited_ns = _compiled_receive(self._fd, self.buffer, self._next_spin_ns)
            self._waited(waited_ns)
        else:
            nbytes, _ancillary, flags, _address = self._sock.recvmsg_into([self.buffer])
            truncated = flags & _TRUNCATED
        if truncated:
            raise BadRequestError(f"a message on the channel exceeds {len(self.buffer)} bytes")
        if nbytes == 0:
            return None
        return self._view[:nbytes]


class StreamWaiter(_Polling):
    """Polls a byte-stream socket (plain or TLS) for up to ``spin_s`` until it has something to read:
    call ``wait`` before reading a frame and ``read`` once it is read (which times the wait)."""

    def __init__(self, *, spin_s: float = DEFAULT_SPIN_S, compiled: bool | None = None) -> None:
        super().__init__(spin_s, compiled)
        self._start = 0

    def wait(self, sock: socket.socket) -> None:
        self._start = time.perf_counter_ns()
        if not self._next_spin_ns or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return  # not polling now, or TLS already holds decrypted bytes
        fd = sock.fileno()
        if fd >= 0:
            _compiled_readable(fd, self._next_spin_ns)

    def read(self) -> None:
        self._waited(time.perf_counter_ns() - self._start)


def _nothing() -> None:
    pass
