"""Receiving a channel's messages: the compiled poll-then-block receive and the pure-Python one
behave alike (messages, end-of-file, oversized messages, timeouts, closed sockets), and the
compiled one polls only while the other end answers within its spin time."""

from __future__ import annotations

import socket
import threading

import pytest

from symbiosis.errors import BadRequestError
from symbiosis.transport import waiting
from symbiosis.transport.shm import set_receive_timeout
from symbiosis.transport.waiting import Receiver, StreamWaiter

IMPLEMENTATIONS = [pytest.param(False, id="python"), pytest.param(True, id="compiled")]


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_the_extension_is_built():
    """The install compiles it (setup.py); without it every channel falls back to plain blocking."""
    assert waiting._compiled_receive is not None
    assert waiting.COMPILED


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_messages_arrive_whole_and_in_order(pair, compiled):
    ours, theirs = pair
    receiver = Receiver(ours, 64, compiled=compiled)
    for message in (b"a", b"x" * 64, b"\x00" * 10):
        theirs.send(message)
        assert bytes(receiver.receive()) == message


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_an_oversized_message_is_refused_and_the_next_one_still_arrives(pair, compiled):
    ours, theirs = pair
    receiver = Receiver(ours, 16, compiled=compiled)
    theirs.send(b"y" * 17)
    theirs.send(b"fits")
    with pytest.raises(BadRequestError, match="exceeds 16 bytes"):
        receiver.receive()
    assert bytes(receiver.receive()) == b"fits"


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_end_of_file_is_none(pair, compiled):
    ours, theirs = pair
    receiver = Receiver(ours, 16, compiled=compiled)
    theirs.shutdown(socket.SHUT_WR)
    assert receiver.receive() is None


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_a_receive_timeout_raises_blocking_io_error(pair, compiled):
    ours, _theirs = pair
    set_receive_timeout(ours, 0.05)
    receiver = Receiver(ours, 16, spin_s=0.001, compiled=compiled)
    with pytest.raises(BlockingIOError):
        receiver.receive()


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_a_closed_socket_raises_os_error(pair, compiled):
    ours, _theirs = pair
    receiver = Receiver(ours, 16, compiled=compiled)
    ours.close()
    with pytest.raises(OSError):
        receiver.receive()


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_a_message_sent_while_the_receiver_sleeps_wakes_it(pair, compiled):
    ours, theirs = pair
    receiver = Receiver(ours, 16, spin_s=0.0001, compiled=compiled)
    sender = threading.Timer(0.05, theirs.send, args=(b"late",))
    sender.start()
    try:
        assert bytes(receiver.receive()) == b"late"
    finally:
        sender.join()


def test_polling_stops_after_a_long_wait_and_resumes_after_a_short_one(pair):
    ours, theirs = pair
    receiver = Receiver(ours, 16, spin_s=0.001, compiled=True)
    assert receiver._next_spin_ns == 1_000_000
    sender = threading.Timer(0.05, theirs.send, args=(b"slow",))  # answered after 50 ms: longer than the spin
    sender.start()
    assert bytes(receiver.receive()) == b"slow"
    sender.join()
    assert receiver._next_spin_ns == 0, "a peer slower than the spin time costs no polling"
    theirs.send(b"quick")  # already there when the receive starts
    assert bytes(receiver.receive()) == b"quick"
    assert receiver._next_spin_ns == 1_000_000


def test_without_the_extension_receivers_block(monkeypatch, pair):
    monkeypatch.setattr(waiting, "COMPILED", False)
    ours, theirs = pair
    receiver = Receiver(ours, 16)
    assert receiver._next_spin_ns == 0
    theirs.send(b"m")
    assert bytes(receiver.receive()) == b"m"


def test_polling_yields_to_other_threads(pair):
    """A receiver polling for a message that never comes (then blocking) leaves the GIL to the
    process's other threads: a counting thread makes progress meanwhile."""
    ours, theirs = pair
    receiver = Receiver(ours, 16, spin_s=0.2, compiled=True)
    counted = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counted[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    sender = threading.Timer(0.3, theirs.send, args=(b"m",))
    sender.start()
    try:
        assert bytes(receiver.receive()) == b"m"
    finally:
        stop.set()
        counter.join()
        sender.join()
    assert counted[0] > 1000


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_a_stream_waiter_returns_once_there_is_something_to_read(compiled):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        waiter = StreamWaiter(spin_s=0.001, compiled=compiled)
        theirs.sendall(b"abc")
        waiter.wait(ours)
        assert ours.recv(3) == b"abc"
        waiter.read()
        assert waiter._next_spin_ns == (1_000_000 if compiled else 0)
        sender = threading.Timer(0.05, theirs.sendall, args=(b"late",))  # longer than the spin: the read blocks
        sender.start()
        waiter.wait(ours)
        assert ours.recv(4) == b"late"
        waiter.read()
        sender.join()
        assert waiter._next_spin_ns == 0
        theirs.close()
        waiter.wait(ours)  # end-of-file is something to read
        assert ours.recv(1) == b""
    finally:
        ours.close()


@pytest.mark.parametrize("compiled", IMPLEMENTATIONS)
def test_a_socket_with_a_python_timeout_is_read_as_python_reads_it(pair, compiled):
    """``settimeout`` makes a socket non-blocking underneath: its receives wait out the timeout."""
    ours, theirs = pair
    ours.settimeout(0.05)
    receiver = Receiver(ours, 16, compiled=compiled)
    with pytest.raises(TimeoutError):
        receiver.receive()
    theirs.send(b"m")
    assert bytes(receiver.receive()) == b"m"


def test_closing_the_socket_elsewhere_ends_a_receive_and_the_peer_sees_it(pair):
    """The compiled receive reads its own descriptor; shutting the socket down ends it with
    end-of-file, and the peer sees the connection end although that descriptor is still open."""
    ours, theirs = pair
    receiver = Receiver(ours, 16, spin_s=0.001, compiled=True)
    closer = threading.Timer(0.05, lambda: (ours.shutdown(socket.SHUT_RDWR), ours.close()))
    closer.start()
    try:
        assert receiver.receive() is None
    finally:
        closer.join()
    assert theirs.recv(16) == b""
    receiver.close()
