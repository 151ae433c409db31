"""Span trees from any supported trace format: Jaeger JSON, OTLP JSON (collector file exporter) and
Zipkin v2 JSON. Each reader turns its format into SpanRecords; spans are grouped by trace id across
all files (OTLP files usually hold one service's spans each) and assembled into Trace objects."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.files import read_json, read_json_lines


@dataclass
class Span:
    """One span; times in microseconds. `component` is the workload that recorded it.

    `kind` is server/client/producer/consumer/internal when the format says; `peer` is the component
    a client span calls when the span names it (peer.service, server.address, Zipkin remoteEndpoint).
    `request_bytes` / `response_bytes` are the sizes of the call the span stands for, when it records
    them (see `payload_sizes`).
    """

    span_id: str
    parent_id: str | None
    operation: str
    start_us: int
    duration_us: int
    component: str
    kind: str | None = None
    peer: str | None = None
    children: list["Span"] = field(default_factory=list)
    request_bytes: int | None = None
    response_bytes: int | None = None

    @property
    def end_us(self) -> int:
        return self.start_us + self.duration_us


# First tag found wins: bytes on the wire as Envoy/Istio sidecars tag their spans, then the body sizes
# of the OpenTelemetry HTTP semantic conventions (current names, then the names before v1.21).
REQUEST_SIZE_TAGS = ("request_size", "http.request.body.size", "http.request_content_length")
RESPONSE_SIZE_TAGS = ("response_size", "http.response.body.size", "http.response_content_length")


def payload_sizes(tags: dict[str, Any]) -> dict[str, int | None]:
    """`request_bytes` / `response_bytes` of a span from its tags (None where it records none)."""
    def first(keys: tuple[str, ...]) -> int | None:
        value = next((tags[key] for key in keys if tags.get(key) not in (None, "")), None)
        if value is None:
            return None
        size = int(value)
        if size < 0:
            raise ValueError(f"negative size {size}")
        return size
    return {"request_bytes": first(REQUEST_SIZE_TAGS), "response_bytes": first(RESPONSE_SIZE_TAGS)}


@dataclass
class Trace:
    """A span tree; `api` is the root span's operation name."""

    trace_id: str
    root: Span
    spans: list[Span]

    @property
    def api(self) -> str:
        return self.root.operation

    @property
    def duration_ms(self) -> float:
        return self.root.duration_us / 1000.0


def assemble(source: str, trace_id: str, spans: list[Span]) -> Trace:
    """Link spans into one tree; raises AtlasInputError for orphans, several roots or negative durations."""
    by_id: dict[str, Span] = {}
    for span in spans:
        if span.duration_us < 0:
            raise AtlasInputError(source, f"trace {trace_id}: span {span.span_id} has negative duration")
        by_id[span.span_id] = span
    roots = []
    for span in by_id.values():
        if span.parent_id is None:
            roots.append(span)
        elif span.parent_id in by_id:
            by_id[span.parent_id].children.append(span)
        else:
            raise AtlasInputError(source, f"trace {trace_id}: span {span.span_id} references missing parent {span.parent_id}")
    if len(roots) != 1:
        raise AtlasInputError(source, f"trace {trace_id}: expected one root span, found {len(roots)}")
    for span in by_id.values():
        span.children.sort(key=lambda child: (child.start_us, child.span_id))
    return Trace(trace_id, roots[0], list(by_id.values()))


def assemble_all(source: str, grouped: dict[str, list[Span]]) -> list[Trace]:
    """Trees for every trace id; unusable traces are skipped with a warning naming the source."""
    traces = []
    for trace_id, spans in grouped.items():
        try:
            traces.append(assemble(source, trace_id, spans))
        except AtlasInputError as exc:
            warn_data(source, f"skipped a trace: {exc.problem}")
    if grouped and not traces:
        raise AtlasInputError(source, "no usable trace in the input")
    return traces


def trace_format(document: Any) -> str:
    """'jaeger', 'otlp' or 'zipkin' from a parsed document's shape; raises for anything else."""
    if isinstance(document, dict):
        if "resourceSpans" in document:
            return "otlp"
        if "data" in document:
            return "jaeger"
    if isinstance(document, list):
        first = next((item for item in document if item), None)
        if first is None:
            return "jaeger"
        if isinstance(first, dict) and "resourceSpans" in first:
            return "otlp"
        if isinstance(first, list) or (isinstance(first, dict) and "traceId" in first and "id" in first):
            return "zipkin"
        if isinstance(first, dict) and "spans" in first:
            return "jaeger"
    raise AtlasInputError("trace document", "not a trace document: expected Jaeger JSON ({'data': [traces]}), "
                          "OTLP JSON ({'resourceSpans': ...}, one object per line) or Zipkin v2 JSON (a list of spans)")


def trace_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to their *.json / *.jsonl / *.json.gz files; keep files as given."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for pattern in ("*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz") for p in path.glob(pattern))
            if not found:
                raise AtlasInputError(path, "directory holds no *.json / *.jsonl trace files")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise AtlasInputError(path, "trace file not found")
    return files


def read_trace_document(path: Path) -> Any:
    """A whole-file JSON document, or the list of objects of a JSON-lines file (OTLP file exporter)."""
    try:
        return read_json(path)
    except AtlasInputError as whole_error:
        try:
            return read_json_lines(path)
        except AtlasInputError:
            raise whole_error from None


def load_traces(paths: Iterable[str | Path]) -> list[Trace]:
    """All traces from trace files or directories of them, in any supported format (mixed is fine).

    OTLP and Zipkin spans are grouped by trace id across files before the trees are built; a file
    holding no trace is warned about."""
    from hybridatlas.ingest import jaeger, otlp, zipkin

    paths = list(paths)
    traces: list[Trace] = []
    grouped: dict[str, list[Span]] = defaultdict(list)
    for path in trace_files(paths):
        document = read_trace_document(path)
        try:
            kind = trace_format(document)
        except AtlasInputError as exc:
            raise AtlasInputError(path, exc.problem) from None
        if kind == "jaeger":
            parsed = jaeger.parse_traces(str(path), document)
            count = len(parsed)
            traces.extend(parsed)
        else:
            reader = otlp.span_records if kind == "otlp" else zipkin.span_records
            records = reader(str(path), document)
            count = len(records)
            for trace_id, span in records:
                grouped[trace_id].append(span)
        if not count:
            warn_data(path, "holds no traces: the APIs it should cover get no call graph and no latency prediction")
    traces.extend(assemble_all(", ".join(str(p) for p in paths), grouped))
    if not traces:
        raise AtlasInputError(", ".join(str(p) for p in paths), "no traces found")
    return traces

