"""Comparing Pareto sets: hypervolume ratio and coverage against a reference (e.g. exhaustive) front."""

from __future__ import annotations

import numpy as np
from pymoo.indicators.hv import HV


def hypervolume_ratio(front: np.ndarray, reference: np.ndarray) -> float:
    """HV(front) / HV(reference), objectives scaled to [0, 1] over the reference front, reference
    point 1.1 in every objective. 1.0 means the front is as good as the reference."""
    low = reference.min(axis=0)
    span = np.where(reference.max(axis=0) - low > 0, reference.max(axis=0) - low, 1.0)
    indicator = HV(ref_point=np.full(reference.shape[1], 1.1))
    reference_hv = indicator((reference - low) / span)
    if len(front) == 0 or reference_hv == 0:
        return 0.0 if len(front) == 0 else 1.0
    return float(indicator((np.asarray(front) - low) / span) / reference_hv)


def coverage(front: np.ndarray, reference: np.ndarray, tolerance: float = 1e-9) -> float:
    """Share of reference points that the front matches (same objectives within tolerance)."""
    if len(reference) == 0:
        return 1.0
    hits = [(np.abs(front - point) <= tolerance * np.maximum(1.0, np.abs(point))).all(axis=1).any()
            for point in reference] if len(front) else [False]
    return float(np.mean(hits))
