"""Layout of a same-host shared-memory channel, shared by the client and the server.

One channel serves one client thread. The server creates the segment (random name, mode 0600) and
a Unix socket; the client maps the segment and connects to the socket once. A call is then:
client writes the request tensor into the request area and an ``OpCall`` (whose tensor is a
``ShmRegion``) into the request header, sends one doorbell byte; the server reads both (the tensor
as a view of shared memory, no copy), runs the op, writes the output tensor into the response area
and an ``OpResult`` into the response header, and rings back. The socket carries only doorbell
bytes; its end-of-file tells either side that the other is gone.

Segment layout (``H`` = header bytes, ``C`` = capacity)::

    [0, H)            request header: u32 length + OpCall
    [H, 2H)           response header: u32 length + OpResult
    [2H, 2H + C)      request tensor bytes
    [2H + C, 2H + 2C) response tensor bytes

Before the first call the request header holds the attach nonce, so that the client can prove it
maps the server's memory (i.e. runs on the same host).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from ..errors import BadRequestError

#: Bytes of each header area.
HEADER_BYTES = 4096
#: Default bytes of each tensor area (requests or responses larger than this travel inline).
DEFAULT_CAPACITY = 8 << 20
#: The largest tensor area a client may ask for.
MAX_CAPACITY = 1 << 30
#: The doorbell byte.
DOORBELL = b"\x01"

_LENGTH = struct.Struct("<I")
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


#: Segments this process created (a server); opening one of them must not untrack it.
_created: set[str] = set()


def create_segment(size: int) -> shared_memory.SharedMemory:
    """A new segment (random name, mode 0600), tracked so that it is unlinked if this process dies."""
    shm = shared_memory.SharedMemory(create=True, size=size)
    _created.add(shm._name)
    return shm


def open_segment(name: str) -> shared_memory.SharedMemory:
    """Map another process's segment without letting this process's resource tracker unlink it at exit."""
    try:
        return shared_memory.SharedMemory(name, track=False)  # Python >= 3.13
    except TypeError:
        shm = shared_memory.SharedMemory(name)
        if shm._name not in _created:  # a server in this same process still owns it
            resource_tracker.unregister(shm._name, "shared_memory")
        return shm


def release_segment(shm: shared_memory.SharedMemory, *, unlink: bool) -> None:
    """Unmap ``shm`` (left to process exit if a view of it is still alive) and unlink it if asked."""
    try:
        shm.close()
    except BufferError:
        pass
    if unlink:
        _created.discard(shm._name)
        try:
            shm.unlink()
        except FileNotFoundError:
            pass
