"""Same-host shared-memory channels: nameless memory handed over a socket, bounded, race-free.

The channel's memory is a memfd passed over an abstract Unix socket to the one process that asked
for it: nothing appears in /dev/shm or the file system, strangers are refused, clients of other
users can attach. Channels are bounded in number and size, hold a tenant session only once their
client connects, copy token ids out of shared memory before validating them, and end cleanly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
import torch

from symbiosis import BaseExecutor
from symbiosis.errors import ExecutorUnavailableError, LimitExceededError
from symbiosis.protocol import Direction, OpRequest
from symbiosis.server import ExecutorServer, TenantRegistry
from symbiosis.server.shm_host import DEFAULT_MAX_PENDING
from symbiosis.transport import RemoteTransport
from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport import waiting
from symbiosis.transport.shm import MAX_CAPACITY

from .raw import RawChannel, attach, call_message
from .servers import REPO
from .test_reliability import eventually

OP = "model.layers.0.self_attn.o_proj"
EMBED = "model.embed_tokens"


@pytest.fixture
def server(model_dir):
    started = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama"))).start()
    yield started
    started.stop(1.0)


def correct(server: ExecutorServer, transport: RemoteTransport) -> bool:
    x = torch.randn(2, 64)
    weight = server.executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    return torch.allclose(transport.run(OpRequest(OP, Direction.FORWARD, x)), x @ weight.t(), atol=1e-5)


def test_channel_memory_has_no_name(server):
    """Another process of the same user cannot find a channel's memory: nothing is created in
    /dev/shm or in the temporary directory (and so nothing is left behind by a killed server)."""
    shm_before, tmp_before = set(os.listdir("/dev/shm")), set(os.listdir(tempfile.gettempdir()))
    transport = RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=True)
    assert correct(server, transport) and transport.uses_shared_memory
    assert set(os.listdir("/dev/shm")) - shm_before == set()
    assert {name for name in set(os.listdir(tempfile.gettempdir())) - tmp_before if "symbiosis" in name} == set()
    transport.close()


STRANGER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect("\\0" + sys.argv[1])
message, fds, _, _ = socket.recv_fds(sock, 1024, 1)
print(len(fds), len(message))
"""


def test_strangers_get_no_memory_and_the_owner_still_does(server):
    """A process other than the declared one connects first: it is refused (no descriptor), and the
    channel keeps waiting for its rightful client."""
    reply = attach(server.port)
    stranger = subprocess.run([sys.executable, "-c", STRANGER, reply.doorbell], capture_output=True, text=True, timeout=120)
    assert stranger.stdout.split() == ["0", "0"], stranger.stdout + stranger.stderr
    channel = RawChannel(reply)
    try:
        x = torch.randn(2, 64)
        channel.call(OP, x)
        result = channel.answer()
        weight = server.executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
        assert torch.allclose(channel.output(result), x @ weight.t(), atol=1e-5)
    finally:
        channel.close()


OTHER_USER = """
import os, sys, torch
from symbiosis.protocol import Direction, OpRequest
from symbiosis.transport import RemoteTransport
from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport import waiting
transport = RemoteTransport(sys.argv[1], shared_memory=True)
transport.spec()
os.setgid(65534)
os.setuid(65534)  # from here on: the user nobody
x = torch.ones(2, 64)
y = transport.run(OpRequest("model.layers.0.self_attn.o_proj", Direction.FORWARD, x))
print(os.getuid(), transport.uses_shared_memory, y.shape[0])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_clients_of_other_users_get_channels(server):
    """A client running as another user (nobody) attaches through shared memory: nothing it needs
    lives in the server user's private files."""
    run = subprocess.run([sys.executable, "-c", OTHER_USER, f"127.0.0.1:{server.port}"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.stdout.split() == ["65534", "True", "2"], run.stdout + run.stderr[-3000:]


def test_channels_are_bounded(model_dir):
    """Capacity is capped; unconnected channels (a flood from a remote or fake pid) are bounded and
    expire; clients beyond the caps use gRPC unless they require shared memory."""
    server = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), shm_channels=DEFAULT_MAX_PENDING + 2).start()
    try:
        with pytest.raises(grpc.RpcError) as error:
            attach(server.port, capacity=MAX_CAPACITY + 1)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and MAX_CAPACITY <= 256 << 20
        codes = []
        for _ in range(DEFAULT_MAX_PENDING + 4):
            try:
                attach(server.port, pid=1, capacity=MAX_CAPACITY)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert codes == ["OK"] * DEFAULT_MAX_PENDING + ["RESOURCE_EXHAUSTED"] * 4
        fallback = RemoteTransport(f"127.0.0.1:{server.port}")
        assert correct(server, fallback) and not fallback.uses_shared_memory  # the flood costs it only the fast path
        with pytest.raises(LimitExceededError, match="waiting for their clients"):
            correct(server, RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=True))
        assert eventually(lambda: server.shm.channel_count() == 0), "unconnected channels did not expire"
        # the global cap: while other threads hold every channel, a thread beyond it uses gRPC
        release, ready = threading.Event(), threading.Semaphore(0)

        def hold() -> None:
            correct(server, holder)  # the thread's channel lives as long as the thread
            ready.release()
            release.wait()

        holder = RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=True)
        threads = [threading.Thread(target=hold) for _ in range(DEFAULT_MAX_PENDING + 2)]
        for thread in threads:
            thread.start()
            ready.acquire()
        try:
            assert server.shm.channel_count() == DEFAULT_MAX_PENDING + 2
            late = RemoteTransport(f"127.0.0.1:{server.port}")
            assert correct(server, late) and not late.uses_shared_memory
            with pytest.raises(LimitExceededError, match="shared-memory channels, its limit"):
                correct(server, RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=True))
        finally:
            release.set()
            for thread in threads:
                thread.join()
    finally:
        server.stop(1.0)


def test_a_channel_holds_a_session_only_once_connected(model_dir):
    """A client on another host attaches, cannot connect, and falls back to a gRPC stream: the
    unconnected channel must not hold the tenant's only session."""
    registry = TenantRegistry.from_dict({"tenants": [{"name": "a", "token": "ta", "limits": {"sessions": 1}}]})
    server = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), registry=registry).start()
    try:
        attach(server.port, token="ta")  # what a remote client's first call does before it finds no channel
        assert registry.tenants()[0].open_sessions() == 0
        assert correct(server, RemoteTransport(f"127.0.0.1:{server.port}", token="ta", shared_memory=False))
    finally:
        server.stop(1.0)


def test_token_ids_are_copied_before_validation(model_dir, hold_batches):
    """A client rewrites its token ids in shared memory after the server validated them (while the
    request waits for its batch): the server computes with the ids it validated."""
    slow = hold_batches(BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=1.0))
    server = ExecutorServer(slow).start()
    channel = RawChannel(attach(server.port))
    try:
        ids = torch.tensor([5, 9, 2, 7])
        channel.call(EMBED, ids)
        assert eventually(lambda: slow.queue_depth() > 0), "the request never reached the executor"
        channel.write_region(channel.layout.request_data, torch.full_like(ids, 10**9))  # validated, not yet run
        result = channel.answer()
        assert result.WhichOneof("outcome") == "y", result.error
        table = slow.tensors([f"{EMBED}.weight"])[f"{EMBED}.weight"]
        assert torch.equal(channel.output(result), table[ids])
    finally:
        channel.close()
        server.stop(1.0)


def test_attach_while_draining_leaks_nothing(server):
    tenant = server.registry.tenants()[0]
    server.shm.drain(1.0)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ExecutorUnavailableError, match="shutting down"):
        server.shm.attach(tenant, os.getpid(), 1 << 16)
    assert len(os.listdir("/proc/self/fd")) == fds and server.shm.channel_count() == 0


def test_a_connection_accepted_during_hang_up_is_not_served(server):
    """The window between accept() and registering the connection: a hang-up in it must not be
    missed (the channel would serve on, and a drain would wait for it)."""
    attach(server.port)
    (channel,) = server.shm._channels
    ours, theirs = socket.socketpair()
    channel.hang_up()
    assert not channel._admit(ours) and ours.fileno() == -1
    assert theirs.recv(1) == b""  # the client sees end-of-file
    theirs.close()


def test_drain_ends_unconnected_channels_at_once(server):
    """A channel waiting for its client is woken by the drain, not left until its accept timeout."""
    attach(server.port, pid=1)
    server.shm.drain(server.shm.accept_timeout_s / 4)
    assert server.shm.channel_count() == 0


def test_drain_waits_once_for_all_channels(model_dir, hold_batches):
    """Channels busy in long calls: drain gives up after its timeout in all, not per channel."""
    slow = hold_batches(BaseExecutor.from_pretrained(model_dir("llama"), max_wait_s=4.0))
    server = ExecutorServer(slow).start()
    channels = [RawChannel(attach(server.port)) for _ in range(8)]
    try:
        for channel in channels:
            channel.call(OP, torch.randn(1, 64))
        assert eventually(lambda: slow.queue_depth() == len(channels))
        timeout_s = 0.5
        start = time.monotonic()
        server.shm.drain(timeout_s)
        # one deadline: about timeout_s; one per channel in turn: until the calls end (8 × 0.5 s, 4 s)
        assert time.monotonic() - start < 4 * timeout_s, "drain waited for each channel in turn"
        for channel in channels:
            assert channel.answer().WhichOneof("outcome") == "y"  # the calls in flight still finish
    finally:
        for channel in channels:
            channel.close()
        server.stop(1.0)


def test_a_repeated_call_computes_its_new_rows(server):
    """Calls with the same description (kept as a plan after the first) each compute the rows
    written for them; other shapes, refused calls and token-id calls in between change nothing."""
    channel = RawChannel(attach(server.port))
    weight = server.executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    try:
        for call_id in range(1, 7):
            x = torch.randn(3 if call_id % 3 else 5, 64)
            channel.call(OP, x, call_id=call_id)
            result = channel.answer()
            assert result.call_id == call_id
            assert torch.allclose(channel.output(result), x @ weight.t(), atol=1e-5)
            if call_id == 2:
                channel.call(OP, torch.full((3, 64), float("nan")), call_id=50)  # the same call, with NaN rows
                refused = channel.answer()
                assert refused.call_id == 50 and "NaN" in refused.error.message
            if call_id == 4:
                channel.call(EMBED, torch.tensor([1, 2]), call_id=51)
                assert channel.answer().WhichOneof("outcome") == "y"
    finally:
        channel.close()


def test_token_ids_are_validated_on_every_call(server):
    """Integer inputs are never planned: the same description with ids out of range is refused."""
    channel = RawChannel(attach(server.port))
    try:
        channel.call(EMBED, torch.tensor([3, 4, 5]), call_id=1)
        assert channel.answer().WhichOneof("outcome") == "y"
        channel.call(EMBED, torch.tensor([3, 10**9, 5]), call_id=2)
        result = channel.answer()
        assert result.error.code == "INVALID_ARGUMENT" and "token ids" in result.error.message
    finally:
        channel.close()


def test_a_call_not_led_by_its_call_id_is_served_too(server):
    """A foreign client may order its fields as it likes: the call is decoded each time, not planned."""
    channel = RawChannel(attach(server.port))
    weight = server.executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    try:
        for call_id in (1, 2):
            x = torch.randn(2, 64)
            channel.write_region(channel.layout.request_data, x)
            described = call_message(OP, x, channel.layout.request_data, call_id=0).SerializeToString()
            channel.send(described + pb.OpCall(call_id=call_id).SerializeToString())  # the call id last
            result = channel.answer()
            assert result.call_id == call_id and torch.allclose(channel.output(result), x @ weight.t(), atol=1e-5)
    finally:
        channel.close()


@pytest.mark.parametrize("receive", ["python", "compiled-no-poll"])
def test_channels_without_polling(model_dir, monkeypatch, receive):
    """Both ends of a channel work with the pure-Python receive (an install without the compiled
    extension) and with polling turned off."""
    if receive == "python":
        monkeypatch.setattr(waiting, "COMPILED", False)
    spin = 0.0 if receive == "compiled-no-poll" else waiting.DEFAULT_SPIN_S
    server = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), channel_spin_s=spin).start()
    try:
        transport = RemoteTransport(f"127.0.0.1:{server.port}", shared_memory=True, channel_spin_s=spin)
        for _ in range(3):
            assert correct(server, transport)
        assert transport.lane_kind == "shm"
        transport.close()
    finally:
        server.stop(1.0)


def test_only_repeats_of_a_canonical_call_with_its_rows_in_the_channel_are_planned(server, monkeypatch):
    """A call is planned once and its repeats served from the plan; a description that carries a
    second call id, or its rows inline, is decoded afresh every time (and still answered right)."""
    planned = []
    plan = server.handler.plan
    monkeypatch.setattr(server.handler, "plan", lambda *args, **kwargs: planned.append(plan(*args, **kwargs)) or planned[-1])
    channel = RawChannel(attach(server.port))
    weight = server.executor.tensors([f"{OP}.weight"])[f"{OP}.weight"]
    try:
        for call_id in range(1, 5):
            x = torch.randn(2, 64)
            channel.call(OP, x, call_id=call_id)
            result = channel.answer()
            assert result.call_id == call_id and torch.allclose(channel.output(result), x @ weight.t(), atol=1e-5)
        assert len(planned) == 1 and planned[0] is not None
        for call_id in (10, 20):
            x = torch.randn(2, 64)
            channel.write_region(channel.layout.request_data, x)
            described = call_message(OP, x, channel.layout.request_data, call_id=0).SerializeToString()
            channel.send(pb.OpCall(call_id=call_id).SerializeToString() + described + pb.OpCall(call_id=call_id + 1).SerializeToString())
            result = channel.answer()  # the last call id is the call's
            assert result.call_id == call_id + 1 and torch.allclose(channel.output(result), x @ weight.t(), atol=1e-5)
            inline = pb.OpCall(call_id=call_id + 2, op=OP, x=pb.Tensor(dtype="float32", shape=[2, 64], data=x.numpy().tobytes()))
            channel.send(inline.SerializeToString())
            result = channel.answer()
            assert result.call_id == call_id + 2 and torch.allclose(channel.output(result), x @ weight.t(), atol=1e-5)
        assert len(planned) == 1, "a description that is not a repeat's was planned"
    finally:
        channel.close()


def test_a_planned_call_the_executor_refuses_is_answered_and_frees_its_slot(model_dir):
    registry = TenantRegistry.open()
    server = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), registry=registry).start()
    channel = RawChannel(attach(server.port))
    try:
        channel.call(OP, torch.ones(2, 64), call_id=1)
        assert channel.answer().WhichOneof("outcome") == "y"
        server.executor.close()  # refuses new requests from now on
        channel.call(OP, torch.ones(2, 64), call_id=2)  # the planned repeat
        result = channel.answer()
        assert result.call_id == 2 and "closed" in result.error.message
        assert registry.tenants()[0].requests_in_flight() == 0
    finally:
        channel.close()
        server.stop(1.0)
