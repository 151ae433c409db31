"""The protocol of a channel's CUDA buffers (``transport.cuda_ipc``), checked without a GPU.

A GPU client of a GPU executor exchanges rows through buffers in the executor's GPU memory, ordered
by interprocess CUDA events. Here those buffers are a stand-in in host memory with the same
interface — the server runs in this process, so both ends see the same tensors, and the events
count what they would order — so that everything around them runs for real: the grant that comes
with the channel, device regions in the call and result messages, the executor computing straight
into the response buffer, and the waits and records at the right moments. ``tests/symbiosis/
test_gpu.py`` runs the real buffers (CUDA IPC between processes) where a GPU is lent.
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from symbiosis import BadRequestError, BaseExecutor
from symbiosis.protocol import Direction, OpRequest
from symbiosis.server import ExecutorServer
from symbiosis.transport import cuda_ipc
from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport.lanes import ShmLane

from .raw import stub

OP = "model.layers.0.mlp.down_proj"


class HostStandIn(cuda_ipc.CudaBuffers):
    """CUDA buffers' interface on host memory; events count their waits and records."""

    granted: dict[str, HostStandIn] = {}

    @classmethod
    def allocate(cls, device: torch.device, capacity: int) -> HostStandIn:
        buffers = cls(device, torch.zeros(capacity, dtype=torch.uint8), torch.zeros(capacity, dtype=torch.uint8), None, None)
        buffers.counts = {"send": 0, "await_request": 0, "mark_response": 0, "receive": 0}
        return buffers

    def grant(self) -> pb.CudaBuffers:
        key = uuid.uuid4().hex
        HostStandIn.granted[key] = self
        return pb.CudaBuffers(device_uuid=key)

    @classmethod
    def open(cls, grant: pb.CudaBuffers) -> HostStandIn | None:
        return cls.granted.get(grant.device_uuid)

    def holds(self, x: torch.Tensor) -> bool:
        return True

    def send(self, x: torch.Tensor) -> None:
        self.counts["send"] += 1
        self.request[: x.numel() * x.element_size()].view(x.dtype).view(x.shape).copy_(x)

    def receive(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        assert self.counts["mark_response"] == self.counts["receive"] + 1, "the output was read before the executor marked it"
        self.counts["receive"] += 1
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        return self.response[offset : offset + nbytes].view(dtype).view(shape).clone().to(device)

    def await_request(self) -> None:
        assert self.counts["send"] == self.counts["await_request"] + 1, "the executor waited for rows that were not sent"
        self.counts["await_request"] += 1

    def mark_response(self) -> None:
        self.counts["mark_response"] += 1


@pytest.fixture
def server(model_dir, monkeypatch):
    started = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama"))).start()
    started.shm.device_buffers = lambda capacity: HostStandIn.allocate(torch.device("cpu"), capacity)
    monkeypatch.setattr(cuda_ipc.CudaBuffers, "open", HostStandIn.open)
    yield started
    started.stop(1.0)


def device_lane(server: ExecutorServer, *, cuda: bool = True) -> ShmLane:
    channel, executor = stub(server.port)
    with channel:
        reply = executor.AttachShm(pb.AttachRequest(pid=os.getpid(), capacity=1 << 16, cuda=cuda), timeout=30)
    return ShmLane(reply, cuda=cuda, patience_s=30.0, alive=lambda: True)


def test_calls_travel_through_the_device_buffers(server):
    lane = device_lane(server)
    try:
        assert isinstance(lane.cuda, HostStandIn)
        executor = server.executor
        requests = [
            OpRequest(OP, Direction.FORWARD, torch.randn(3, 128)),
            OpRequest(OP, Direction.BACKWARD, torch.randn(3, 64)),
            OpRequest(OP, Direction.FORWARD, torch.randn(2, 128), out_dtype=torch.bfloat16),
            OpRequest("model.embed_tokens", Direction.FORWARD, torch.tensor([5, 1, 7])),
        ]
        for call_id, request in enumerate(requests, 1):
            assert torch.equal(lane.call(request, call_id), executor.run(request))
        # every call's rows were sent, awaited by the executor, and its output marked before it was read
        assert lane.cuda.counts == dict.fromkeys(["send", "await_request", "mark_response", "receive"], len(requests))
        with pytest.raises(BadRequestError, match="expected rows of width 128"):
            lane.call(OpRequest(OP, Direction.FORWARD, torch.randn(3, 64)), 9)
        assert torch.equal(lane.call(requests[0], 10), executor.run(requests[0]))  # the channel goes on
    finally:
        lane.close()


def test_a_client_that_asks_no_device_buffers_gets_none(server):
    lane = device_lane(server, cuda=False)
    try:
        assert lane.cuda is None
        request = OpRequest(OP, Direction.FORWARD, torch.randn(3, 128))
        assert torch.equal(lane.call(request, 1), server.executor.run(request))
    finally:
        lane.close()


def test_a_cpu_executor_offers_no_device_buffers(model_dir):
    server = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama"))).start()
    try:
        assert server.shm.device_buffers is None
        lane = device_lane(server)
        assert lane.cuda is None  # a GPU client of a CPU executor keeps to (pinned) host memory
        request = OpRequest(OP, Direction.FORWARD, torch.randn(3, 128))
        assert torch.equal(lane.call(request, 1), server.executor.run(request))
        lane.close()
    finally:
        server.stop(1.0)
