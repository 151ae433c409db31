"""Network footprint: request/response bytes per API call on every edge, by non-negative least squares.

For an edge e and direction d, bytes_e,d(t) = sum_a x[a] * calls_a(t) + background * window, x >= 0,
over the aligned trailing windows. Only APIs whose call graphs use the edge (either direction) enter
the regression; an edge no trace explains is regressed on all APIs. A zero sample while one of the
edge's APIs had calls cannot be a true zero (traffic happened), so it is treated as a missing series.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.series import SeriesTable, align
from hybridatlas.models.callgraph import ApiCallGraph, Edge

DIRECTIONS = ("request", "response")


@dataclass
class EdgeFit:
    """Coefficients and fit quality of one edge and direction."""

    bytes_per_call: dict[str, float]
    background_bytes_per_s: float
    r2: float
    relative_error: float
    samples: int
    dropped_zero_samples: int


@dataclass
class Footprint:
    """Bytes per call per (API, edge, direction), learned from per-edge byte and per-API call series."""

    apis: list[str]
    edges: list[Edge]
    fits: dict[tuple[Edge, str], EdgeFit] = field(default_factory=dict)
    unexplained_edges: list[Edge] = field(default_factory=list)

    def bytes_per_request(self, api: str, edge: Edge) -> tuple[float, float]:
        """(request, response) bytes one call of `api` moves over `edge` in total; (0, 0) if unknown."""
        return tuple(  # type: ignore[return-value]
            self.fits[(edge, d)].bytes_per_call.get(api, 0.0) if (edge, d) in self.fits else 0.0
            for d in DIRECTIONS)

    def background_bytes_per_s(self, edge: Edge) -> tuple[float, float]:
        return tuple(  # type: ignore[return-value]
            self.fits[(edge, d)].background_bytes_per_s if (edge, d) in self.fits else 0.0 for d in DIRECTIONS)

    def matrix(self, direction: str) -> np.ndarray:
        """(edges x APIs) bytes per call for one direction."""
        out = np.zeros((len(self.edges), len(self.apis)))
        for i, edge in enumerate(self.edges):
            fit = self.fits.get((edge, direction))
            if fit:
                out[i] = [fit.bytes_per_call.get(api, 0.0) for api in self.apis]
        return out

    def quality_rows(self) -> list[dict[str, object]]:
        """One row per edge and direction for reports."""
        return [{"source": edge[0], "destination": edge[1], "direction": direction, "r2": fit.r2,
                 "relative_error": fit.relative_error, "samples": fit.samples,
                 "dropped_zero_samples": fit.dropped_zero_samples,
                 "background_bytes_per_s": fit.background_bytes_per_s,
                 "bytes_per_call": {api: v for api, v in fit.bytes_per_call.items() if v > 0}}
                for (edge, direction), fit in sorted(self.fits.items())]


def candidate_apis(edge: Edge, graphs: dict[str, ApiCallGraph]) -> list[str]:
    """APIs whose call graph holds the edge in either direction."""
    reverse = (edge[1], edge[0])
    return [api for api, graph in graphs.items() if edge in graph.calls or reverse in graph.calls]


def fit_edge(y: np.ndarray, calls: np.ndarray, apis: list[str], active: np.ndarray, window_s: float) -> EdgeFit:
    """NNLS of one byte series on call counts of `apis` plus a constant background term."""
    valid = ~np.isnan(y) & ~np.isnan(calls).any(axis=1)
    absent = valid & (y == 0) & active
    use = valid & ~absent
    if use.sum() < len(apis) + 1:
        raise ValueError(f"only {int(use.sum())} usable samples for {len(apis) + 1} unknowns")
    design = np.column_stack([calls[use], np.ones(int(use.sum()))])
    target = y[use]
    scale = np.maximum(design.max(axis=0), 1e-12)
    coef, _ = nnls(design / scale, target, maxiter=50 * design.shape[1])
    coef = coef / scale
    predicted = design @ coef
    residual = target - predicted
    total = float(((target - target.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else (1.0 if np.allclose(residual, 0) else 0.0)
    magnitude = float(np.abs(target).sum())
    relative_error = float(np.abs(residual).sum()) / magnitude if magnitude > 0 else 0.0
    return EdgeFit({api: float(c) for api, c in zip(apis, coef[:-1])}, float(coef[-1]) / window_s,
                   r2, relative_error, int(use.sum()), int(absent.sum()))


def check_coverage(graphs: dict[str, ApiCallGraph], apis: list[str], edges: list[Edge],
                   calls_source: str, bytes_source: str) -> None:
    """Warn where traces, call counts and byte series do not cover each other (never silently zero)."""
    untraced = sorted(set(graphs) - set(apis))
    if untraced:
        warn_data(calls_source, f"APIs {untraced} have traces but no call-count series; their footprint is zero")
    traceless = sorted(set(apis) - set(graphs))
    if traceless:
        warn_data(calls_source, f"APIs {traceless} have call counts but no traces: they get no call graph and no "
                  "latency prediction, and the edges they use are regressed on all APIs")
    unmeasured = sorted({edge for graph in graphs.values() for edge in graph.calls} - set(edges))
    if unmeasured:
        warn_data(bytes_source, "call-graph edges " + ", ".join(f"{a} -> {b}" for a, b in unmeasured)
                  + " have no byte series: their bytes per call are taken as zero, so egress and WAN transfer "
                  "time over them are understated")


def learn_footprint(request: SeriesTable, response: SeriesTable, api_calls: SeriesTable,
                    graphs: dict[str, ApiCallGraph], window_s: float) -> Footprint:
    """Fit every edge of the byte tables; APIs are the call-count columns."""
    if set(request.names) != set(response.names):
        warn_data(f"{request.source} / {response.source}", "request and response series cover different edges; "
                  "an edge missing one direction gets zero bytes there")
    request, calls_r = align(request, api_calls)
    response, calls_s = align(response, api_calls)
    apis = [str(a) for a in api_calls.names]
    edges = sorted({tuple(e) for e in request.names} | {tuple(e) for e in response.names})  # type: ignore[misc]
    check_coverage(graphs, apis, edges, api_calls.source, request.source)
    footprint = Footprint(apis, edges)  # type: ignore[arg-type]
    for edge in edges:
        candidates = [a for a in candidate_apis(edge, graphs) if a in apis] or apis
        if candidates is apis:
            footprint.unexplained_edges.append(edge)
        for direction, table, calls in (("request", request, calls_r), ("response", response, calls_s)):
            if edge not in table.names:
                continue
            columns = [apis.index(a) for a in candidates]
            x = calls.values[:, columns]
            active = np.nan_to_num(x).sum(axis=1) > 0
            try:
                footprint.fits[(edge, direction)] = fit_edge(table.column(edge), x, candidates, active, window_s)
            except ValueError as exc:
                warn_data(table.source, f"edge {edge[0]} -> {edge[1]} ({direction}): cannot fit: {exc}")
    if footprint.unexplained_edges:
        warn_data(request.source, f"edges {footprint.unexplained_edges} appear in no trace; regressed on all APIs")
    if not footprint.fits:
        raise AtlasInputError(request.source, "no edge could be fitted")
    return footprint
