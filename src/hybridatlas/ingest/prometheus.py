"""Prometheus `/api/v1/query_range` responses (files or live) -> SeriesTable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Hashable

from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.files import read_json
from hybridatlas.ingest.series import SeriesTable

_POD_SUFFIX = re.compile(r"-[0-9a-f]{6,10}-[0-9a-z]{5}$")

KeyFn = Callable[[dict[str, str]], Hashable | None]


def component_from_pod(pod: str) -> str:
    """Deployment name of a pod: strips the ReplicaSet hash and pod suffix."""
    return _POD_SUFFIX.sub("", pod)


def edge_key(labels: dict[str, str]) -> tuple[str, str] | None:
    """(source, destination) workload of an Istio series; None if the labels lack them."""
    source = labels.get("source_workload") or labels.get("source_app")
    destination = labels.get("destination_workload") or labels.get("destination_app")
    if not source or not destination or source == "unknown" or destination == "unknown":
        return None
    return (source, destination)


def component_key(labels: dict[str, str]) -> str | None:
    """Component of a per-pod series, from `pod` (preferred), `container` or `deployment`."""
    if labels.get("pod"):
        return component_from_pod(labels["pod"])
    return labels.get("container") or labels.get("deployment") or None


def label_key(label: str) -> KeyFn:
    """Key series by the value of one label (e.g. an `api` label on call counts)."""
    return lambda labels: labels.get(label) or None


def parse_query_range(source: str, document: Any, key: KeyFn) -> SeriesTable:
    """Parse a query_range response; series whose labels give no key are skipped with a warning."""
    if not isinstance(document, dict) or document.get("status") != "success":
        detail = document.get("error") if isinstance(document, dict) else None
        raise AtlasInputError(source, f"not a successful Prometheus response (status={document.get('status') if isinstance(document, dict) else None!r}, error={detail!r})")
    data = document.get("data") or {}
    if data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
        raise AtlasInputError(source, f"expected resultType 'matrix' with a result list, got {data.get('resultType')!r}")
    points: dict[Hashable, list[tuple[float, float]]] = {}
    for series in data["result"]:
        labels = series.get("metric", {})
        name = key(labels)
        if name is None:
            warn_data(source, f"skipped a series whose labels {labels} do not identify it")
            continue
        try:
            values = [(float(t), float(v)) for t, v in series.get("values", [])]
        except (TypeError, ValueError) as exc:
            raise AtlasInputError(source, f"series {labels}: malformed sample: {exc}") from exc
        points.setdefault(name, []).extend(values)
    if not points:
        raise AtlasInputError(source, "the response holds no usable series")
    return SeriesTable.from_points(source, points)


def load_query_range(path: str | Path, key: KeyFn) -> SeriesTable:
    """A query_range JSON (or .json.gz) file as a SeriesTable."""
    return parse_query_range(str(path), read_json(path), key)
