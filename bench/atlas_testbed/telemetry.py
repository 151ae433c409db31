"""What the testbed's processes record: OpenTelemetry spans exported as OTLP JSON lines (the
collector file exporter's format) and per-edge TCP byte counters (what an Istio sidecar counts).

Both are held in memory while the services run and written when they stop, so that no exporting or
file writing competes with requests for the CPU (or the interpreter lock) during the timed phase."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path
from typing import Sequence

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(node: object) -> None:
    """OTLP/JSON writes ids as hex, not the base64 of the plain protobuf JSON mapping."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ID_FIELDS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)


class OtlpJsonFileExporter(SpanExporter):
    """Appends one ExportTraceServiceRequest per export as a JSON line, like the collector's file exporter."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        document = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
        _hex_ids(document)
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(document) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class ExportAtExit(SpanProcessor):
    """Keeps finished spans in memory and hands them to the exporter in one batch at shutdown."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        self.force_flush()
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        spans, self.spans = self.spans, []
        if spans:
            self.exporter.export(spans)
        return True


class ByteCounter:
    """Counts bytes this process sends and receives on TCP connections it opened to known servers,
    keyed by (destination component, direction): cumulative samples, written to a JSON-lines file by
    `write`; per thread too (`thread_totals`), so a span can record the bytes its own call moved."""

    def __init__(self, component: str, servers: dict[tuple[str, int], str], path: Path) -> None:
        self.component, self.servers, self.path = component, servers, path
        self.totals: dict[tuple[str, str], int] = {}
        self._written: dict[tuple[str, str], int] = {}
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def thread_totals(self, destination: str) -> tuple[int, int]:
        """(sent, received) bytes of this thread to `destination` so far."""
        mine = getattr(self._local, "totals", {})
        return mine.get((destination, "request"), 0), mine.get((destination, "response"), 0)

    def add(self, sock: socket.socket, direction: str, count: int) -> None:
        if count <= 0:
            return
        try:
            peer = sock.getpeername()
        except OSError:
            return
        destination = self.servers.get((peer[0], peer[1])) if isinstance(peer, tuple) else None
        if destination is not None:
            key = (destination, direction)
            mine = self._local.__dict__.setdefault("totals", {})
            mine[key] = mine.get(key, 0) + count
            with self._lock:
                self.totals[key] = self.totals.get(key, 0) + count

    def install(self) -> None:
        """Wrap socket.socket's send and receive methods (every client library goes through them)."""
        counter, base = self, socket.socket

        def sendall(sock, data, *args):
            base_sendall(sock, data, *args)
            counter.add(sock, "request", len(data))

        def send(sock, data, *args):
            sent = base_send(sock, data, *args)
            counter.add(sock, "request", sent)
            return sent

        def recv(sock, *args):
            data = base_recv(sock, *args)
            counter.add(sock, "response", len(data))
            return data

        def recv_into(sock, buffer, *args):
            got = base_recv_into(sock, buffer, *args)
            counter.add(sock, "response", got)
            return got

        base_sendall, base_send, base_recv, base_recv_into = base.sendall, base.send, base.recv, base.recv_into
        base.sendall, base.send, base.recv, base.recv_into = sendall, send, recv, recv_into

    def sample(self) -> None:
        """Record the totals that changed since the last sample (cumulative, like a counter scrape)."""
        with self._lock:
            now = time.time()
            self._rows.extend({"t": now, "source": self.component, "destination": d, "direction": k, "bytes": v}
                              for (d, k), v in self.totals.items() if self._written.get((d, k)) != v)
            self._written.update(self.totals)

    def write(self) -> None:
        """Take a last sample and append every recorded sample to the file."""
        self.sample()
        with self._lock:
            rows, self._rows = self._rows, []
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")

    def start_sampling(self, every_s: float = 0.05) -> None:
        def loop() -> None:
            while True:
                time.sleep(every_s)
                self.sample()
        threading.Thread(target=loop, daemon=True).start()
