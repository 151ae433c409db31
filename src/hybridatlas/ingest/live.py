"""Live clients: Prometheus HTTP API (query_range) and Jaeger query HTTP API (/api/services, /api/traces)."""

from __future__ import annotations

from typing import Any

import requests

from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.jaeger import parse_traces
from hybridatlas.ingest.traces import Trace
from hybridatlas.ingest.prometheus import KeyFn, parse_query_range
from hybridatlas.ingest.series import SeriesTable, merge_tables

MAX_POINTS_PER_QUERY = 10_000  # Prometheus refuses more than 11,000 points per series


def _get_json(url: str, params: dict[str, Any], timeout_s: float) -> Any:
    try:
        response = requests.get(url, params=params, timeout=timeout_s)
    except requests.RequestException as exc:
        raise AtlasInputError(url, f"cannot reach the server: {exc}") from exc
    try:
        document = response.json()
    except ValueError as exc:
        raise AtlasInputError(url, f"HTTP {response.status_code}: response is not JSON: {response.text[:200]!r}") from exc
    if response.status_code != 200:
        raise AtlasInputError(url, f"HTTP {response.status_code}: {document}")
    return document


class PrometheusClient:
    """Range queries against a Prometheus server's HTTP API."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def source(self, query: str) -> str:
        """How messages name one query."""
        return f"{self.base_url}/api/v1/query_range?query={query}"

    def _chunks(self, query: str, start: float, end: float, step_s: float, key: KeyFn) -> list[SeriesTable]:
        """The non-empty results of `query` over [start, end], split to respect the points limit."""
        url = f"{self.base_url}/api/v1/query_range"
        chunks: list[SeriesTable] = []
        chunk_start = start
        while chunk_start <= end:
            chunk_end = min(end, chunk_start + step_s * (MAX_POINTS_PER_QUERY - 1))
            params = {"query": query, "start": chunk_start, "end": chunk_end, "step": step_s}
            document = _get_json(url, params, self.timeout_s)
            if document.get("data", {}).get("result"):
                chunks.append(parse_query_range(self.source(query), document, key))
            chunk_start = chunk_end + step_s
        return chunks

    def query_range(self, query: str, start: float, end: float, step_s: float, key: KeyFn) -> SeriesTable:
        """Evaluate `query` over [start, end]; raises if it returns no series."""
        chunks = self._chunks(query, start, end, step_s, key)
        if not chunks:
            raise AtlasInputError(self.source(query), f"no series between {start} and {end}")
        return merge_tables(self.source(query), chunks)

    def query_sum(self, queries: list[str], start: float, end: float, step_s: float, key: KeyFn) -> SeriesTable:
        """Several queries added up per series key (e.g. TCP and HTTP byte counters). A query that returns
        nothing is dropped with a warning; raises only if none returns anything."""
        results = {query: self._chunks(query, start, end, step_s, key) for query in queries}
        kept = [query for query, chunks in results.items() if chunks]
        if not kept:
            raise AtlasInputError(" + ".join(self.source(q) for q in queries), f"no series between {start} and {end}")
        for query in (q for q in results if q not in kept):
            warn_data(self.source(query), f"no series between {start} and {end}; left out of the sum")
        return merge_tables(" + ".join(self.source(q) for q in kept), [c for q in kept for c in results[q]])


class JaegerClient:
    """Jaeger query service HTTP API: GET /api/services and GET /api/traces?service=..."""

    def __init__(self, base_url: str, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def services(self) -> list[str]:
        url = f"{self.base_url}/api/services"
        document = _get_json(url, {}, self.timeout_s)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise AtlasInputError(url, "response has no 'data' list of services")
        return [str(name) for name in data]

    def traces(self, service: str, start_us: int | None = None, end_us: int | None = None,
               limit: int = 1000, operation: str | None = None, lookback: str | None = None) -> list[Trace]:
        """Traces that touch `service` (Jaeger returns each trace whole)."""
        url = f"{self.base_url}/api/traces"
        params: dict[str, Any] = {"service": service, "limit": limit}
        if start_us is not None:
            params["start"] = start_us
        if end_us is not None:
            params["end"] = end_us
        if operation:
            params["operation"] = operation
        if lookback:
            params["lookback"] = lookback
        document = _get_json(url, params, self.timeout_s)
        if isinstance(document, dict) and document.get("errors"):
            raise AtlasInputError(url, f"Jaeger reported errors: {document['errors']}")
        return parse_traces(f"{url}?service={service}", document)

    def all_traces(self, start_us: int | None = None, end_us: int | None = None, limit: int = 1000) -> list[Trace]:
        """Traces of every service, deduplicated by trace id; warns naming the services that hit `limit`."""
        seen: dict[str, Trace] = {}
        capped = []
        for service in self.services():
            traces = self.traces(service, start_us, end_us, limit)
            if len(traces) >= limit:
                capped.append(service)
            for trace in traces:
                seen.setdefault(trace.trace_id, trace)
        if not seen:
            raise AtlasInputError(self.base_url, "Jaeger returned no traces for any service")
        if capped:
            warn_data(self.base_url, f"services {capped} returned the limit of {limit} traces: more may exist in "
                      "the range and were not fetched, so calls counted from traces are understated; raise "
                      "live.jaeger_limit (--jaeger-limit) or set live.api_calls")
        return list(seen.values())
