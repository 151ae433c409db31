"""Pareto filtering for (cost, latency inflation, disruption) objectives, all minimised."""

from __future__ import annotations

import numpy as np


def _front_2d(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of an (n x 2) array (first of exact duplicates kept)."""
    order = np.lexsort((points[:, 1], points[:, 0]))
    second = points[order, 1]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(second)[:-1]])
    return order[second < best_before]


def nondominated(objectives: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of (n x 3) objectives.

    Rows are grouped by the third objective (few distinct values: disruption scores); each group's
    2-D front is filtered against the staircase of all groups with a smaller third objective.
    """
    if len(objectives) == 0:
        return np.zeros(0, dtype=np.int64)
    kept: list[np.ndarray] = []
    staircase_x = np.zeros(0)
    staircase_y = np.zeros(0)
    for value in np.unique(objectives[:, 2]):
        group = np.nonzero(objectives[:, 2] == value)[0]
        front = group[_front_2d(objectives[group, :2])]
        if len(staircase_x):
            position = np.searchsorted(staircase_x, objectives[front, 0], side="right") - 1
            dominated = (position >= 0) & (staircase_y[np.maximum(position, 0)] <= objectives[front, 1])
            front = front[~dominated]
        kept.append(front)
        merged = np.concatenate(kept)
        stair = merged[_front_2d(objectives[merged, :2])]
        order = np.argsort(objectives[stair, 0], kind="stable")
        staircase_x = objectives[stair[order], 0]
        staircase_y = np.minimum.accumulate(objectives[stair[order], 1])
    return np.sort(np.concatenate(kept))


class ParetoArchive:
    """Running non-dominated set of feasible plans (bit vectors) and their objectives."""

    def __init__(self, n_bits: int) -> None:
        self.bits = np.zeros((0, n_bits), dtype=bool)
        self.objectives = np.zeros((0, 3))
        self.seen = 0

    def add(self, bits: np.ndarray, objectives: np.ndarray, feasible: np.ndarray) -> None:
        self.seen += len(bits)
        bits, objectives = bits[feasible], objectives[feasible]
        if len(bits) == 0:
            return
        local = nondominated(objectives)
        all_bits = np.concatenate([self.bits, bits[local]])
        all_obj = np.concatenate([self.objectives, objectives[local]])
        keep = nondominated(all_obj)
        self.bits, self.objectives = all_bits[keep], all_obj[keep]


def label_plans(objectives: np.ndarray) -> dict[str, int]:
    """Row index of each labelled plan in a front: cheapest (cost, then latency), least disruptive
    (disruption, then latency, then cost), best performance (latency, then cost) and balanced
    (closest to the ideal point after scaling each objective to [0, 1] over the front)."""
    if len(objectives) == 0:
        return {}
    cost, latency, disruption = objectives[:, 0], objectives[:, 1], objectives[:, 2]
    span = objectives.max(axis=0) - objectives.min(axis=0)
    scaled = (objectives - objectives.min(axis=0)) / np.where(span > 0, span, 1.0)
    return {
        "cheapest": int(np.lexsort((latency, cost))[0]),
        "least disruptive": int(np.lexsort((cost, latency, disruption))[0]),
        "best performance": int(np.lexsort((cost, latency))[0]),
        "balanced": int(np.argmin(np.linalg.norm(scaled, axis=1))),
    }
