"""Latency model: replay representative traces under a placement.

Children of a span that overlap in time form a stage; stages run in sequence; background children
(async consumers, children that outlive their parent) do not count. A call whose caller and callee
sit on different sides adds round_trips(operation) x RTT + bytes / bandwidth. For a span s:

    delta(s) = sum over stages k of  max(0, max over children c in k of delta(c) + delay(c) - slack(c))

where slack(c) is how much earlier c ended than its stage. With nothing moved every delay is 0, so
the replayed latency equals the measured one exactly. Traces are grouped by the shape of the calls
that can cross the WAN; the median-duration trace of each shape stands for its group, and every
measured trace's latency becomes measured + delta(its shape's representative).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hybridatlas.config import AtlasConfig
from hybridatlas.ingest.traces import Span, Trace
from hybridatlas.models.callgraph import ApiCallGraph, DatabaseMapper, Hop, is_background, span_hops, warm_calls
from hybridatlas.models.footprint import Footprint

P95 = 95.0


@dataclass
class ReplayNode:
    """A span that can gain latency: its own hops and its children grouped by stage."""

    hops: list[Hop]
    slack_us: float
    stages: list[list["ReplayNode"]] = field(default_factory=list)

    def signature(self) -> tuple:
        hops = tuple((hop.edge, hop.operation, hop.warm) for hop in self.hops)
        return hops, tuple(tuple(sorted(child.signature() for child in stage)) for stage in self.stages)


def split_stages(children: list[Span]) -> list[list[Span]]:
    """Children (sorted by start) grouped into stages of transitively overlapping intervals."""
    stages: list[list[Span]] = []
    stage_end = None
    for child in children:
        if stage_end is not None and child.start_us < stage_end:
            stages[-1].append(child)
            stage_end = max(stage_end, child.end_us)
        else:
            stages.append([child])
            stage_end = child.end_us
    return stages


def compile_span(span: Span, parent: Span | None, slack_us: float, config: AtlasConfig,
                 mapper: DatabaseMapper, warm: frozenset = frozenset()) -> ReplayNode | None:
    """ReplayNode for a span, or None if no call in its subtree can cross the boundary; `warm` holds
    the (span id, edge) calls made on a connection in use (see callgraph.warm_calls)."""
    foreground = [c for c in span.children if not is_background(c, span, config)]
    stages = []
    for stage in split_stages(foreground):
        stage_end = max(child.end_us for child in stage)
        nodes = [compile_span(child, span, stage_end - child.end_us, config, mapper, warm) for child in stage]
        kept = [node for node in nodes if node is not None]
        if kept:
            stages.append(kept)
    hops = span_hops(span, parent, config.gateway, mapper, warm)
    if not hops and not stages:
        return None
    return ReplayNode(hops, float(slack_us), stages)


@dataclass
class ApiTraces:
    """Measured root latencies of one API and the representative replay tree of each trace shape."""

    api: str
    measured_ms: np.ndarray
    representatives: list[ReplayNode | None]
    shape_of_trace: np.ndarray
    shape_weights: np.ndarray


def group_traces(api: str, traces: list[Trace], config: AtlasConfig) -> ApiTraces:
    """Group an API's traces by replay shape; each shape's representative is its median-latency trace."""
    mapper = DatabaseMapper(config.database_rules)
    measured = np.array([trace.duration_ms for trace in traces])
    compiled = [compile_span(trace.root, None, 0.0, config, mapper, warm_calls(trace, config, mapper)) for trace in traces]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, node in enumerate(compiled):
        groups[node.signature() if node else ()].append(i)
    representatives, shape_of_trace = [], np.zeros(len(traces), dtype=np.int64)
    weights = []
    for shape, members in enumerate(sorted(groups.values(), key=lambda m: (-len(m), m[0]))):
        order = sorted(members, key=lambda i: measured[i])
        representatives.append(compiled[order[len(order) // 2]])
        shape_of_trace[members] = shape
        weights.append(len(members) / len(traces))
    return ApiTraces(api, measured, representatives, shape_of_trace, np.array(weights))


HopCost = Callable[[str, Hop, bool], float]


def warm_shares(graphs: dict[str, ApiCallGraph], rates: dict[str, float], idle_after_s: float) -> dict:
    """Per edge, the chance that a request's first call on it finds the connection warm: with requests
    using the edge arriving at rate r (forecast, all APIs), the gap since the previous one exceeds
    `idle_after_s` with probability exp(-r * idle_after_s). Later calls of the same request on the edge
    are judged from the trace itself (callgraph.warm_calls), so an API counts once per request, not
    once per call."""
    per_edge: dict = defaultdict(float)
    for api, graph in graphs.items():
        for edge, calls in graph.calls.items():
            per_edge[edge] += rates.get(api, 0.0) * min(calls, 1.0)
    return {edge: 1.0 - float(np.exp(-rate * idle_after_s)) for edge, rate in per_edge.items()}


def hop_cost_fn(config: AtlasConfig, footprint: Footprint | None, graphs: dict[str, ApiCallGraph],
                kinds: dict[str, str] | None = None, rates: dict[str, float] | None = None) -> HopCost:
    """Milliseconds one crossing call adds: round trips x RTT + (request + response bytes) / bandwidth,
    the bytes the call's spans record, else the footprint's mean per call of its API on its edge;
    round trips from the first rule matching the operation and the callee's kind: the warm curve for a
    call that follows another on the same edge in the request, else the idle and warm curves weighted
    by the chance that the edge's forecast traffic kept the connection warm."""
    kinds = kinds or {}
    warm_share = warm_shares(graphs, rates or {}, config.idle_after_s)

    def cost(api: str, hop: Hop, inside_callee_span: bool = False) -> float:
        """The call's added latency; with `inside_callee_span`, only the part the callee's server span
        sees: the request arrives after its first flight, so its later round trips and its transfer
        (the response is written when the span ends)."""
        request = response = 0.0
        calls = graphs[api].calls.get(hop.edge, 0.0) if api in graphs else 0.0
        if footprint is not None and calls > 0:
            total_request, total_response = footprint.bytes_per_request(api, hop.edge)
            request, response = total_request / calls, total_response / calls
        request = request if hop.request_bytes is None else float(hop.request_bytes)
        response = response if hop.response_bytes is None else float(hop.response_bytes)
        rule = config.round_trip_rule(hop.operation, kinds.get(hop.edge[1]) or config.kind_of(hop.edge[1]))
        payload = max(request, response)
        share = 1.0 if hop.warm else warm_share.get(hop.edge, 0.0)
        if inside_callee_span:
            payload, response = request, 0.0
        round_trips = share * rule.round_trips(payload, warm=True) + (1.0 - share) * rule.round_trips(payload)
        if inside_callee_span:  # the first flight (a small request's whole cost) precedes the span
            first = share * rule.round_trips(0.0, warm=True) + (1.0 - share) * rule.round_trips(0.0)
            round_trips = max(0.0, round_trips - first)
        return round_trips * config.rtt_ms + (request + response) / config.bandwidth_bytes_per_s * 1e3
    return cost


class LatencyModel:
    """Vectorised replay of all representative traces for a batch of placements."""

    def __init__(self, api_traces: list[ApiTraces], components: list[str], hop_cost: HopCost,
                 gateway: str | None = None, ingress_cloud_share: float = 0.0) -> None:
        self.apis = [group.api for group in api_traces]
        self.gateway_index = components.index(gateway) if gateway in components else None
        self.ingress_cloud_share = ingress_cloud_share
        self.groups = api_traces
        self.components = components
        self._pad = len(components)
        index = {name: i for i, name in enumerate(components)}
        src1, dst1, cost1, src2, dst2, cost2, slack, height = [], [], [], [], [], [], [], []
        entry_cost1: list[float | None] = []
        children_of: list[list[list[int]]] = []
        self.roots: list[int] = []
        weights: list[tuple[int, int, float]] = []  # (representative, api, weight)

        def add(node: ReplayNode, api: str) -> int:
            kids = [[add(child, api) for child in stage] for stage in node.stages]
            hops = [(index[h.edge[0]], index[h.edge[1]], hop_cost(api, h, False)) for h in node.hops]
            ingress = node.hops[0] if node.hops and node.hops[0].edge[0] == gateway else None
            entry_cost1.append(hop_cost(api, ingress, True) if ingress else None)
            hops += [(self._pad, self._pad, 0.0)] * (2 - len(hops))
            (s1, d1, c1), (s2, d2, c2) = hops[0], hops[1]
            src1.append(s1), dst1.append(d1), cost1.append(c1)
            src2.append(s2), dst2.append(d2), cost2.append(c2)
            slack.append(node.slack_us / 1000.0)
            height.append(1 + max((height[k] for stage in kids for k in stage), default=-1))
            children_of.append(kids)
            return len(slack) - 1

        for a, group in enumerate(api_traces):
            for rep, weight in zip(group.representatives, group.shape_weights):
                root = add(rep, group.api) if rep is not None else -1
                self.roots.append(root)
                weights.append((len(self.roots) - 1, a, float(weight)))
        self.n_reps = len(self.roots)
        self.rep_weights = np.zeros((self.n_reps, len(self.apis)), dtype=np.float64)
        for r, a, w in weights:
            self.rep_weights[r, a] = w
        self._build_levels(src1, dst1, cost1, src2, dst2, cost2, slack, height, children_of)
        entry = np.array([c1 if e is None else e for c1, e in zip(cost1, entry_cost1)], dtype=np.float32)
        self.entry_cost1 = entry[self._order]
        self.baseline_mean_ms = np.array([g.measured_ms.mean() for g in api_traces])
        self.baseline_p95_ms = np.array([np.percentile(g.measured_ms, P95) for g in api_traces])
        offsets = np.cumsum([0] + [len(g.representatives) for g in api_traces])
        self._trace_rep = [offsets[a] + g.shape_of_trace for a, g in enumerate(api_traces)]

    def _build_levels(self, src1, dst1, cost1, src2, dst2, cost2, slack, height, children_of) -> None:
        order = np.argsort(np.asarray(height, dtype=np.int64), kind="stable")
        self._order = order
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        self.src1, self.dst1 = np.asarray(src1)[order], np.asarray(dst1)[order]
        self.src2, self.dst2 = np.asarray(src2)[order], np.asarray(dst2)[order]
        self.cost1 = np.asarray(cost1, dtype=np.float32)[order]
        self.cost2 = np.asarray(cost2, dtype=np.float32)[order]
        self.slack = np.asarray(slack, dtype=np.float32)[order]
        heights = np.asarray(height)[order]
        self.root_cols = np.array([position[r] if r >= 0 else -1 for r in self.roots])
        self.levels = []
        for h in range(int(heights.max()) + 1 if len(heights) else 0):
            cols = np.nonzero(heights == h)[0]
            child_cols, stage_starts, parent_starts, parents_local = [], [], [], []
            for local, col in enumerate(cols):
                stages = children_of[order[col]]
                if not stages:
                    continue
                parents_local.append(local)
                parent_starts.append(len(stage_starts))
                for stage in stages:
                    stage_starts.append(len(child_cols))
                    child_cols.extend(int(position[k]) for k in stage)
            self.levels.append((int(cols[0]), int(cols[-1]) + 1, np.asarray(child_cols, dtype=np.int64),
                                np.asarray(stage_starts, dtype=np.int64), np.asarray(parent_starts, dtype=np.int64),
                                np.asarray(parents_local, dtype=np.int64)))

    def added_ms(self, cloud: np.ndarray, gateway_in_cloud: bool = False, include_ingress: bool = True) -> np.ndarray:
        """(plans x representatives) latency each representative trace gains; `cloud` is (plans x components) bool.

        The gateway sits on the side `gateway_in_cloud` says. Without `include_ingress` the latency is
        taken from the entry span on, as traces measure it: of the gateway -> entry-service hop only
        what happens inside the entry span counts (a large request body's later round trips)."""
        plans = cloud.shape[0]
        side = np.concatenate([cloud.astype(bool), np.zeros((plans, 1), dtype=bool)], axis=1)
        if self.gateway_index is not None:
            side[:, self.gateway_index] = gateway_in_cloud
        cost1 = self.cost1 if include_ingress else self.entry_cost1
        delay = (side[:, self.src1] != side[:, self.dst1]) * cost1
        delay += (side[:, self.src2] != side[:, self.dst2]) * self.cost2
        value = np.empty_like(delay)
        for start, stop, child_cols, stage_starts, parent_starts, parents_local in self.levels:
            delta = np.zeros((plans, stop - start), dtype=np.float32)
            if len(child_cols):
                stage_max = np.maximum.reduceat(value[:, child_cols], stage_starts, axis=1)
                np.maximum(stage_max, 0.0, out=stage_max)
                delta[:, parents_local] = np.add.reduceat(stage_max, parent_starts, axis=1)
            value[:, start:stop] = delta + delay[:, start:stop] - self.slack[start:stop]
        out = np.zeros((plans, self.n_reps), dtype=np.float32)
        has_root = self.root_cols >= 0
        out[:, has_root] = value[:, self.root_cols[has_root]]
        return out

    def _ingress_mix(self, cloud: np.ndarray, include_ingress: bool) -> list[tuple[float, np.ndarray]]:
        """(weight, added_ms) for each gateway side users' traffic enters through."""
        share = self.ingress_cloud_share
        sides = [(1.0 - share, False), (share, True)] if 0.0 < share < 1.0 else [(1.0, share >= 1.0)]
        return [(weight, self.added_ms(cloud, in_cloud, include_ingress).astype(np.float64)) for weight, in_cloud in sides]

    def mean_ms(self, cloud: np.ndarray, include_ingress: bool = True) -> np.ndarray:
        """(plans x APIs) predicted mean latency as users see it from the gateway (with `include_ingress`)
        or from the entry span on (without)."""
        return self.baseline_mean_ms + sum(w * added for w, added in self._ingress_mix(cloud, include_ingress)) @ self.rep_weights

    def p95_ms(self, cloud: np.ndarray, include_ingress: bool = True) -> np.ndarray:
        """(plans x APIs) predicted p95 latency over every measured trace (and every ingress side, weighted)."""
        mix = self._ingress_mix(cloud, include_ingress)
        out = np.empty((cloud.shape[0], len(self.apis)))
        for a, group in enumerate(self.groups):
            samples = np.concatenate([group.measured_ms[None, :] + added[:, self._trace_rep[a]] for _, added in mix], axis=1)
            weights = np.concatenate([np.full(len(group.measured_ms), w) for w, _ in mix])
            out[:, a] = [weighted_percentile(row, weights, P95) for row in samples]
        return out


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Percentile of weighted samples, linear between order statistics like np.percentile for equal weights."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order], np.cumsum(weights[order])
    if len(values) == 1:
        return float(values[0])
    positions = (cumulative - weights[order]) / (cumulative[-1] - weights[order][-1]) if np.allclose(weights, weights[0]) \
        else (cumulative - 0.5 * weights[order]) / cumulative[-1]
    return float(np.interp(q / 100.0, positions, values))


def build_latency_model(traces: list[Trace], components: list[str], config: AtlasConfig,
                        footprint: Footprint | None, graphs: dict[str, ApiCallGraph],
                        kinds: dict[str, str] | None = None, rates: dict[str, float] | None = None) -> LatencyModel:
    """Group traces per API and compile the replay program."""
    by_api: dict[str, list[Trace]] = defaultdict(list)
    for trace in traces:
        by_api[trace.api].append(trace)
    groups = [group_traces(api, by_api[api], config) for api in sorted(by_api)]
    return LatencyModel(groups, components, hop_cost_fn(config, footprint, graphs, kinds, rates), config.gateway,
                        config.ingress_cloud_share)
