"""Hostile or unlucky clients never hurt the server or other clients; drain, health and metrics."""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time

import grpc
import pytest
import requests
import torch
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from symbiosis import BadRequestError, BaseExecutor, load_model
from symbiosis.errors import LimitExceededError
from symbiosis.protocol import Direction, OpRequest
from symbiosis.server import ExecutorServer
from symbiosis.transport import RemoteTransport
from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport.shm import DOORBELL, open_segment, release_segment

from .servers import health_status
from .workers import stuck_client

OP = "model.layers.0.self_attn.o_proj"
SESSION = "/symbiosis.v1.Executor/Session"


@pytest.fixture
def server(model_dir):
    started = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), metrics_port=0, max_message_bytes=64 << 10).start()
    yield started
    started.stop(1.0)


def healthy(server: ExecutorServer) -> None:
    """The server still serves everyone: health says so and a well-behaved client gets right answers."""
    assert health_status(server.port) == health_pb2.HealthCheckResponse.SERVING
    x = torch.randn(2, 64)
    weight = server.executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    for shared_memory in (False, True):
        transport = RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=shared_memory)
        y = transport.run(OpRequest(OP, Direction.FORWARD, x))
        transport.close()
        assert torch.allclose(y, x @ weight.t(), atol=1e-5)


def test_bad_requests_get_errors(server):
    transport = RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=False)
    cases = [
        (OpRequest("no.such.op", Direction.FORWARD, torch.randn(2, 64)), "unknown op"),
        (OpRequest(OP, Direction.FORWARD, torch.randn(2, 65)), "expected rows of width 64"),
        (OpRequest(OP, Direction.FORWARD, torch.randn(2, 64, 1)), "expected rows of width 64"),
        (OpRequest(OP, Direction.FORWARD, torch.ones(2, 64, dtype=torch.int32)), "dtype"),
        (OpRequest(OP, Direction.FORWARD, torch.full((2, 64), float("nan"))), "NaN"),
    ]
    for request, message in cases:
        with pytest.raises(BadRequestError, match=message):
            transport.run(request)
    with pytest.raises(LimitExceededError):  # 128 KiB > the server's 64 KiB message limit
        transport.run(OpRequest(OP, Direction.FORWARD, torch.randn(512, 64)))
    healthy(server)


def test_garbage_on_the_stream(server):
    """Random, truncated and oversized raw messages: the stream fails, the server does not."""
    good = pb.OpCall(call_id=1, op=OP, x=pb.Tensor(dtype="float32", shape=[1, 64], data=bytes(256))).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        session = channel.stream_stream(SESSION, request_serializer=lambda b: b, response_deserializer=pb.OpResult.FromString)
        for payload, code in [
            (b"\xff" * 100, grpc.StatusCode.INTERNAL),  # not protobuf: "Exception deserializing request!"
            (good[: len(good) // 2], grpc.StatusCode.INTERNAL),  # truncated
            (b"\x0a" + b"\xff" * 10, grpc.StatusCode.INTERNAL),
            (b"x" * (100 << 10), grpc.StatusCode.RESOURCE_EXHAUSTED),  # over the server's message limit
        ]:
            with pytest.raises(grpc.RpcError) as error:
                list(session(iter([payload])))
            assert error.value.code() == code
        short = pb.OpCall(call_id=2, op=OP, x=pb.Tensor(dtype="float32", shape=[2, 64], data=bytes(256)))
        answers = list(session(iter([short.SerializeToString()])))  # decodes, but the tensor is short
        assert answers[0].call_id == 2 and answers[0].error.code == "INVALID_ARGUMENT"
    healthy(server)


def test_garbage_in_shared_memory(server):
    """A client that writes nonsense into its channel gets an error back; nobody else notices."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        attach = channel.unary_unary("/symbiosis.v1.Executor/AttachShm", request_serializer=pb.AttachRequest.SerializeToString, response_deserializer=pb.AttachReply.FromString)
        reply = attach(pb.AttachRequest(pid=__import__("os").getpid(), capacity=1 << 16))
    shm = open_segment(reply.segment)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(reply.doorbell)
    try:
        for header in (b"\xff\xff\xff\xff", b"\x05\x00\x00\x00\xff\xff\xff\xff\xff", b"\x00\x00\x00\x00"):
            shm.buf[: len(header)] = header
            sock.sendall(DOORBELL)
            assert sock.recv(1) == DOORBELL
            result = pb.OpResult.FromString(bytes(shm.buf[reply.header_bytes + 4 : reply.header_bytes + 4 + int.from_bytes(shm.buf[reply.header_bytes : reply.header_bytes + 4], "little")]))
            assert result.error.code == "INVALID_ARGUMENT"
        region = pb.OpCall(op=OP, x=pb.Tensor(dtype="float32", shape=[1 << 20, 64], region=pb.ShmRegion(offset=0, nbytes=(1 << 20) * 256)))
        data = region.SerializeToString()
        shm.buf[: 4 + len(data)] = len(data).to_bytes(4, "little") + data
        sock.sendall(DOORBELL)
        assert sock.recv(1) == DOORBELL  # a region outside the channel is refused, not read
    finally:
        sock.close()
        release_segment(shm, unlink=False)
    healthy(server)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["tcp", "shm"])
def test_client_vanishing_mid_request(model_dir, shared_memory):
    slow = BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=1.0)
    server = ExecutorServer(slow).start()
    try:
        proc = multiprocessing.get_context("spawn").Process(target=stuck_client, args=(server.url, shared_memory))
        proc.start()
        deadline = time.monotonic() + 120
        while slow.queue_depth() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.queue_depth() > 0, "the client never sent its request"
        proc.kill()
        proc.join()
        healthy(server)
        if shared_memory:
            deadline = time.monotonic() + 10
            while server.shm.channel_count() > 1 and time.monotonic() < deadline:  # healthy() holds one
                time.sleep(0.05)
            assert server.shm.channel_count() <= 1, "the dead client's channel was not cleaned up"
    finally:
        server.stop(1.0)


def test_graceful_drain_finishes_calls_in_flight(model_dir):
    slow = BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=1.0)
    server = ExecutorServer(slow).start()
    idle = RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=False, retry_timeout_s=0.5)
    busy = RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=False)
    threading.Thread(target=idle.run, args=(OpRequest(OP, Direction.FORWARD, torch.randn(1, 64)),)).run()  # an idle session
    results: list = []
    caller = threading.Thread(target=lambda: results.append(busy.run(OpRequest(OP, Direction.FORWARD, torch.ones(1, 64)))))
    caller.start()
    while slow.queue_depth() == 0:
        time.sleep(0.01)
    # a grace period far longer than the test: stop() returns early only if idle sessions are ended
    stopper = threading.Thread(target=server.stop, args=(600.0,))
    stopper.start()
    time.sleep(0.2)
    assert health_status_or_none(server.port) in (None, health_pb2.HealthCheckResponse.NOT_SERVING)
    caller.join(120)
    stopper.join(120)
    assert results and results[0].shape == (1, 64), "the call in flight was dropped"
    assert not stopper.is_alive(), "idle sessions held the shutdown open until the grace period would end"


def health_status_or_none(port: int):
    try:
        return health_status(port)
    except grpc.RpcError:
        return None


def test_metrics_and_health(server):
    load_model(server.url)(input_ids=torch.tensor([[1, 2, 3, 4]]))
    with pytest.raises(BadRequestError):
        RemoteTransport(f"127.0.0.1:{server.port}").run(OpRequest("nope", Direction.FORWARD, torch.randn(1, 64)))
    assert health_status(server.port, "symbiosis.v1.Executor") == health_pb2.HealthCheckResponse.SERVING
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    ok = samples[("symbiosis_requests_total", (("direction", "forward"), ("op", "lm_head"), ("outcome", "ok"), ("tenant", "default")))]
    assert ok == 1
    assert samples[("symbiosis_requests_total", (("direction", "forward"), ("op", "nope"), ("outcome", "INVALID_ARGUMENT"), ("tenant", "default")))] == 1
    assert samples[("symbiosis_gemm_rows_total", (("direction", "forward"), ("op", "lm_head")))] == 4
    assert samples[("symbiosis_rows_per_gemm", (("direction", "forward"), ("op", "model.layers.*.mlp.down_proj")))] == 4
    assert samples[("symbiosis_request_seconds_count", (("direction", "forward"), ("op", "lm_head"), ("tenant", "default")))] == 1
    assert ("symbiosis_queue_depth", ()) in samples and ("symbiosis_sessions", (("tenant", "default"),)) in samples
