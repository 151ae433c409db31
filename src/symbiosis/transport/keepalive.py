"""Keepalive: both ends ping a quiet connection and drop it when the ping goes unanswered.

gRPC connections use HTTP/2 pings, answered by the peer process itself. TCP data channels use the
kernel's TCP keepalive probes, which find a host that vanished (powered off, cut off by the network)
but are answered by the kernel of a host whose process merely stopped; a client that waits for an
answer therefore also asks the server's gRPC health service when it waits long (``transport.lanes``),
and a channel that stays idle ends after the server's session idle timeout.
A client host that vanished without closing its connections thus frees the server threads of its
sessions, and a server that went silent fails the client's calls (which are retried, then
reported) instead of leaving them waiting forever.
"""

from __future__ import annotations

import socket

#: Default seconds between pings on a quiet connection (clients and servers).
DEFAULT_KEEPALIVE_S = 20.0
#: The longest wait for a ping's acknowledgement before the connection is dropped.
MAX_ACK_WAIT_S = 10.0
#: The most often a server accepts pings from a client (more often counts as abuse).
MIN_CLIENT_PING_INTERVAL_S = 1.0


def keepalive_options(interval_s: float) -> list[tuple[str, int]]:
    """Channel or server options: ping every ``interval_s`` even without calls; wait at most
    ``min(interval_s, MAX_ACK_WAIT_S)`` for the acknowledgement."""
    interval_ms = int(interval_s * 1000)
    ack_wait_ms = min(interval_ms, int(MAX_ACK_WAIT_S * 1000))
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", ack_wait_ms),
        ("grpc.http2.ping_timeout_ms", ack_wait_ms),  # grpcio >= 1.6x times pings out by this one (default 60 s)
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def enable_tcp_keepalive(sock: socket.socket, interval_s: float) -> None:
    """Probe ``sock``'s peer after ``interval_s`` without traffic, then every ``min(interval_s,
    MAX_ACK_WAIT_S)``; give up after three unanswered probes (or unacknowledged data for as long)."""
    idle = max(1, int(interval_s))
    probe = max(1, int(min(interval_s, MAX_ACK_WAIT_S)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000 * (idle + 3 * probe))
