"""Jaeger JSON traces (UI export or HTTP API response) -> validated Trace objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.files import read_json

COMPONENT_TAG = "container.name"


@dataclass
class Span:
    """One span; times in microseconds. `component` comes from the process tags."""

    span_id: str
    parent_id: str | None
    operation: str
    start_us: int
    duration_us: int
    component: str
    children: list["Span"] = field(default_factory=list)

    @property
    def end_us(self) -> int:
        return self.start_us + self.duration_us


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


def _process_components(source: str, trace: dict[str, Any]) -> dict[str, str]:
    processes = trace.get("processes")
    if not isinstance(processes, dict):
        raise AtlasInputError(source, f"trace {trace.get('traceID')} has no 'processes' object")
    components: dict[str, str] = {}
    for pid, process in processes.items():
        tags = {tag.get("key"): tag.get("value") for tag in process.get("tags", []) if isinstance(tag, dict)}
        name = tags.get(COMPONENT_TAG)
        if not name:
            name = process.get("serviceName")
            if not name:
                raise AtlasInputError(source, f"process {pid} has neither tag '{COMPONENT_TAG}' nor serviceName")
            warn_data(source, f"process {pid} has no '{COMPONENT_TAG}' tag; using serviceName '{name}'")
        components[pid] = str(name)
    return components


def _parent_of(span: dict[str, Any]) -> str | None:
    for ref in span.get("references") or []:
        if ref.get("refType", "CHILD_OF") in ("CHILD_OF", "FOLLOWS_FROM"):
            return str(ref["spanID"])
    return None


def parse_trace(source: str, trace: dict[str, Any]) -> Trace:
    """Build a span tree from one Jaeger trace object; raises AtlasInputError if it is unusable."""
    if not isinstance(trace, dict) or not isinstance(trace.get("spans"), list):
        raise AtlasInputError(source, "a trace entry is not an object with a 'spans' list")
    trace_id = str(trace.get("traceID", "?"))
    components = _process_components(source, trace)
    spans: dict[str, Span] = {}
    for raw in trace["spans"]:
        try:
            span = Span(
                span_id=str(raw["spanID"]),
                parent_id=_parent_of(raw),
                operation=str(raw["operationName"]),
                start_us=int(raw["startTime"]),
                duration_us=int(raw["duration"]),
                component=components[raw["processID"]],
            )
        except KeyError as exc:
            raise AtlasInputError(source, f"trace {trace_id}: span lacks field or process {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise AtlasInputError(source, f"trace {trace_id}: span has a non-numeric time: {exc}") from exc
        if span.duration_us < 0:
            raise AtlasInputError(source, f"trace {trace_id}: span {span.span_id} has negative duration")
        spans[span.span_id] = span
    roots = []
    for span in spans.values():
        if span.parent_id is None:
            roots.append(span)
        elif span.parent_id in spans:
            spans[span.parent_id].children.append(span)
        else:
            raise AtlasInputError(source, f"trace {trace_id}: span {span.span_id} references missing parent {span.parent_id}")
    if len(roots) != 1:
        raise AtlasInputError(source, f"trace {trace_id}: expected one root span, found {len(roots)}")
    for span in spans.values():
        span.children.sort(key=lambda child: (child.start_us, child.span_id))
    return Trace(trace_id, roots[0], list(spans.values()))


def parse_traces(source: str, document: Any) -> list[Trace]:
    """Parse a Jaeger export / API response ({"data": [trace, ...]}); bad traces are skipped with a warning."""
    if isinstance(document, dict) and "data" in document:
        items = document["data"]
    elif isinstance(document, list):
        items = document
    else:
        raise AtlasInputError(source, "not a Jaeger trace document: expected {'data': [traces]} or a list of traces")
    if not isinstance(items, list):
        raise AtlasInputError(source, "'data' is not a list of traces")
    traces: list[Trace] = []
    for item in items:
        try:
            traces.append(parse_trace(source, item))
        except AtlasInputError as exc:
            warn_data(source, f"skipped a trace: {exc.problem}")
    if items and not traces:
        raise AtlasInputError(source, "no usable trace in the file")
    return traces


def trace_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to their *.json / *.json.gz files; keep files as given."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(list(path.glob("*.json")) + list(path.glob("*.json.gz")))
            if not found:
                raise AtlasInputError(path, "directory holds no *.json trace files")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise AtlasInputError(path, "trace file not found")
    return files


def load_traces(paths: Iterable[str | Path]) -> list[Trace]:
    """All traces from Jaeger JSON files or directories of them; a file holding no trace is warned about."""
    traces: list[Trace] = []
    for path in trace_files(paths):
        parsed = parse_traces(str(path), read_json(path))
        if not parsed:
            warn_data(path, "holds no traces: the APIs it should cover get no call graph and no latency prediction")
        traces.extend(parsed)
    if not traces:
        raise AtlasInputError(", ".join(str(p) for p in paths), "no traces found")
    return traces
