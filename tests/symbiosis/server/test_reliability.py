"""Hostile or unlucky clients never hurt the server or other clients; drain, idle sessions,
keepalive, health and metrics."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid

import grpc
import pytest
import requests
import torch
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from symbiosis import BadRequestError, BaseExecutor, load_model
from symbiosis.errors import ExecutorUnavailableError, LimitExceededError
from symbiosis.protocol import Direction, OpRequest
from symbiosis.server import ExecutorServer
from symbiosis.server.handler import MAX_CLIENT_IDS, OTHER_CLIENTS
from symbiosis.transport import RemoteTransport
from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport.frames import PREFIX
from symbiosis.transport.shm import MAX_MESSAGE_BYTES

from .raw import RawChannel, RawDataChannel, attach, call_message
from .servers import LANES, health_status, server_process
from .workers import idle_client, stuck_client

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
    for lane, options in LANES.items():
        transport = RemoteTransport(f"127.0.0.1:{server.port}", **options)
        y = transport.run(OpRequest(OP, Direction.FORWARD, x))
        assert transport.lane_kind == lane
        transport.close()
        assert torch.allclose(y, x @ weight.t(), atol=1e-5)


@pytest.mark.parametrize("lane", sorted(LANES))
def test_bad_requests_get_errors(server, lane):
    # a shared-memory channel as small as the server's message limit: the oversized request below
    # leaves it for the data channel, which enforces the limit
    transport = RemoteTransport(f"127.0.0.1:{server.port}", **LANES[lane], shm_capacity=64 << 10)
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
    """A client that sends nonsense on its channel gets an error back; nobody else notices."""
    channel = RawChannel(attach(server.port))
    try:
        for message in (b"\xff\xff\xff\xff", b"\x05\x00\x00\x00\xff\xff\xff\xff\xff", b"\x00", b"\x0a" + b"\xff" * 10):
            channel.send(message)
            result = channel.answer()
            assert result.error.code == "INVALID_ARGUMENT", result
        outside = pb.OpCall(op=OP, x=pb.Tensor(dtype="float32", shape=[1 << 20, 64], region=pb.ShmRegion(offset=0, nbytes=(1 << 20) * 256)))
        channel.send(outside.SerializeToString())
        result = channel.answer()  # a region outside the channel is refused, not read
        assert result.error.code == "INVALID_ARGUMENT" and "outside the channel" in result.error.message, result
        channel.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))
        assert "exceeds" in channel.answer().error.message  # an oversized message is discarded whole
        device = pb.OpCall(op=OP, x=pb.Tensor(dtype="float32", shape=[1, 64], region=pb.ShmRegion(offset=0, nbytes=256, device=True)))
        channel.send(device.SerializeToString())
        assert "without CUDA buffers" in channel.answer().error.message
        channel.call(OP, torch.ones(1, 64), call_id=7)
        assert channel.answer().call_id == 7  # the channel still serves
    finally:
        channel.close()
    healthy(server)


def test_a_repeated_data_channel_call_reads_its_own_frame(server):
    """A data channel keeps each call's plan, but never past its frame: the same header with a
    payload of another length is refused (not served from the last frame's bytes), and a call
    after the channel's buffers grew still reads and answers its own rows."""
    channel = RawDataChannel(server.port)
    weight = server.executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    try:
        assert not channel.open().HasField("error")
        x = torch.randn(2, 64)
        header = call_message(OP, x, 0, call_id=1).SerializeToString()
        for payload in (x, torch.randn(2, 64)):
            channel.send_raw(PREFIX.pack(len(header), 512) + header + payload.numpy().tobytes())
            result, data = channel.answer()
            assert torch.allclose(torch.frombuffer(bytearray(data), dtype=torch.float32).view(2, 64), payload @ weight.t(), atol=1e-5)
        channel.send_raw(PREFIX.pack(len(header), 256) + header + bytes(256))  # the same header, half its rows
        assert "outside the frame" in channel.answer()[0].error.message
        channel.call(OP, torch.randn(128, 64), call_id=2)  # both buffers grow
        assert channel.answer()[0].WhichOneof("outcome") == "y"
        channel.send_raw(PREFIX.pack(len(header), 512) + header + x.numpy().tobytes())
        result, data = channel.answer()
        assert torch.allclose(torch.frombuffer(bytearray(data), dtype=torch.float32).view(2, 64), x @ weight.t(), atol=1e-5)
    finally:
        channel.close()


def test_garbage_on_a_data_channel(server):
    """Nonsense frames on a TCP data channel: a malformed call gets an error and the channel goes on;
    a frame whose prefix announces too much ends that connection only."""
    channel = RawDataChannel(server.port)
    try:
        assert not channel.open().HasField("error")
        for header in (b"\xff" * 7, b"\x0a" + b"\xff" * 10):
            channel.send_raw(PREFIX.pack(len(header), 3) + header + b"abc")
            assert channel.answer()[0].error.code == "INVALID_ARGUMENT"
        outside = pb.OpCall(op=OP, x=pb.Tensor(dtype="float32", shape=[2, 64], region=pb.ShmRegion(offset=0, nbytes=512)))
        channel.send_raw(PREFIX.pack(len(outside.SerializeToString()), 256) + outside.SerializeToString() + bytes(256))
        assert "outside the frame" in channel.answer()[0].error.message
        channel.call(OP, torch.ones(1, 64), call_id=9)
        result, payload = channel.answer()
        assert result.call_id == 9 and len(payload) == 256
        channel.send_raw(PREFIX.pack(1 << 20, 0))  # a header beyond the limit: the stream cannot go on
        assert channel.answer()[0].error.code == "INVALID_ARGUMENT" and channel.ended()
    finally:
        channel.close()
    too_big = RawDataChannel(server.port)
    try:
        assert not too_big.open().HasField("error")
        too_big.send_raw(PREFIX.pack(10, too_big.reply.max_payload_bytes + 1))
        assert too_big.answer()[0].error.code == "INVALID_ARGUMENT" and too_big.ended()
    finally:
        too_big.close()
    healthy(server)


@pytest.mark.parametrize("lane", sorted(LANES))
def test_client_vanishing_mid_request(model_dir, lane, hold_batches):
    """A client killed while its request waits in the executor: once the request is computed (into
    its channel's memory, which the server still maps) the channel, the tenant's session and the
    request's in-flight slot are released; nothing is left behind."""
    slow = hold_batches(BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=1.0))
    server = ExecutorServer(slow).start()
    try:
        proc = multiprocessing.get_context("spawn").Process(target=stuck_client, args=(server.url, LANES[lane]))
        proc.start()
        deadline = time.monotonic() + 120
        while slow.queue_depth() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.queue_depth() > 0, "the client never sent its request"
        proc.kill()
        proc.join()
        healthy(server)  # its transports are closed when it returns
        tenant = server.registry.tenants()[0]
        assert eventually(lambda: tenant.open_sessions() == 0), "the dead client's session was not ended"
        assert eventually(lambda: server.shm.channel_count() + server.data.channel_count() == 0), "the dead client's channel was not cleaned up"
        assert slow.queue_depth() == 0
        assert tenant.requests_in_flight() == 0, "the dead client's request still holds its tenant's slot"
    finally:
        server.stop(1.0)


def eventually(condition, timeout_s: float = 60.0) -> bool:
    """Whether ``condition()`` becomes true within ``timeout_s`` (a bound on waiting, not a performance check)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_graceful_drain_finishes_calls_in_flight(model_dir, hold_batches):
    slow = hold_batches(BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=1.0))
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
    assert samples[("symbiosis_requests_total", (("direction", "forward"), ("op", "unknown"), ("outcome", "INVALID_ARGUMENT"), ("tenant", "default")))] == 1
    assert samples[("symbiosis_gemm_rows_total", (("direction", "forward"), ("op", "lm_head")))] == 4
    assert samples[("symbiosis_rows_per_gemm", (("direction", "forward"), ("op", "model.layers.*.mlp.down_proj")))] == 4
    assert samples[("symbiosis_request_seconds_count", (("direction", "forward"), ("op", "lm_head"), ("tenant", "default")))] == 1
    assert ("symbiosis_queue_depth", ()) in samples and ("symbiosis_sessions", (("tenant", "default"),)) in samples


def test_client_chosen_names_do_not_grow_the_server(server):
    """Op names and client ids are the client's choice: metrics series and per-client counts stay bounded."""
    transport = RemoteTransport(f"127.0.0.1:{server.port}")
    for _ in range(200):
        with pytest.raises(BadRequestError, match="unknown op"):
            transport.run(OpRequest(f"op-{uuid.uuid4().hex}", Direction.FORWARD, torch.randn(1, 64)))
    for _ in range(MAX_CLIENT_IDS + 10):
        transport.run(OpRequest(OP, Direction.FORWARD, torch.randn(1, 64), client_id=uuid.uuid4().hex))
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    failed = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "symbiosis_requests_total" and s.labels["outcome"] != "ok"]
    assert [(s.labels["op"], s.value) for s in failed] == [("unknown", 200)]
    counts = transport.stats()["completed_by_client"]
    assert len(counts) == MAX_CLIENT_IDS + 1 and counts[OTHER_CLIENTS] == 10 and sum(counts.values()) == MAX_CLIENT_IDS + 10


def test_idle_sessions_cannot_starve_health_checks(model_dir):
    """Streams may hold all server threads but the ones kept for unary calls: beyond that a client is
    told so, and health checks, spec and stats calls are still answered."""
    server = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), max_workers=6, shared_memory=False, data_channel=False).start()
    release, refused = threading.Event(), []
    ready = threading.Semaphore(0)

    def hold() -> None:
        transport = RemoteTransport(f"127.0.0.1:{server.port}", retry_timeout_s=1.0)
        try:
            transport.run(OpRequest(OP, Direction.FORWARD, torch.randn(1, 64)))
        except LimitExceededError as exc:
            refused.append(exc)
        ready.release()
        release.wait()  # the thread, and so its session, stays alive
        transport.close()

    holders = [threading.Thread(target=hold) for _ in range(6)]
    try:
        for thread in holders:
            thread.start()
            ready.acquire()
        assert len(refused) == 4 and all("2 open sessions, its limit" in str(exc) for exc in refused), refused
        assert health_status(server.port) == health_pb2.HealthCheckResponse.SERVING
        assert RemoteTransport(f"127.0.0.1:{server.port}").stats()["completed_by_client"] == {"anonymous": 2}
    finally:
        release.set()
        for thread in holders:
            thread.join()
        server.stop(1.0)


@pytest.mark.parametrize("lane", sorted(LANES))
def test_idle_sessions_time_out_and_clients_reopen_them(model_dir, lane):
    """The server ends a session idle past its timeout; the client's next call opens a new one, unharmed."""
    server = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), session_idle_s=1.0).start()
    try:
        tenant = server.registry.tenants()[0]
        transport = RemoteTransport(f"127.0.0.1:{server.port}", **LANES[lane], retry_timeout_s=0)
        x = torch.randn(2, 64)
        weight = server.executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
        for _ in range(2):
            assert torch.allclose(transport.run(OpRequest(OP, Direction.FORWARD, x)), x @ weight.t(), atol=1e-5)
            assert tenant.open_sessions() == 1 and transport.lane_kind == lane
            assert eventually(lambda: tenant.open_sessions() == 0), "the idle session was not ended"
        transport.close()
    finally:
        server.stop(1.0)


def test_a_silent_server_fails_calls_instead_of_hanging(model_dir):
    """A server that stops answering (SIGSTOP: its connections stay open) is detected by keepalive
    pings; the call is retried, then reported, instead of waiting forever."""
    with server_process(model_dir("llama")) as server:
        transport = RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=False, keepalive_s=2.0, retry_timeout_s=1.0)
        transport.run(OpRequest(OP, Direction.FORWARD, torch.randn(1, 64)))
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                transport.run(OpRequest(OP, Direction.FORWARD, torch.randn(1, 64)))
            except BaseException as exc:
                outcome.append(exc)

        server.process.send_signal(signal.SIGSTOP)
        try:
            caller = threading.Thread(target=call, daemon=True)
            caller.start()
            caller.join(120)
            assert not caller.is_alive(), "the call hung on a silent server"
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert len(outcome) == 1 and isinstance(outcome[0], ExecutorUnavailableError), outcome


def test_a_vanished_client_frees_its_session(model_dir):
    """A client process that stops answering (SIGSTOP, like a host that vanished) while holding an
    idle session: the server's keepalive pings go unanswered and the session ends."""
    server = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), keepalive_s=1.0).start()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=idle_client, args=(server.url, ready))
    proc.start()
    try:
        assert ready.wait(120), "the client did not start"
        tenant = server.registry.tenants()[0]
        assert tenant.open_sessions() == 1
        os.kill(proc.pid, signal.SIGSTOP)
        assert eventually(lambda: tenant.open_sessions() == 0), "the silent client still holds its session"
    finally:
        proc.kill()
        proc.join()
        server.stop(1.0)
