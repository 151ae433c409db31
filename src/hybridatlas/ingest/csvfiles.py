"""CSV layouts: long edge bytes, wide per-API call counts, long per-component resources."""

from __future__ import annotations

from pathlib import Path
from typing import Hashable

from hybridatlas.errors import AtlasInputError
from hybridatlas.ingest.files import parse_float, read_csv_rows
from hybridatlas.ingest.series import SeriesTable

# Canonical resource metric -> CSV column of resources.csv.
RESOURCE_CSV_COLUMNS = {
    "cpu_cores": "cpu_cores",
    "memory_bytes": "memory_bytes",
    "disk_gib": "disk_usage_gb",
    "read_iops": "read_iops",
    "write_iops": "write_iops",
    "read_bytes_per_s": "read_tp",
    "write_bytes_per_s": "write_tp",
    "net_rx_bytes_per_s": "net_rx_bytes_per_second",
    "net_tx_bytes_per_s": "net_tx_bytes_per_second",
}
REQUIRED_RESOURCES = ("cpu_cores", "memory_bytes")


def _timestamp(path: Path, line: int, text: str) -> float:
    value = parse_float(path, line, "timestamp", text)
    if value != value:
        raise AtlasInputError(path, f"line {line}: empty timestamp")
    return value


def load_edge_bytes_csv(path: str | Path) -> tuple[SeriesTable, SeriesTable]:
    """(request, response) byte tables keyed by (source, destination) from a long CSV."""
    path = Path(path)
    _, rows = read_csv_rows(path, ["timestamp", "source", "destination", "request_bytes", "response_bytes"])
    request: dict[Hashable, list[tuple[float, float]]] = {}
    response: dict[Hashable, list[tuple[float, float]]] = {}
    for line, row in rows:
        t = _timestamp(path, line, row["timestamp"])
        edge = (row["source"], row["destination"])
        request.setdefault(edge, []).append((t, parse_float(path, line, "request_bytes", row["request_bytes"])))
        response.setdefault(edge, []).append((t, parse_float(path, line, "response_bytes", row["response_bytes"])))
    if not request:
        raise AtlasInputError(path, "no rows")
    return SeriesTable.from_points(str(path), request), SeriesTable.from_points(str(path), response)


def load_api_calls_csv(path: str | Path) -> SeriesTable:
    """Per-API call counts per window from a wide CSV (timestamp + one column per API)."""
    path = Path(path)
    header, rows = read_csv_rows(path, ["timestamp"])
    apis = [column for column in header if column != "timestamp"]
    if not apis:
        raise AtlasInputError(path, "CSV has a timestamp column but no API columns")
    points: dict[Hashable, list[tuple[float, float]]] = {api: [] for api in apis}
    for line, row in rows:
        t = _timestamp(path, line, row["timestamp"])
        for api in apis:
            points[api].append((t, parse_float(path, line, api, row[api])))
    return SeriesTable.from_points(str(path), points)


def load_resources_csv(path: str | Path) -> dict[str, SeriesTable]:
    """Per-metric tables keyed by component from a long CSV (one row per timestamp and component)."""
    path = Path(path)
    header, rows = read_csv_rows(path, ["timestamp", "component", *(RESOURCE_CSV_COLUMNS[m] for m in REQUIRED_RESOURCES)])
    present = {metric: column for metric, column in RESOURCE_CSV_COLUMNS.items() if column in header}
    points: dict[str, dict[Hashable, list[tuple[float, float]]]] = {metric: {} for metric in present}
    for line, row in rows:
        t = _timestamp(path, line, row["timestamp"])
        component = row["component"]
        if not component:
            raise AtlasInputError(path, f"line {line}: empty component")
        for metric, column in present.items():
            value = parse_float(path, line, column, row[column])
            if value == value:
                points[metric].setdefault(component, []).append((t, value))
    return {metric: SeriesTable.from_points(f"{path}[{metric}]", series)
            for metric, series in points.items() if series}
