"""Expected traffic: calls per second per API, given by the user or extrapolated from history."""

from __future__ import annotations

import numpy as np

from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.series import SeriesTable


def rates_from_history(api_calls: SeriesTable, window_s: float, history_minutes: float,
                       trend: bool = False, horizon_days: float = 0.0) -> dict[str, float]:
    """Mean calls/s per API over the last `history_minutes` of active windows (any API > 0).

    With `trend`, a least-squares line over that history is extrapolated `horizon_days` ahead
    (never below zero).
    """
    values = np.nan_to_num(api_calls.values)
    active = values.sum(axis=1) > 0
    if not active.any():
        raise AtlasInputError(api_calls.source, "no window with any API call: cannot extrapolate traffic")
    times = api_calls.timestamps[active]
    recent = times >= times[-1] - history_minutes * 60.0
    per_second = values[active][recent] / window_s
    if recent.sum() < 2:
        warn_data(api_calls.source, "fewer than two active windows in the history; the forecast is one sample")
    rates = per_second.mean(axis=0)
    if trend and recent.sum() >= 2:
        t = (times[recent] - times[recent][-1]).astype(float)
        slope = np.polyfit(t, per_second, 1)[0]
        rates = np.maximum(rates + slope * (horizon_days * 86400.0 + (t[-1] - t.mean())), 0.0)
    return {str(api): float(rate) for api, rate in zip(api_calls.names, rates)}


def rates_from_mix(mix: dict[str, float], total_rps: float, known_apis: list[str], source: str) -> dict[str, float]:
    """Calls/s per API from a traffic mix (any positive weights, normalised) and a total volume."""
    unknown = sorted(set(mix) - set(known_apis))
    if unknown:
        raise AtlasInputError(source, f"unknown API(s) {unknown}; known: {known_apis}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise AtlasInputError(source, "mix weights must be non-negative and not all zero")
    if total_rps < 0:
        raise AtlasInputError(source, "total requests per second must be >= 0")
    total = sum(mix.values())
    return {api: total_rps * mix.get(api, 0.0) / total for api in known_apis}


def scale_rates(rates: dict[str, float], factor: float) -> dict[str, float]:
    if factor < 0:
        raise AtlasInputError("forecast.scale", f"must be >= 0, got {factor}")
    return {api: rate * factor for api, rate in rates.items()}
