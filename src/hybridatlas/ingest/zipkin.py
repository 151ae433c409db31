"""Zipkin v2 JSON: a list of spans (GET /api/v2/trace/{id}) or a list of such lists (/api/v2/traces).

Timestamps and durations are microseconds. A span's component is localEndpoint.serviceName; a client
span's peer is remoteEndpoint.serviceName (or its peer.service tag). With B3 "shared" spans the client
and server sides carry one id; the server side (shared: true) becomes a child of the client side, and
spans of the server's service that name that id as parent hang under the server side.
"""

from __future__ import annotations

from typing import Any

from hybridatlas.errors import AtlasInputError
from hybridatlas.ingest.traces import Span, payload_sizes

SERVER_SUFFIX = ":server"


def _span(source: str, raw: dict[str, Any]) -> tuple[str, Span, bool]:
    try:
        local = (raw.get("localEndpoint") or {}).get("serviceName")
        if not local:
            raise AtlasInputError(source, f"span {raw.get('id')} has no localEndpoint.serviceName naming its component")
        tags = raw.get("tags") or {}
        peer = tags.get("peer.service") or (raw.get("remoteEndpoint") or {}).get("serviceName")
        kind = raw.get("kind")
        return str(raw["traceId"]), Span(
            span_id=str(raw["id"]), parent_id=str(raw["parentId"]) if raw.get("parentId") else None,
            operation=str(raw.get("name") or ""), start_us=int(raw["timestamp"]), duration_us=int(raw.get("duration", 0)),
            component=str(local), kind=str(kind).lower() if kind else None, peer=str(peer) if peer else None,
            **payload_sizes(tags)), \
            bool(raw.get("shared"))
    except KeyError as exc:
        raise AtlasInputError(source, f"span lacks field {exc}: {str(raw)[:200]}") from exc
    except (TypeError, ValueError) as exc:
        raise AtlasInputError(source, f"span has a malformed value ({exc}): {str(raw)[:200]}") from exc


def span_records(source: str, document: Any) -> list[tuple[str, Span]]:
    """(trace id, span) for every span of a Zipkin v2 document."""
    if not isinstance(document, list):
        raise AtlasInputError(source, "a Zipkin v2 document is a list of spans or a list of traces")
    flat = [span for item in document for span in (item if isinstance(item, list) else [item])]
    parsed = [_span(source, raw) for raw in flat if isinstance(raw, dict)]
    shared_servers = {(trace_id, span.span_id): span.component for trace_id, span, shared in parsed if shared}
    records = []
    for trace_id, span, shared in parsed:
        if shared:
            span.parent_id, span.span_id = span.span_id, span.span_id + SERVER_SUFFIX
        elif span.parent_id and shared_servers.get((trace_id, span.parent_id)) == span.component:
            span.parent_id += SERVER_SUFFIX
        records.append((trace_id, span))
    return records
