"""Traces -> per-API call graphs of components.

A span's component is the workload that recorded it. A client span whose operation matches a
database rule (e.g. `Mongo*` recorded by `user-service`) is a call to that database component; a
client span that names its peer (OpenTelemetry peer.service / server.address, Zipkin remoteEndpoint)
and has no child in another component is a call to that peer (a store, or an untraced service).
Children listed in `async_operations`, or that end after their parent (by more than
`background_overhang_us`), are background work.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterator

from hybridatlas.config import AtlasConfig
from hybridatlas.errors import warn_data
from hybridatlas.ingest.traces import Span, Trace

Edge = tuple[str, str]


class DatabaseMapper:
    """Maps (calling component, operation) to a database component by ordered rules."""

    def __init__(self, rules: list[dict[str, str]]) -> None:
        self.rules = rules

    def target(self, span: Span) -> str | None:
        """The untraced component (database, queue, service) a client span calls, or None."""
        caller, operation = span.component, span.operation
        for rule in self.rules:
            if fnmatchcase(caller, rule["caller"]) and operation.startswith(rule["operation_prefix"]):
                service = caller[: -len("-service")] if caller.endswith("-service") else caller
                return rule["component"].replace("{service}", service)
        if span.kind in ("client", "producer") and span.peer and span.peer != caller and \
                all(child.component == caller for child in span.children):
            return span.peer
        return None


@dataclass(frozen=True)
class Hop:
    """One component-to-component call carried by a span: `edge` = (caller, callee). `warm`: the same
    caller called the same callee shortly before in the same request, so the connection is in use.
    `request_bytes` / `response_bytes`: the call's sizes where its spans record them, else None."""

    edge: Edge
    operation: str
    warm: bool = False
    request_bytes: int | None = None
    response_bytes: int | None = None


def is_background(child: Span, parent: Span, config: AtlasConfig) -> bool:
    """Async consumer spans and children that outlive their parent do not add to its latency.

    The server side of an RPC (a server span under a client span) is never background, even when it
    ends after its client span: the server ends its span after writing the response, which the client
    may already have read, and clocks of different hosts disagree."""
    if any(fnmatchcase(child.operation, pattern) for pattern in config.async_operations) or child.kind == "consumer":
        return True
    if child.kind == "server" and parent.kind == "client":
        return False
    return child.end_us > parent.end_us + config.background_overhang_us


def span_hops(span: Span, parent: Span | None, gateway: str, mapper: DatabaseMapper,
              warm: frozenset[tuple[str, Edge]] = frozenset()) -> list[Hop]:
    """Calls a span stands for: the RPC into its component (from the parent, or the gateway for the
    root) and, for a database client span, the call to the database. A span whose parent is a
    database client span (a message-queue consumer) is itself a client of that database.
    A call's sizes are those its span records; an RPC's, those of the server span, else of the client
    span that made it."""
    hops = []
    parent_target = mapper.target(parent) if parent is not None else None
    database = mapper.target(span)
    if parent_target is not None:
        edge = (span.component, parent_target)
        hops.append(Hop(edge, span.operation, (span.span_id, edge) in warm))
    else:
        caller = parent.component if parent is not None else gateway
        if caller != span.component:
            edge = (caller, span.component)
            sized = span if database is None and _has_sizes(span) else \
                parent if parent is not None and parent.kind == "client" and _has_sizes(parent) else None
            hops.append(Hop(edge, span.operation, (span.span_id, edge) in warm,
                            *((sized.request_bytes, sized.response_bytes) if sized else ())))
    if database is not None:
        edge = (span.component, database)
        hops.append(Hop(edge, span.operation, (span.span_id, edge) in warm, span.request_bytes, span.response_bytes))
    return hops


def _has_sizes(span: Span) -> bool:
    return span.request_bytes is not None or span.response_bytes is not None


INITIAL_WINDOW_BYTES = 10 * 1448  # Linux's initial congestion window (RFC 6928: 10 segments of a 1500-byte MTU)


def warm_calls(trace: Trace, config: AtlasConfig, mapper: DatabaseMapper) -> frozenset[tuple[str, Edge]]:
    """(span id, edge) of calls that follow another call on the same edge in the same request by less
    than config.idle_after_s, on a congestion window opened wide enough: slow start grows the window by
    the bytes acknowledged, so a call whose recorded payload exceeds the initial window plus the largest
    payload recorded before it on the edge in the request still pays slow start (a GridFS read's first
    chunk after its small file document). Calls without recorded sizes count as fitting."""
    last_end: dict[Edge, int] = {}
    largest: dict[Edge, int] = {}
    warm = set()
    for span, parent, _ in sorted(walk(trace, config), key=lambda item: item[0].start_us):
        for hop in span_hops(span, parent, config.gateway, mapper):
            previous = last_end.get(hop.edge)
            payload = max(hop.request_bytes or 0, hop.response_bytes or 0)
            fits = payload <= INITIAL_WINDOW_BYTES + largest.get(hop.edge, 0)
            if previous is not None and span.start_us - previous < config.idle_after_s * 1e6 and fits:
                warm.add((span.span_id, hop.edge))
            last_end[hop.edge] = max(previous or 0, span.end_us)
            largest[hop.edge] = max(largest.get(hop.edge, 0), payload)
    return frozenset(warm)


def walk(trace: Trace, config: AtlasConfig) -> Iterator[tuple[Span, Span | None, bool]]:
    """(span, parent, in_background) for every span, parents before children."""
    stack: list[tuple[Span, Span | None, bool]] = [(trace.root, None, False)]
    while stack:
        span, parent, background = stack.pop()
        yield span, parent, background
        for child in span.children:
            stack.append((child, span, background or is_background(child, span, config)))


@dataclass
class ApiCallGraph:
    """Mean calls per request of one API on each edge; background edges are kept apart."""

    api: str
    traces: int
    calls: dict[Edge, float] = field(default_factory=dict)
    background: set[Edge] = field(default_factory=set)

    @property
    def components(self) -> set[str]:
        return {component for edge in self.calls for component in edge}

    def uses(self, component: str) -> bool:
        return component in self.components


def build_call_graphs(traces: list[Trace], config: AtlasConfig) -> dict[str, ApiCallGraph]:
    """One call graph per API (root operation name)."""
    mapper = DatabaseMapper(config.database_rules)
    by_api: dict[str, list[Trace]] = defaultdict(list)
    for trace in traces:
        by_api[trace.api].append(trace)
    graphs = {}
    for api, api_traces in sorted(by_api.items()):
        counts: dict[Edge, int] = defaultdict(int)
        background_counts: dict[Edge, int] = defaultdict(int)
        for trace in api_traces:
            for span, parent, background in walk(trace, config):
                for hop in span_hops(span, parent, config.gateway, mapper):
                    counts[hop.edge] += 1
                    if background:
                        background_counts[hop.edge] += 1
        graph = ApiCallGraph(api, len(api_traces))
        graph.calls = {edge: count / len(api_traces) for edge, count in sorted(counts.items())}
        graph.background = {edge for edge, count in background_counts.items() if count == counts[edge]}
        graphs[api] = graph
    return graphs


def check_known_components(graphs: dict[str, ApiCallGraph], known: set[str], source: str) -> None:
    """Warn about call-graph components that appear in none of the `known` resource series
    (typo-prone DB rules, or pods outside the scraped namespace)."""
    unknown = sorted({c for g in graphs.values() for c in g.components} - known)
    if known and unknown:
        warn_data(source, f"components {unknown} appear in the traces but in no resource metric series; "
                  f"check database_rules and the component names")
