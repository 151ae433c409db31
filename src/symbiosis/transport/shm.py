"""A same-host shared-memory channel: its layout and how both ends set it up (Linux only).

One channel serves one client thread. The server creates the channel's memory with
``os.memfd_create`` — an anonymous file with no name in ``/dev/shm`` or anywhere else, so no other
process can open it by name — and listens on a Linux abstract-namespace Unix socket with a random
name (no file-system entry, nothing left behind if the server is killed). The client connects once;
the server checks the peer's pid (``SO_PEERCRED``) against the pid the client declared over the
authenticated gRPC call, then passes the memory's file descriptor over the connection
(``SCM_RIGHTS``). Receiving that descriptor is itself the proof that the client runs on the same
host (and in the same network namespace); clients of any user can attach, since neither end touches
the file system. A client on another host cannot connect and uses gRPC.

A call is then: the client writes the request tensor into the request area and an ``OpCall``
(whose tensor is a ``ShmRegion``) into the request header, sends one doorbell byte; the server reads
both (float rows as a view of shared memory, no copy), runs the op, writes the output tensor into
the response area and an ``OpResult`` into the response header, and rings back. After the one
descriptor pass the socket carries only doorbell bytes; its end-of-file tells either side that the
other is gone.

Memory layout (``H`` = header bytes, ``C`` = capacity)::

    [0, H)            request header: u32 length + OpCall
    [H, 2H)           response header: u32 length + OpResult
    [2H, 2H + C)      request tensor bytes
    [2H + C, 2H + 2C) response tensor bytes
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import sys
from dataclasses import dataclass
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from ..errors import BadRequestError, LimitExceededError

#: Whether this platform has what channels need: memfd_create, SCM_RIGHTS and abstract Unix sockets.
SUPPORTED = sys.platform == "linux" and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
#: Bytes of each header area.
HEADER_BYTES = 4096
#: Default bytes of each tensor area (requests or responses larger than this travel inline).
DEFAULT_CAPACITY = 8 << 20
#: The largest tensor area a client may ask for (the benchmarks use 128 MiB).
MAX_CAPACITY = 256 << 20
#: The doorbell byte; it also accompanies the memory's descriptor when the server accepts a client.
DOORBELL = b"\x01"
#: Longest refusal message the server sends instead of the descriptor.
MAX_REFUSAL_BYTES = 1024

_LENGTH = struct.Struct("<I")
_PEERCRED = struct.Struct("3i")
M = TypeVar("M", bound=Message)

@dataclass(frozen=True)
class ShmLayout:
    """Offsets of a channel's areas for a given ``capacity``."""

    capacity: int
    header: int = HEADER_BYTES

    @property
    def request_header(self) -> int:
        return 0

    @property
    def response_header(self) -> int:
        return self.header

    @property
    def request_data(self) -> int:
        return 2 * self.header

    @property
    def response_data(self) -> int:
        return 2 * self.header + self.capacity

    @property
    def size(self) -> int:
        return 2 * self.header + 2 * self.capacity

    def region(self, buf: memoryview, start: int, offset: int, nbytes: int) -> memoryview:
        """Bytes ``[offset, offset + nbytes)`` of ``buf``, which must lie inside the area at ``start``."""
        if not (start <= offset and offset + nbytes <= start + self.capacity):
            raise BadRequestError(f"region [{offset}, {offset + nbytes}) lies outside the channel's area")
        return buf[offset : offset + nbytes]


def write_message(buf: memoryview, offset: int, msg: Message, limit: int = HEADER_BYTES) -> None:
    """Write ``msg`` with its length prefix at ``offset``; ``ValueError`` if it needs more than ``limit`` bytes."""
    data = msg.SerializeToString()
    if _LENGTH.size + len(data) > limit:
        raise ValueError(f"a {type(msg).__name__} of {len(data)} bytes does not fit a {limit}-byte header")
    _LENGTH.pack_into(buf, offset, len(data))
    buf[offset + _LENGTH.size : offset + _LENGTH.size + len(data)] = data


def read_message(buf: memoryview, offset: int, cls: type[M], limit: int = HEADER_BYTES) -> M:
    """The ``cls`` message written at ``offset``; ``BadRequestError`` if it is malformed."""
    (length,) = _LENGTH.unpack_from(buf, offset)
    if _LENGTH.size + length > limit:
        raise BadRequestError(f"header claims {length} bytes, more than the {limit}-byte header area")
    msg = cls()
    try:
        msg.ParseFromString(bytes(buf[offset + _LENGTH.size : offset + _LENGTH.size + length]))
    except DecodeError as exc:
        raise BadRequestError(f"malformed {cls.__name__}: {exc}") from None
    return msg


def write_tensor(buf: memoryview, offset: int, t: torch.Tensor) -> int:
    """Copy ``t``'s raw bytes to ``offset``; return the number of bytes written."""
    nbytes = t.numel() * t.element_size()
    if nbytes:
        dst = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
        dst.copy_(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))
    return nbytes


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
    """A Unix socket listening on the abstract address ``name`` (no file-system entry)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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


def hand_over(conn: socket.socket, fd: int) -> None:
    """Pass the channel's memory to the connected client (one doorbell byte carrying ``fd``)."""
    socket.send_fds(conn, [DOORBELL], [fd])


def refuse(conn: socket.socket, reason: str) -> None:
    """Tell the connected client why it gets no channel (instead of the descriptor)."""
    with contextlib.suppress(OSError):
        conn.sendall(reason.encode()[:MAX_REFUSAL_BYTES])


def open_channel(name: str, size: int) -> tuple[socket.socket, mmap.mmap]:
    """Connect to the channel listening on ``name`` and map the ``size`` bytes of memory it hands over.

    Raises ``OSError`` when the channel cannot be reached or is not handed over (another host or
    network namespace, a pid the server does not see as ours), and ``LimitExceededError`` with the
    server's reason when it refuses the channel (e.g. the tenant's session limit).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
        message, fds, _flags, _address = socket.recv_fds(sock, MAX_REFUSAL_BYTES, 1)
        if not fds:
            if message:
                raise LimitExceededError(message.decode(errors="replace"))
            raise ConnectionError("the server closed the channel without handing it over")
        try:
            if os.fstat(fds[0]).st_size < size:
                raise ConnectionError(f"the channel's memory is smaller than {size} bytes")
            return sock, mmap.mmap(fds[0], size)
        finally:
            os.close(fds[0])
    except BaseException:
        sock.close()
        raise


def unmap(memory: mmap.mmap, view: memoryview) -> None:
    """Release ``view`` (of ``memory``) and unmap ``memory``; while tensors still view it, it stays
    mapped until the last of them is gone."""
    with contextlib.suppress(BufferError):
        view.release()
        memory.close()
