"""Talking to a server below ``RemoteTransport``, as a hostile or foreign client would: raw gRPC
calls and raw shared-memory channels."""

from __future__ import annotations

import os

import grpc
import torch

from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport import symbiosis_pb2_grpc as pb_grpc
from symbiosis.transport.shm import DOORBELL, ShmLayout, open_channel, read_message, unmap, write_message, write_tensor
from symbiosis.transport.wire import describe_region


def attach(port: int, *, pid: int | None = None, capacity: int = 1 << 16, token: str | None = None) -> pb.AttachReply:
    """``AttachShm`` for process ``pid`` (default: this one), without connecting to the channel."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.ExecutorStub(channel).AttachShm(pb.AttachRequest(pid=pid or os.getpid(), capacity=capacity), metadata=metadata, timeout=30)


class RawChannel:
    """A connected channel whose memory the test writes directly (headers, tensors, garbage)."""

    def __init__(self, reply: pb.AttachReply) -> None:
        self.layout = ShmLayout(reply.capacity, reply.header_bytes)
        self.sock, self._memory = open_channel(reply.doorbell, self.layout.size)
        self.buf = memoryview(self._memory)

    def write_header(self, data: bytes) -> None:
        """Raw bytes into the request header (a length prefix and whatever follows)."""
        self.buf[: len(data)] = data

    def write_call(self, op: str, x: torch.Tensor, call_id: int = 1) -> None:
        """A well-formed call: ``x`` in the request area, an ``OpCall`` referring to it in the header."""
        write_tensor(self.buf, self.layout.request_data, x)
        msg = pb.OpCall(call_id=call_id, op=op)
        describe_region(x, self.layout.request_data, msg.x)
        write_message(self.buf, self.layout.request_header, msg, self.layout.header)

    def write_region(self, offset: int, t: torch.Tensor) -> None:
        write_tensor(self.buf, offset, t)

    def ring(self) -> None:
        self.sock.sendall(DOORBELL)

    def answer(self) -> pb.OpResult:
        """Wait for the server's doorbell and read its ``OpResult``."""
        assert self.sock.recv(1) == DOORBELL, "the server hung up"
        return read_message(self.buf, self.layout.response_header, pb.OpResult, self.layout.header)

    def output(self, result: pb.OpResult) -> torch.Tensor:
        region = result.y.region
        data = bytes(self.buf[region.offset : region.offset + region.nbytes])
        return torch.frombuffer(bytearray(data), dtype=getattr(torch, result.y.dtype)).view(tuple(result.y.shape))

    def close(self) -> None:
        self.sock.close()
        unmap(self._memory, self.buf)
