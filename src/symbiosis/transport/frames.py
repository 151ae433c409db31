"""Frames of a TCP data channel: how op calls travel to an executor on another host.

A TCP connection is a byte stream, so each message is framed: a 12-byte prefix (little-endian u32
header length, u64 payload length), the header — a protobuf message (``DataHello``,
``DataWelcome``, ``OpCall``, ``OpResult``) — and the payload: the raw bytes of the message's
tensor, which its ``ShmRegion`` refers to (offset 0 of the payload). Tensors never pass through
protobuf, so neither end copies them into or out of a message: the sender gathers header and
tensor in one ``sendmsg`` (plain TCP), the receiver reads the payload straight into the tensor it
decodes.

Why not gRPC for this: its per-message cost in Python (about 300–440 µs per round trip on the
2-core VM, ``bench/transport.py``) is what the service must avoid; a bare TCP ping-pong between two
Python processes takes 16 µs there, ZeroMQ's TCP transport 90 µs (its I/O thread adds two hand-offs
per message; ``bench/wakeup.py``). TLS wraps the socket when the service uses TLS (``ssl``), and
the first frame authenticates the connection with the tenant's token.

Reading is defensive: lengths are bounded before anything is allocated (``FrameError`` otherwise),
and a connection that ends mid-frame is an ``EOFError``.
"""

from __future__ import annotations

import socket
import ssl
import struct

import torch

from ..errors import BadRequestError

PREFIX = struct.Struct("<IQ")
#: Largest header of a frame (an op call or result with its error message is a few hundred bytes).
MAX_HEADER_BYTES = 64 << 10


class FrameError(BadRequestError):
    """A frame's prefix announces more than the reader accepts; the stream cannot be resynchronised."""


def send_frame(sock: socket.socket, header: bytes, payload: torch.Tensor | None = None) -> None:
    """Send one frame: ``header`` (a serialized message) and the raw bytes of ``payload`` (contiguous, on the CPU)."""
    data = memoryview(b"") if payload is None else _bytes(payload)
    prefix = PREFIX.pack(len(header), data.nbytes)
    if data.nbytes < 4096:  # one small copy is cheaper than a gather
        sock.sendall(b"".join((prefix, header, data)))
    elif isinstance(sock, ssl.SSLSocket):  # TLS sockets have no sendmsg
        sock.sendall(prefix + header)
        sock.sendall(data)
    else:
        _send_all(sock, [prefix, header, data])


def receive_prefix(sock: socket.socket, prefix: bytearray, max_payload: int) -> tuple[int, int] | None:
    """The next frame's (header length, payload length), or None when the stream ended cleanly before it.

    Raises ``FrameError`` for lengths beyond ``MAX_HEADER_BYTES`` or ``max_payload``.
    """
    if not receive_into(sock, memoryview(prefix), at_start=True):
        return None
    header, payload = PREFIX.unpack(prefix)
    if header > MAX_HEADER_BYTES:
        raise FrameError(f"a frame header of {header} bytes exceeds {MAX_HEADER_BYTES}")
    if payload > max_payload:
        raise FrameError(f"a tensor of {payload} bytes exceeds the limit of {max_payload} bytes per message")
    return header, payload


def receive_into(sock: socket.socket, view: memoryview, *, at_start: bool = False) -> bool:
    """Fill ``view`` from ``sock``. False if the stream ended before its first byte and ``at_start``;
    ``EOFError`` if it ended anywhere else."""
    got, total = 0, view.nbytes
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            if at_start and got == 0:
                return False
            raise EOFError(f"the connection ended {got} bytes into a {total}-byte read")
        got += n
    return True


def tensor_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of contiguous CPU tensor ``t`` (to receive into)."""
    return _bytes(t)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _send_all(sock: socket.socket, parts: list) -> None:
    """``sendmsg`` until every byte of ``parts`` is sent (a gather write: no joined copy)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
