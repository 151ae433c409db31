"""OpenTelemetry traces as OTLP JSON: what the collector's file exporter writes (one
ExportTraceServiceRequest object per line: resourceSpans -> scopeSpans -> spans), or one such object
per file. IDs are hex (the OTLP/JSON rule) or base64 (plain protobuf JSON mapping); times are
nanoseconds as strings or numbers; span kinds are integers or SPAN_KIND_* names.

A span's component is the first resource attribute of COMPONENT_KEYS that is set (the Kubernetes
workload when the k8s attributes processor added it, else service.name). A client span's peer is
its peer.service, server.address or net.peer.name attribute; its payload sizes come from the
attributes `traces.payload_sizes` reads.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from hybridatlas.errors import AtlasInputError
from hybridatlas.ingest.traces import Span, payload_sizes

COMPONENT_KEYS = ("k8s.deployment.name", "k8s.statefulset.name", "k8s.daemonset.name", "k8s.container.name",
                  "container.name", "service.name")
PEER_KEYS = ("peer.service", "server.address", "net.peer.name")
KINDS = {0: None, 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def attribute_value(value: dict[str, Any]) -> Any:
    """The Python value of an OTLP AnyValue ({"stringValue": ...}, {"intValue": "3"}, ...)."""
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    if "arrayValue" in value:
        return [attribute_value(v) for v in value["arrayValue"].get("values", [])]
    return None


def attributes(entries: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {entry["key"]: attribute_value(entry.get("value") or {}) for entry in entries or [] if "key" in entry}


def hex_id(text: str, length: int) -> str:
    """An OTLP id as lowercase hex: hex as given, or decoded from base64; '' stays ''."""
    if not text:
        return ""
    if len(text) == length and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()
    try:
        return base64.b64decode(text, validate=True).hex()
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"id {text!r} is neither hex nor base64") from exc


def span_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return value.removeprefix("SPAN_KIND_").lower() if value.removeprefix("SPAN_KIND_") != "UNSPECIFIED" else None
    return KINDS.get(int(value or 0))


def _records(source: str, request: dict[str, Any]) -> list[tuple[str, Span]]:
    out = []
    for resource_spans in request.get("resourceSpans") or []:
        resource = attributes((resource_spans.get("resource") or {}).get("attributes"))
        component = next((str(resource[k]) for k in COMPONENT_KEYS if resource.get(k)), None)
        if component is None:
            raise AtlasInputError(source, f"a resource has none of the attributes {list(COMPONENT_KEYS)} naming its component")
        for scope_spans in resource_spans.get("scopeSpans") or resource_spans.get("instrumentationLibrarySpans") or []:
            for raw in scope_spans.get("spans") or []:
                try:
                    trace_id = hex_id(str(raw["traceId"]), 32)
                    start, end = int(raw["startTimeUnixNano"]), int(raw["endTimeUnixNano"])
                    tags = attributes(raw.get("attributes"))
                    out.append((trace_id, Span(
                        span_id=hex_id(str(raw["spanId"]), 16), parent_id=hex_id(str(raw.get("parentSpanId") or ""), 16) or None,
                        operation=str(raw["name"]), start_us=start // 1000, duration_us=end // 1000 - start // 1000,
                        component=component, kind=span_kind(raw.get("kind")),
                        peer=next((str(tags[k]) for k in PEER_KEYS if tags.get(k)), None), **payload_sizes(tags))))
                except KeyError as exc:
                    raise AtlasInputError(source, f"span lacks field {exc}: {str(raw)[:200]}") from exc
                except (TypeError, ValueError) as exc:
                    raise AtlasInputError(source, f"span has a malformed value ({exc}): {str(raw)[:200]}") from exc
    return out


def span_records(source: str, document: Any) -> list[tuple[str, Span]]:
    """(trace id, span) for every span of an OTLP JSON document or list of them (JSON lines)."""
    requests = document if isinstance(document, list) else [document]
    records = []
    for request in requests:
        if not isinstance(request, dict) or "resourceSpans" not in request:
            raise AtlasInputError(source, "an OTLP JSON line is not an object with 'resourceSpans'")
        records.extend(_records(source, request))
    return records
