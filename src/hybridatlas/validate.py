"""Checking predictions against a measured deployment: per-API measured vs predicted mean latency.

Traces measured under a placement give each API's mean latency from its entry span on; Atlas's
prediction for that placement is taken the same way (the gateway -> entry-service hop is outside the
entry span, so it is left out). The error is (predicted - measured) / measured.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from hybridatlas.errors import warn_data
from hybridatlas.ingest.traces import Trace
from hybridatlas.pipeline import AtlasModels
from hybridatlas.search.evaluator import PlanEvaluator


def validate(models: AtlasModels, measured: list[Trace], cloud: list[str]) -> dict[str, Any]:
    """Per-API rows (on-prem, measured and predicted mean ms, error) and the mean and worst |error|."""
    evaluator = PlanEvaluator(models)
    placement = evaluator.placement(cloud)
    predicted = models.latency.mean_ms(placement, include_ingress=False)[0]
    by_api: dict[str, list[float]] = defaultdict(list)
    for trace in measured:
        by_api[trace.api].append(trace.duration_ms)
    unknown = sorted(set(by_api) - set(models.apis))
    if unknown:
        warn_data("measured traces", f"APIs {unknown} are not in the traces Atlas learned from; not validated")
    rows = {}
    for a, api in enumerate(models.apis):
        if api not in by_api:
            warn_data("measured traces", f"no measured trace of {api}; not validated")
            continue
        mean = float(np.mean(by_api[api]))
        rows[api] = {"onprem_mean_ms": float(models.latency.baseline_mean_ms[a]), "measured_mean_ms": mean,
                     "predicted_mean_ms": float(predicted[a]), "error": float(predicted[a] - mean) / mean,
                     "measured_traces": len(by_api[api])}
    errors = np.abs([row["error"] for row in rows.values()]) if rows else np.zeros(1)
    return {"apis": rows, "mean_abs_error": float(errors.mean()), "max_abs_error": float(errors.max()),
            "pin_violations": evaluator.pin_violations(cloud)}
