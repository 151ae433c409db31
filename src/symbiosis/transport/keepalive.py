"""gRPC keepalive: both ends ping a quiet HTTP/2 connection and drop it when the ping goes unanswered.

A client host that vanished without closing its connections thus frees the server threads of its
sessions, and a server that went silent fails the client's calls (which are retried, then
reported) instead of leaving them waiting forever.
"""

from __future__ import annotations

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
