"""Talking to a server below ``RemoteTransport``, as a hostile or foreign client would: raw gRPC
calls, raw shared-memory channels and raw TCP data channels."""

from __future__ import annotations

import os
import socket

import grpc
import torch

from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport import symbiosis_pb2_grpc as pb_grpc
from symbiosis.transport.frames import PREFIX, receive_into, receive_prefix, send_frame
from symbiosis.transport.shm import MAX_MESSAGE_BYTES, ShmLayout, map_tensor, open_channel, unmap
from symbiosis.transport.waiting import Receiver
from symbiosis.transport.wire import describe_region


def stub(port: int) -> tuple[grpc.Channel, pb_grpc.ExecutorStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.ExecutorStub(channel)


def attach(port: int, *, pid: int | None = None, capacity: int = 1 << 16, token: str | None = None) -> pb.AttachReply:
    """``AttachShm`` for process ``pid`` (default: this one), without connecting to the channel."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channel, executor = stub(port)
    with channel:
        return executor.AttachShm(pb.AttachRequest(pid=pid or os.getpid(), capacity=capacity), metadata=metadata, timeout=30)


def call_message(op: str, x: torch.Tensor, offset: int, call_id: int = 1) -> pb.OpCall:
    """A well-formed ``OpCall`` whose tensor lies at ``offset`` of the channel's memory (or payload)."""
    msg = pb.OpCall(call_id=call_id, op=op)
    describe_region(x, offset, msg.x)
    return msg


class RawChannel:
    """A connected shared-memory channel whose memory and messages the test writes directly."""

    def __init__(self, reply: pb.AttachReply) -> None:
        self.layout = ShmLayout(reply.capacity)
        self.sock, self._memory, self.grant = open_channel(reply.doorbell, self.layout.size)
        self.memory = map_tensor(self._memory)

    def send(self, message: bytes) -> None:
        """One raw message on the channel's socket (what a client sends as an ``OpCall``)."""
        self.sock.send(message)

    def call(self, op: str, x: torch.Tensor, call_id: int = 1) -> None:
        """A well-formed call: ``x`` in the request area, its ``OpCall`` on the socket."""
        self.write_region(self.layout.request_data, x)
        self.send(call_message(op, x, self.layout.request_data, call_id).SerializeToString())

    def write_region(self, offset: int, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        self.memory[offset : offset + nbytes].view(t.dtype).view(t.shape).copy_(t)

    def answer(self) -> pb.OpResult:
        """Wait for the server's answer."""
        message = Receiver(self.sock, MAX_MESSAGE_BYTES, compiled=False).receive()
        assert message is not None, "the server hung up"
        return pb.OpResult.FromString(message)

    def output(self, result: pb.OpResult) -> torch.Tensor:
        region = result.y.region
        data = self.memory[region.offset : region.offset + region.nbytes].clone()
        return data.view(getattr(torch, result.y.dtype)).view(tuple(result.y.shape))

    def close(self) -> None:
        self.sock.close()
        self.memory = None
        unmap(self._memory)


class RawDataChannel:
    """A TCP data channel driven frame by frame (the hello is sent by ``open``)."""

    def __init__(self, port: int) -> None:
        channel, executor = stub(port)
        with channel:
            self.reply = executor.AttachData(pb.AttachDataRequest(), timeout=30)
        self.sock = socket.create_connection(("127.0.0.1", self.reply.port), timeout=60)

    def open(self, token: str = "") -> pb.DataWelcome:
        send_frame(self.sock, pb.DataHello(token=token).SerializeToString())
        return pb.DataWelcome.FromString(self.header())

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, op: str, x: torch.Tensor, call_id: int = 1) -> None:
        send_frame(self.sock, call_message(op, x, 0, call_id).SerializeToString(), x.contiguous())

    def header(self) -> bytes:
        """The header of the next frame (its payload is left unread)."""
        lengths = receive_prefix(self.sock, bytearray(PREFIX.size), 1 << 62)
        assert lengths is not None, "the server hung up"
        self._payload = lengths[1]
        data = bytearray(lengths[0])
        receive_into(self.sock, memoryview(data))
        return bytes(data)

    def answer(self) -> tuple[pb.OpResult, bytes]:
        result = pb.OpResult.FromString(self.header())
        payload = bytearray(self._payload)
        receive_into(self.sock, memoryview(payload))
        return result, bytes(payload)

    def ended(self, timeout_s: float = 30.0) -> bool:
        """Whether the server closes the connection within ``timeout_s`` (reading what it still sends)."""
        self.sock.settimeout(timeout_s)
        try:
            while self.sock.recv(1 << 16):
                pass
        except TimeoutError:
            return False
        except OSError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()
