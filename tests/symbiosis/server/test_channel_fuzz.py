"""The channels' decoders, fuzzed as the gRPC one is (``tests/symbiosis/transport/test_wire.py``).

Hypothesis sends a live server arbitrary bytes and hostile-but-well-formed calls on a shared-memory
channel (one message each) and on a TCP data channel (arbitrary byte streams, and framed calls whose
header and payload disagree). The server must answer each call with an ``OpResult`` — an error for
anything malformed, an output of exactly the announced size otherwise — or, where a byte stream
cannot be resynchronised, end that connection; it keeps serving everyone else throughout.
"""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symbiosis import BaseExecutor
from symbiosis.protocol import Direction, OpRequest
from symbiosis.server import ExecutorServer
from symbiosis.transport import RemoteTransport
from symbiosis.transport import symbiosis_pb2 as pb
from symbiosis.transport.frames import PREFIX, receive_into, receive_prefix, send_frame
from symbiosis.transport.shm import MAX_MESSAGE_BYTES
from symbiosis.transport.wire import WIRE_DTYPES

from .raw import RawChannel, RawDataChannel, attach
from .test_reliability import eventually

OP = "model.layers.0.self_attn.o_proj"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(model_dir):
    started = ExecutorServer(BaseExecutor.from_pretrained(model_dir("llama")), max_message_bytes=1 << 16).start()
    yield started
    started.stop(1.0)


@pytest.fixture(scope="module")
def shm(server):
    channel = RawChannel(attach(server.port))
    yield channel
    channel.close()


def hostile_call(draw) -> pb.OpCall:
    """A well-formed ``OpCall`` with hostile field values (as the gRPC decoder's fuzzer builds them)."""
    msg = pb.OpCall(
        call_id=draw(st.integers(0, 2**64 - 1)),
        op=draw(st.sampled_from([OP, "lm_head", "model.embed_tokens", "", "nope"])),
        direction=draw(st.integers(-(2**31), 2**31 - 1)),
        priority=draw(st.integers(-(2**31), 2**31 - 1)),
        out_dtype=draw(st.sampled_from(["", *WIRE_DTYPES, "bogus"])),
        compute_dtype=draw(st.sampled_from(["", "float32", "bfloat16", "int64"])),
        weight_dtype=draw(st.sampled_from(["", "float32", "bfloat16", "float16", "int64", "bogus"])),
    )
    msg.x.dtype = draw(st.sampled_from([*WIRE_DTYPES, "", "float64"]))
    msg.x.shape.extend(draw(st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4)))
    if draw(st.booleans()):
        msg.x.region.offset = draw(st.integers(0, 2**64 - 1))
        msg.x.region.nbytes = draw(st.integers(0, 2**64 - 1))
        msg.x.region.device = draw(st.booleans())
    else:
        msg.x.data = draw(st.binary(max_size=64))
    if draw(st.booleans()):
        msg.features.start, msg.features.end = draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1))
    return msg


def answered(result: pb.OpResult) -> None:
    """An answer is an error, or an output region of exactly the size its dtype and shape need."""
    if result.WhichOneof("outcome") == "y":
        y = result.y
        assert y.region.nbytes == torch.Size(y.shape).numel() * WIRE_DTYPES[y.dtype].itemsize
    else:
        assert result.error.code and result.error.message


def still_serves(server) -> None:
    x = torch.randn(1, 64)
    for options in ({"shared_memory": True}, {"shared_memory": False}):
        transport = RemoteTransport(f"127.0.0.1:{server.port}", **options)
        assert transport.run(OpRequest(OP, Direction.FORWARD, x)).shape == (1, 64)
        transport.close()


@FUZZ
@given(message=st.binary(min_size=1, max_size=512))
def test_shm_channel_raw_messages(server, shm, message):
    shm.send(message)
    answered(shm.answer())


@FUZZ
@given(data=st.data())
def test_shm_channel_hostile_calls(server, shm, data):
    shm.send(hostile_call(data.draw).SerializeToString())
    answered(shm.answer())


def test_shm_channel_survives_its_fuzzing(server, shm):
    shm.call(OP, torch.ones(2, 64), call_id=3)
    assert shm.answer().call_id == 3
    still_serves(server)


@FUZZ
@given(stream=st.binary(max_size=256))
def test_data_channel_raw_streams(server, stream):
    """Any byte stream after the hello: answers that parse as frames, then the server ends the
    connection or waits for more — never anything else."""
    channel = RawDataChannel(server.port)
    try:
        assert not channel.open().HasField("error")
        with contextlib.suppress(OSError):  # the server may have hung up already
            channel.send_raw(stream)
            channel.sock.shutdown(socket.SHUT_WR)  # nothing more will come: the server must finish and hang up
        channel.sock.settimeout(30)
        prefix = bytearray(PREFIX.size)
        try:
            while (lengths := receive_prefix(channel.sock, prefix, 1 << 20)) is not None:
                header = bytearray(lengths[0])
                receive_into(channel.sock, memoryview(header))
                answered(pb.OpResult.FromString(bytes(header)))
                receive_into(channel.sock, memoryview(bytearray(lengths[1])))
        except ConnectionResetError:
            pass  # the server ended a stream it could not follow while bytes of it were still unread: a reset
    finally:
        channel.close()


@FUZZ
@given(data=st.data(), payload=st.binary(max_size=512))
def test_data_channel_hostile_calls(server, data, payload):
    channel = RawDataChannel(server.port)
    try:
        assert not channel.open().HasField("error")
        send_frame(channel.sock, hostile_call(data.draw).SerializeToString(), torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else None)
        result, body = channel.answer()
        answered(result)
        assert len(body) == (result.y.region.nbytes if result.WhichOneof("outcome") == "y" else 0)
    finally:
        channel.close()


def test_data_channel_survives_its_fuzzing(server):
    assert eventually(lambda: server.data.channel_count() == 0), "fuzzed connections did not end with their clients"
    still_serves(server)


def test_the_largest_message_is_answered(server, shm):
    shm.send(b"\x0a" * MAX_MESSAGE_BYTES)
    answered(shm.answer())
