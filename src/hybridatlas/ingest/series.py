"""A time-aligned table of series: timestamps x named columns, NaN where a sample is missing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

from hybridatlas.errors import AtlasInputError, warn_data


@dataclass
class SeriesTable:
    """values[t, k] is column `names[k]` at `timestamps[t]` (Unix s); NaN = no sample."""

    timestamps: np.ndarray
    names: list[Hashable]
    values: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.timestamps), len(self.names)):
            raise AtlasInputError(self.source, f"series shape {self.values.shape} does not match "
                                  f"{len(self.timestamps)} timestamps x {len(self.names)} columns")

    @classmethod
    def from_points(cls, source: str, points: Mapping[Hashable, Iterable[tuple[float, float]]]) -> "SeriesTable":
        """Build from {name: [(t, v), ...]}; duplicate (name, t) samples are summed."""
        series = {name: list(values) for name, values in points.items()}
        all_times = sorted({int(round(t)) for values in series.values() for t, _ in values})
        if not all_times:
            raise AtlasInputError(source, "no samples")
        index = {t: i for i, t in enumerate(all_times)}
        names = sorted(series, key=str)
        values = np.full((len(all_times), len(names)), np.nan)
        for k, name in enumerate(names):
            for t, v in series[name]:
                row = index[int(round(t))]
                values[row, k] = v if np.isnan(values[row, k]) else values[row, k] + v
        return cls(np.asarray(all_times, dtype=np.int64), names, values, source)

    def column(self, name: Hashable) -> np.ndarray:
        try:
            return self.values[:, self.names.index(name)]
        except ValueError as exc:
            raise AtlasInputError(self.source, f"no series named {name!r}") from exc

    def select(self, names: Sequence[Hashable]) -> np.ndarray:
        """Columns in the given order; a name without a series is all-NaN (with a warning)."""
        out = np.full((len(self.timestamps), len(names)), np.nan)
        for k, name in enumerate(names):
            if name in self.names:
                out[:, k] = self.values[:, self.names.index(name)]
            else:
                warn_data(self.source, f"no series for {name!r}; treated as missing")
        return out

    def window(self, start: float | None = None, end: float | None = None) -> "SeriesTable":
        """Rows with start <= t <= end."""
        mask = np.ones(len(self.timestamps), dtype=bool)
        if start is not None:
            mask &= self.timestamps >= start
        if end is not None:
            mask &= self.timestamps <= end
        return SeriesTable(self.timestamps[mask], list(self.names), self.values[mask], self.source)

    @property
    def step_s(self) -> float:
        """Median sampling step in seconds (0 for a single sample)."""
        return float(np.median(np.diff(self.timestamps))) if len(self.timestamps) > 1 else 0.0


def align(first: SeriesTable, second: SeriesTable) -> tuple[SeriesTable, SeriesTable]:
    """Restrict both tables to their common timestamps.

    Raises if they share none (inconsistent time ranges); warns when only part overlaps.
    """
    common = np.intersect1d(first.timestamps, second.timestamps)
    if common.size == 0:
        raise AtlasInputError(
            f"{first.source} and {second.source}",
            f"time ranges do not overlap: [{first.timestamps[0]}, {first.timestamps[-1]}] vs "
            f"[{second.timestamps[0]}, {second.timestamps[-1]}] (Unix s); they cannot be regressed together",
        )
    for table in (first, second):
        if common.size < len(table.timestamps):
            warn_data(table.source, f"only {common.size} of {len(table.timestamps)} timestamps overlap the other "
                      f"series; using the overlap")

    def pick(table: SeriesTable) -> SeriesTable:
        rows = np.searchsorted(table.timestamps, common)
        return SeriesTable(common.copy(), list(table.names), table.values[rows], table.source)

    return pick(first), pick(second)


def merge_tables(source: str, tables: Sequence[SeriesTable]) -> SeriesTable:
    """One table from several: samples of the same column at the same time are added up."""
    points: dict[Hashable, list[tuple[float, float]]] = {}
    for table in tables:
        for k, name in enumerate(table.names):
            column = table.values[:, k]
            keep = ~np.isnan(column)
            points.setdefault(name, []).extend(zip(table.timestamps[keep].tolist(), column[keep].tolist()))
    return SeriesTable.from_points(source, points)
