"""NSGA-II (pymoo) over binary placements, seeded with simple plans and refined by local search.

Every evaluated feasible plan enters a Pareto archive, so the result is the non-dominated set of
everything the search saw, not only the last population. After the evolutionary run, each archived
plan's single-component flips are scored (vectorised) until the archive stops changing or the round
limit is hit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.operators.crossover.ux import UniformCrossover
from pymoo.operators.mutation.bitflip import BitflipMutation
from pymoo.optimize import minimize

from hybridatlas.search.evaluator import PlanEvaluator
from hybridatlas.search.pareto import ParetoArchive


@dataclass
class SearchResult:
    """The Pareto archive, how many plans were scored and how long it took."""

    archive: ParetoArchive
    evaluated: int
    seconds: float
    method: str

    @property
    def plans_per_second(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else float("inf")


class PlacementProblem(Problem):
    """pymoo problem: minimise (cost, latency inflation, disruption) s.t. capacity and budget."""

    def __init__(self, evaluator: PlanEvaluator, archive: ParetoArchive) -> None:
        super().__init__(n_var=evaluator.n_bits, n_obj=3, n_ieq_constr=4, xl=0, xu=1, vtype=bool)
        self.evaluator = evaluator
        self.archive = archive

    def _evaluate(self, x: np.ndarray, out: dict, *args, **kwargs) -> None:
        bits = np.asarray(x, dtype=bool)
        scores = self.evaluator.evaluate(bits)
        self.archive.add(bits, scores.objectives, scores.feasible)
        out["F"] = scores.objectives
        out["G"] = scores.violations


def initial_population(n_bits: int, size: int, rng: np.random.Generator, seeds: list[np.ndarray]) -> np.ndarray:
    """All on-prem, the given seed plans, single moves (all of them, or a random half-population's worth
    when there are more free components), then random plans of random density."""
    singles = np.eye(n_bits, dtype=bool)
    room = max(0, size // 2 - 1 - len(seeds))
    if n_bits > room:
        singles = singles[rng.choice(n_bits, size=room, replace=False)]
    rows = ([np.zeros(n_bits, dtype=bool)] + [np.asarray(seed, dtype=bool) for seed in seeds] + list(singles))[:size]
    density = rng.random((size - len(rows), 1))
    random_rows = rng.random((size - len(rows), n_bits)) < density
    return np.unique(np.vstack([np.array(rows), random_rows]), axis=0)


def local_search(evaluator: PlanEvaluator, archive: ParetoArchive, rounds: int) -> None:
    """Score every single-bit neighbour of the archive; repeat while the archive changes."""
    flips = np.eye(evaluator.n_bits, dtype=bool)
    for _ in range(rounds):
        before = archive.bits.copy()
        if len(before) == 0:
            return
        neighbours = np.unique((before[:, None, :] ^ flips[None, :, :]).reshape(-1, evaluator.n_bits), axis=0)
        for start in range(0, len(neighbours), 16384):
            chunk = neighbours[start:start + 16384]
            scores = evaluator.evaluate(chunk)
            archive.add(chunk, scores.objectives, scores.feasible)
        if archive.bits.shape == before.shape and (np.sort(archive.bits.view(np.uint8), axis=0) ==
                                                  np.sort(before.view(np.uint8), axis=0)).all():
            return


def nsga2_search(evaluator: PlanEvaluator, population: int = 200, generations: int = 200, seed: int = 0,
                 local_rounds: int = 10, seeds: list[np.ndarray] | None = None) -> SearchResult:
    """Run NSGA-II plus local refinement; returns the archive of feasible non-dominated plans."""
    start, evaluated_before = time.perf_counter(), evaluator.evaluated
    archive = ParetoArchive(evaluator.n_bits)
    rng = np.random.default_rng(seed)
    initial = initial_population(evaluator.n_bits, population, rng, seeds or [])
    algorithm = NSGA2(pop_size=population, sampling=initial, crossover=UniformCrossover(),
                      mutation=BitflipMutation(prob=1.0, prob_var=1.0 / max(evaluator.n_bits, 1)),
                      eliminate_duplicates=True)
    minimize(PlacementProblem(evaluator, archive), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    local_search(evaluator, archive, local_rounds)
    return SearchResult(archive, evaluator.evaluated - evaluated_before, time.perf_counter() - start, "nsga2")
