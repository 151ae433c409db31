"""Jaeger JSON traces (UI export or HTTP API response) -> validated Trace objects."""

from __future__ import annotations

from typing import Any

from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.traces import Span, Trace, assemble, payload_sizes

COMPONENT_TAG = "container.name"
KIND_TAG = "span.kind"
PEER_TAGS = ("peer.service", "server.address", "net.peer.name")


def _tags(entry: dict[str, Any]) -> dict[str, Any]:
    return {tag.get("key"): tag.get("value") for tag in entry.get("tags") or [] if isinstance(tag, dict)}


def _process_components(source: str, trace: dict[str, Any]) -> dict[str, str]:
    processes = trace.get("processes")
    if not isinstance(processes, dict):
        raise AtlasInputError(source, f"trace {trace.get('traceID')} has no 'processes' object")
    components: dict[str, str] = {}
    for pid, process in processes.items():
        name = _tags(process).get(COMPONENT_TAG)
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
    spans = []
    for raw in trace["spans"]:
        try:
            tags = _tags(raw)
            peer = next((str(tags[key]) for key in PEER_TAGS if tags.get(key)), None)
            spans.append(Span(span_id=str(raw["spanID"]), parent_id=_parent_of(raw), operation=str(raw["operationName"]),
                              start_us=int(raw["startTime"]), duration_us=int(raw["duration"]),
                              component=components[raw["processID"]],
                              kind=str(tags[KIND_TAG]).lower() if tags.get(KIND_TAG) else None, peer=peer,
                              **payload_sizes(tags)))
        except KeyError as exc:
            raise AtlasInputError(source, f"trace {trace_id}: span lacks field or process {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise AtlasInputError(source, f"trace {trace_id}: span has a malformed time or size: {exc}") from exc
    return assemble(source, trace_id, spans)


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
