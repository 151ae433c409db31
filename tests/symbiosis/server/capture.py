"""Capturing what a client sends: a loopback TCP proxy that records every byte, and an HTTP/2 + gRPC
de-framer that recovers the messages inside (so that a tensor split across frames is still found)."""

from __future__ import annotations

import socket
import struct
import threading
from collections import defaultdict

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _PADDED = 0, 0x8


class RecordingProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream`` and records the client-to-server byte stream."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.connections: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            record = bytearray()
            with self._lock:
                self.connections.append(record)
            threading.Thread(target=self._pump, args=(client, server, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        try:
            while data := source.recv(1 << 16):
                if record is not None:
                    with self._lock:
                        record.extend(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def sent(self) -> list[bytes]:
        """Raw bytes each connection sent, in order."""
        with self._lock:
            return [bytes(record) for record in self.connections]

    def close(self) -> None:
        self._listener.close()


def grpc_messages(stream: bytes) -> list[bytes]:
    """The gRPC messages inside one HTTP/2 client byte stream (DATA frames joined per stream)."""
    assert stream.startswith(_PREFACE), "not an HTTP/2 client stream"
    pos, data = len(_PREFACE), defaultdict(bytearray)
    while pos + 9 <= len(stream):
        length = int.from_bytes(stream[pos : pos + 3], "big")
        kind, flags = stream[pos + 3], stream[pos + 4]
        stream_id = struct.unpack(">I", stream[pos + 5 : pos + 9])[0] & 0x7FFFFFFF
        payload = stream[pos + 9 : pos + 9 + length]
        if kind == _DATA:
            if flags & _PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            data[stream_id].extend(payload)
        pos += 9 + length
    messages = []
    for body in data.values():
        at = 0
        while at + 5 <= len(body):
            size = int.from_bytes(body[at + 1 : at + 5], "big")
            messages.append(bytes(body[at + 5 : at + 5 + size]))
            at += 5 + size
    return messages
