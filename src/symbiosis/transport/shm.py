"""A same-host shared-memory channel: its layout and how both ends set it up (Linux only).

One channel serves one client thread. The server creates the channel's memory with
``os.memfd_create`` — an anonymous file with no name in ``/dev/shm`` or anywhere else, so no other
process can open it by name — and listens on a Linux abstract-namespace ``SOCK_SEQPACKET`` Unix
socket with a random name (no file-system entry, nothing left behind if the server is killed). The
client connects once; the server checks the peer's pid (``SO_PEERCRED``) against the pid the client
declared over the authenticated gRPC call, then passes the memory's file descriptor over the
connection (``SCM_RIGHTS``) with a ``ChannelGrant`` (the channel's CUDA buffers, when it has any).
Receiving that descriptor is itself the proof that the client runs on the same host (and in the
same network namespace); clients of any user can attach, since neither end touches the file
system. A client on another host cannot connect and uses a TCP data channel or gRPC.

A call is then one message each way: the client writes the request tensor into the request area
and sends its ``OpCall`` (whose tensor is a ``ShmRegion``) as one socket message; the server
decodes it (float rows as a view of shared memory, no copy), computes the output straight into the
response area and sends the ``OpResult`` back. ``SOCK_SEQPACKET`` keeps message boundaries, so
there is no framing to write or parse, and the message that carries the call is also the wake-up:
measured on the 2-core VM, a 96-byte ping-pong between two Python processes takes 9.6 µs (p50)
over it against 10.6 µs for a 1-byte doorbell on a stream socket, 6.4 µs for an eventfd pair
(which cannot tell that the other side died), and 43 µs over ZeroMQ's IPC transport
(``bench/wakeup.py``). End-of-file on the socket tells either side that the other is gone. Both
ends poll the socket briefly before they sleep (``transport.waiting``).

Memory layout (``C`` = capacity)::

    [0, C)     request tensor bytes
    [C, 2C)    response tensor bytes
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import socket
import struct
import sys
from dataclasses import dataclass

import torch

from ..errors import BadRequestError, LimitExceededError

#: Whether this platform has what channels need: memfd_create, SCM_RIGHTS and abstract Unix sockets.
SUPPORTED = sys.platform == "linux" and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
#: Default bytes of each tensor area (requests or responses larger than this take another lane).
DEFAULT_CAPACITY = 8 << 20
#: The largest tensor area a client may ask for (the benchmarks use 128 MiB).
MAX_CAPACITY = 256 << 20
#: Largest message on a channel's socket (an OpCall / OpResult, a grant or a refusal).
MAX_MESSAGE_BYTES = 64 << 10

#: The byte before a serialized ``ChannelGrant`` (a message needs one byte even if the grant is empty).
_GRANT = b"\x01"
_PEERCRED = struct.Struct("3i")
_TIMEVAL = struct.Struct("ll")


@dataclass(frozen=True)
class ShmLayout:
    """Offsets of a channel's areas for a given ``capacity`` (a multiple of 64 bytes, so that every
    dtype's rows are aligned)."""

    capacity: int

    @property
    def request_data(self) -> int:
        return 0

    @property
    def response_data(self) -> int:
        return self.capacity

    @property
    def size(self) -> int:
        return 2 * self.capacity


class Area:
    """Bytes ``[start, start + size)`` of ``memory`` (a 1-D uint8 tensor whose length is a multiple
    of 8), from which tensors of any dtype are cut in one operation (``as_strided`` on a view of the
    whole memory in that dtype). A channel cuts the same few tensors call after call (one op's rows,
    one output shape), so the views handed out are kept (at most ``MAX_VIEWS``) and a repeated
    request returns the same tensor object: callers must not resize or re-stride it."""

    #: Views kept per area (beyond this many distinct regions the cache starts afresh).
    MAX_VIEWS = 256

    def __init__(self, memory: torch.Tensor, start: int = 0, size: int | None = None) -> None:
        self.memory = memory
        self.start = start
        self._views: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self.size = memory.numel() - start if size is None else size
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    @property
    def size(self) -> int:
        """Bytes of the area (tensors must lie inside it); shrinking it forgets the views kept."""
        return self._size

    @size.setter
    def size(self, size: int) -> None:
        if self._views and size < self._size:
            self._views.clear()
        self._size = size

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The ``shape`` tensor of ``dtype`` whose bytes start at ``offset`` of the memory; it must lie
        inside the area and ``offset`` be a multiple of the dtype's size (``BadRequestError``)."""
        key = (offset, shape, dtype)
        view = self._views.get(key)
        if view is not None:
            return view
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        if not (self.start <= offset and offset + nbytes <= self.start + self.size) or offset % itemsize:
            raise BadRequestError(f"region [{offset}, {offset + nbytes}) lies outside the channel's area")
        typed = self._typed.get(dtype)
        if typed is None:
            typed = self._typed[dtype] = self.memory.view(dtype)
        if len(self._views) >= self.MAX_VIEWS:
            self._views.clear()
        view = self._views[key] = typed.as_strided(shape, contiguous_strides(shape), offset // itemsize)
        return view


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a C-contiguous tensor of ``shape``."""
    if len(shape) == 2:
        return (shape[1], 1)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def aligned_capacity(capacity: int) -> int:
    """``capacity`` rounded up to a multiple of 64 bytes."""
    return -(-capacity // 64) * 64


def map_tensor(memory: mmap.mmap) -> torch.Tensor:
    """The whole mapping as a uint8 tensor (writable; it keeps the mapping's buffer exported)."""
    return torch.frombuffer(memory, dtype=torch.uint8)


def set_receive_timeout(sock: socket.socket, seconds: float | None) -> None:
    """Make a blocking ``recv`` on ``sock`` fail with ``BlockingIOError`` after ``seconds`` (None:
    never), in the kernel (``SO_RCVTIMEO``): no extra system call per receive, unlike a Python timeout."""
    whole = int(seconds or 0)
    micros = int(((seconds or 0) - whole) * 1e6) if seconds else 0
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micros))


# ------------------------------------------------------------------------------- channel setup
def create_memory(size: int) -> tuple[int, mmap.mmap]:
    """A new anonymous shared file of ``size`` bytes (``memfd_create``: it has no name) and a mapping of it."""
    fd = os.memfd_create("symbiosis-channel", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def listen(name: str) -> socket.socket:
    """A ``SOCK_SEQPACKET`` Unix socket listening on the abstract address ``name`` (no file-system entry)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.bind("\0" + name)
        sock.listen(8)  # room for strangers' connections, which are refused, beside the rightful one
    except BaseException:
        sock.close()
        raise
    return sock


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket connection (``SO_PEERCRED``)."""
    pid, _uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid


def hand_over(conn: socket.socket, fd: int, grant: bytes) -> None:
    """Pass the channel's memory to the connected client, with its serialized ``ChannelGrant``."""
    socket.send_fds(conn, [_GRANT + grant], [fd])


def refuse(conn: socket.socket, reason: str) -> None:
    """Tell the connected client why it gets no channel (instead of the descriptor)."""
    with contextlib.suppress(OSError):
        conn.sendall(reason.encode()[:1024])


def open_channel(name: str, size: int) -> tuple[socket.socket, mmap.mmap, bytes]:
    """Connect to the channel listening on ``name``; map the ``size`` bytes of memory it hands over and
    return the socket, the mapping and the serialized ``ChannelGrant`` that came with it.

    Raises ``OSError`` when the channel cannot be reached or is not handed over (another host or
    network namespace, a pid the server does not see as ours), and ``LimitExceededError`` with the
    server's reason when it refuses the channel (e.g. the tenant's session limit).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect("\0" + name)
        message, fds, _flags, _address = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 1)
        if not fds:
            if message:
                raise LimitExceededError(message.decode(errors="replace"))
            raise ConnectionError("the server closed the channel without handing it over")
        try:
            if os.fstat(fds[0]).st_size < size:
                raise ConnectionError(f"the channel's memory is smaller than {size} bytes")
            if not message.startswith(_GRANT):
                raise ConnectionError("the server handed the channel over without its grant")
            return sock, mmap.mmap(fds[0], size), message[len(_GRANT) :]
        finally:
            os.close(fds[0])
    except BaseException:
        sock.close()
        raise


def unmap(memory: mmap.mmap) -> None:
    """Unmap ``memory``; while tensors still view it, it stays mapped until the last of them is gone."""
    with contextlib.suppress(BufferError):
        memory.close()
