"""Round trips learned from traces measured under a placement (after a first migration, or in a test
deployment with an emulated WAN), against the on-prem traces Atlas learned from.

Where spans show the network time of a call that crossed, it is compared with the same call on-prem:
  - a client span whose callee emits no spans (a store): its duration;
  - a client span with the callee's server span under it: client duration minus server duration.
For every (operation, callee kind), round trips = (mean measured - mean on-prem - bytes / bandwidth)
/ RTT, over the calls of all APIs. The result is a list of `round_trips` rules (base = learned value),
to put before the defaults in a config file.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

import numpy as np

from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasInputError
from hybridatlas.ingest.traces import Span, Trace
from hybridatlas.models.callgraph import DatabaseMapper, walk
from hybridatlas.pipeline import AtlasModels

Key = tuple[str, str, tuple[str, str], str]  # (api, operation, edge, kind of evidence)


def network_samples(traces: list[Trace], config: AtlasConfig) -> dict[Key, list[float]]:
    """Milliseconds of network time per call, keyed by API, operation, edge (caller, callee) and evidence."""
    mapper = DatabaseMapper(config.database_rules)
    samples: dict[Key, list[float]] = defaultdict(list)
    for trace in traces:
        for span, parent, background in walk(trace, config):
            if background:
                continue
            for key, value in _evidence(trace.api, span, parent, mapper):
                samples[key].append(value)
    return samples


def _evidence(api: str, span: Span, parent: Span | None, mapper: DatabaseMapper) -> Iterator[tuple[Key, float]]:
    target = mapper.target(span)
    if target is not None and span.kind in ("client", "producer", None):
        yield (api, span.operation, (span.component, target), "store call"), span.duration_us / 1e3
    if parent is not None and parent.kind == "client" and span.kind == "server" and parent.component != span.component:
        yield ((api, span.operation, (parent.component, span.component), "client - server span"),
               (parent.duration_us - span.duration_us) / 1e3)


def learn_round_trips(models: AtlasModels, onprem: list[Trace], measured: list[Trace], cloud: list[str]) -> dict[str, Any]:
    """Learned round trips per (operation, callee kind) from the calls that crossed under `cloud`;
    `models` were built from the `onprem` traces (and their byte series)."""
    config = models.config
    side = {c: c in cloud for c in models.components}
    side[config.gateway] = config.ingress_cloud_share >= 1.0
    before = network_samples(onprem, config)
    after = network_samples(measured, config)
    per_rule: dict[tuple[str, str], list[float]] = defaultdict(list)
    evidence = []
    for key, values in sorted(after.items()):
        api, operation, edge, how = key
        if edge[0] not in side or edge[1] not in side or side[edge[0]] == side[edge[1]] or key not in before:
            continue
        calls = models.graphs[api].calls.get(edge, 0.0) if api in models.graphs else 0.0
        request, response = models.footprint.bytes_per_request(api, edge) if models.footprint and calls else (0.0, 0.0)
        transfer_ms = ((request + response) / calls if calls else 0.0) / config.bandwidth_bytes_per_s * 1e3
        extra_ms = float(np.mean(values)) - float(np.mean(before[key]))
        rounds = max(0.0, (extra_ms - transfer_ms) / config.rtt_ms)
        kind = models.kinds.get(edge[1], config.kind_of(edge[1]))
        per_rule[(operation, kind)].extend([rounds] * len(values))
        evidence.append({"api": api, "operation": operation, "edge": list(edge), "evidence": how, "calls": len(values),
                         "extra_ms": extra_ms, "transfer_ms": transfer_ms, "round_trips": rounds})
    if not evidence:
        raise AtlasInputError("measured traces", "no call in them crossed the WAN under the given placement with "
                              "spans that show its network time (store client spans, or client and server spans)")
    rules = [{"operation": operation, "kind": kind, "base": round(float(np.mean(values)), 3),
              "why": f"learned from {len(values)} measured calls (hybridatlas calibrate traces)"}
             for (operation, kind), values in sorted(per_rule.items())]
    return {"round_trips": rules, "_evidence": evidence}

