"""Prometheus metrics of one executor server, in a registry of its own, served over HTTP.

Per request (labels: tenant, op family, direction, outcome): ``symbiosis_requests_total`` and the
``symbiosis_request_seconds`` latency histogram (server side: decode to reply). A request costs a
few counter increments under one lock (its histogram bucket found by bisection); labels are
resolved and series built only at scrape time, off the request path. Per GEMM, read from
the executor's batch statistics at scrape time: ``symbiosis_gemms_total``,
``symbiosis_gemm_rows_total``, ``symbiosis_gemm_requests_total`` and ``symbiosis_rows_per_gemm``
(rows per GEMM is ``rate(gemm_rows_total) / rate(gemms_total)`` over any window). Gauges: queue
depth and open sessions per tenant. Label values stay bounded whatever clients send: op families
fold layer indices (``model.layers.*.mlp.up_proj``), an op the executor does not serve is labelled
``unknown``, tenants come from the tenants file and outcomes are status code names.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..executor import BaseExecutor
from ..executor.stats import op_family
from ..protocol import Direction
from .tenancy import TenantState

#: Latency buckets (seconds): 50 us to 10 s.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
#: The label of an op the executor does not serve, and of an invalid direction.
UNKNOWN = "unknown"


class _BatchCollector(Collector):
    """Exports the executor's GEMM counters per op family and direction at scrape time."""

    def __init__(self, executor: BaseExecutor) -> None:
        self._executor = executor

    def collect(self) -> Iterable:
        labels = ["op", "direction"]
        gemms = CounterMetricFamily("symbiosis_gemms", "GEMMs run by the executor", labels=labels)
        rows = CounterMetricFamily("symbiosis_gemm_rows", "Rows computed by GEMMs", labels=labels)
        requests = CounterMetricFamily("symbiosis_gemm_requests", "Requests served by GEMMs", labels=labels)
        shared = CounterMetricFamily("symbiosis_shared_gemms", "GEMMs that served more than one client", labels=labels)
        per_gemm = GaugeMetricFamily("symbiosis_rows_per_gemm", "Mean rows per GEMM since start", labels=labels)
        for (family, direction), summary in self._executor.stats.by_family().items():
            key = [family, direction.name.lower()]
            gemms.add_metric(key, summary["gemms"])
            rows.add_metric(key, summary["rows"])
            requests.add_metric(key, summary["requests"])
            shared.add_metric(key, summary["shared_gemm_fraction"] * summary["gemms"])
            per_gemm.add_metric(key, summary["rows_per_gemm"])
        yield from (gemms, rows, requests, shared, per_gemm)


class _RequestCollector(Collector):
    """Request counts and latency histograms per (tenant, op, direction, outcome), kept as plain
    counters; exported per op family at scrape time."""

    def __init__(self, ops: frozenset[str]) -> None:
        self._ops = ops
        self._lock = threading.Lock()
        # (tenant, op, direction) -> [bucket counts..., count beyond the last bucket, sum of seconds]
        self._ok: dict[tuple[str, str, int], list[float]] = {}
        self._failed: Counter[tuple[str, str, int, str]] = Counter()

    def observe(self, tenant: str, op: str, direction: int, outcome: str, seconds: float) -> None:
        if outcome == "ok":
            with self._lock:
                counts = self._ok.get((tenant, op, direction))
                if counts is None:
                    counts = self._ok[tenant, op, direction] = [0.0] * (len(LATENCY_BUCKETS) + 2)
                counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                counts[-1] += seconds
        else:  # client-chosen op names and directions must not grow the server: fold the unknown ones
            key = (tenant, op if op in self._ops else UNKNOWN, direction if direction in (0, 1) else -1, outcome)
            with self._lock:
                self._failed[key] += 1

    def collect(self) -> Iterable:
        labels = ["tenant", "op", "direction"]
        requests = CounterMetricFamily("symbiosis_requests", "Op requests by outcome", labels=[*labels, "outcome"])
        latency = HistogramMetricFamily("symbiosis_request_seconds", "Server-side latency of op requests (decode to reply)", labels=labels)
        with self._lock:
            ok = {key: list(counts) for key, counts in self._ok.items()}
            failed = dict(self._failed)
        families: dict[tuple[str, str, str], list[float]] = {}
        for (tenant, op, direction), counts in ok.items():
            folded = families.setdefault(_labels(tenant, op, direction), [0.0] * len(counts))
            for i, value in enumerate(counts):
                folded[i] += value
        for key, counts in sorted(families.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*LATENCY_BUCKETS, math.inf), counts[:-1], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
            requests.add_metric([*key, "ok"], cumulative)
            latency.add_metric(list(key), buckets, counts[-1])
        failures: Counter[tuple[str, str, str, str]] = Counter()
        for (tenant, op, direction, outcome), count in failed.items():
            failures[(*_labels(tenant, op, direction), outcome)] += count
        for key, count in sorted(failures.items()):
            requests.add_metric(list(key), count)
        yield from (requests, latency)


def _labels(tenant: str, op: str, direction: int) -> tuple[str, str, str]:
    return tenant, op_family(op), Direction(direction).name.lower() if direction in (0, 1) else UNKNOWN


class ServerMetrics:
    """The metrics of one server; ``observe`` is called once per request."""

    def __init__(self, executor: BaseExecutor, tenants: list[TenantState]) -> None:
        self.registry = CollectorRegistry()
        self._requests = _RequestCollector(frozenset(executor.spec().ops))
        self.registry.register(self._requests)
        Gauge("symbiosis_queue_depth", "Requests waiting for the executor", registry=self.registry).set_function(executor.queue_depth)
        sessions = Gauge("symbiosis_sessions", "Open sessions per tenant", ["tenant"], registry=self.registry)
        for state in tenants:
            sessions.labels(state.name).set_function(state.open_sessions)
        self.registry.register(_BatchCollector(executor))
        self._http = None

    def observe(self, tenant: str, op: str, direction: Direction | int, outcome: str, seconds: float) -> None:
        """Account one request (``outcome``: ``ok`` or a status code name)."""
        self._requests.observe(tenant, op, int(direction), outcome, seconds)

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: any free port); return the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
