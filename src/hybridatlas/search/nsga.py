"""NSGA-II (pymoo) over binary placements, seeded with simple plans and refined by local search.

Every evaluated feasible plan enters a Pareto archive, so the result is the non-dominated set of
everything the search saw, not only the last population. After the evolutionary run, the archived
plans' single-component moves are scored (vectorised) until the archive stops changing, the round
limit is hit or an evaluation budget (a multiple of what the evolutionary run scored) is spent; when a
round's neighbourhood exceeds what is left, the moves scored are sampled, those of components carrying
the most traffic across the plan's on-prem/cloud boundary most likely.
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


def _sample(weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k rows drawn without replacement, with probability proportional to `weights`
    (Gumbel top-k; every weight must be positive)."""
    keys = np.log(weights) - np.log(-np.log(rng.random(len(weights))))
    return np.argpartition(-keys, k - 1)[:k]


def local_search(evaluator: PlanEvaluator, archive: ParetoArchive, rounds: int, budget: int | None = None,
                 rng: np.random.Generator | None = None) -> int:
    """Score single-component moves of the archive's plans; repeat while the archive changes.

    A move is scored at most once. A round scores all new moves if they fit in what is left of
    `budget` (None: unbounded), else a sample of that many, weighted by the traffic the moved
    component exchanges across the plan's boundary (plus the mean, so that no move is excluded),
    and the search ends. Returns the number of plans scored.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    left = np.inf if budget is None else budget
    n_bits = evaluator.n_bits
    scored: set[bytes] = set()
    spent = 0
    for _ in range(rounds):
        before = archive.bits.copy()
        if len(before) == 0 or left <= 0 or n_bits == 0:
            break
        rows = np.packbits(before, axis=1)
        scored.update(row.tobytes() for row in rows)
        plan, bit = np.divmod(np.arange(len(before) * n_bits), n_bits)
        packed = np.repeat(rows, n_bits, axis=0)
        packed[np.arange(len(plan)), bit // 8] ^= np.uint8(0x80) >> (bit % 8).astype(np.uint8)
        _, first = np.unique(packed, axis=0, return_index=True)
        new = np.array([i for i in first if packed[i].tobytes() not in scored], dtype=np.int64)  # sorted plans
        if len(new) > left:
            crossing = evaluator.boundary_traffic(before)[plan[new], bit[new]]
            weights = crossing + (crossing.mean() if crossing.any() else 1.0)
            new = new[np.sort(_sample(weights, int(left), rng))]
        left -= len(new)
        spent += len(new)
        scored.update(packed[i].tobytes() for i in new)
        neighbours = np.unpackbits(packed[new], axis=1, count=n_bits).astype(bool)
        for start in range(0, len(neighbours), 16384):
            chunk = neighbours[start:start + 16384]
            scores = evaluator.evaluate(chunk)
            archive.add(chunk, scores.objectives, scores.feasible)
        if archive.bits.shape == before.shape and (np.sort(archive.bits.view(np.uint8), axis=0) ==
                                                  np.sort(before.view(np.uint8), axis=0)).all():
            break
    return spent


def nsga2_search(evaluator: PlanEvaluator, population: int = 200, generations: int = 200, seed: int = 0,
                 local_rounds: int = 10, seeds: list[np.ndarray] | None = None,
                 local_budget: float = 2.0) -> SearchResult:
    """Run NSGA-II plus local refinement; returns the archive of feasible non-dominated plans.

    The local search scores at most `local_budget` times the plans the evolutionary run scored."""
    start, evaluated_before = time.perf_counter(), evaluator.evaluated
    archive = ParetoArchive(evaluator.n_bits)
    rng = np.random.default_rng(seed)
    initial = initial_population(evaluator.n_bits, population, rng, seeds or [])
    algorithm = NSGA2(pop_size=population, sampling=initial, crossover=UniformCrossover(),
                      mutation=BitflipMutation(prob=1.0, prob_var=1.0 / max(evaluator.n_bits, 1)),
                      eliminate_duplicates=True)
    minimize(PlacementProblem(evaluator, archive), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    evolved = evaluator.evaluated - evaluated_before
    local_search(evaluator, archive, local_rounds, int(local_budget * evolved), rng)
    return SearchResult(archive, evaluator.evaluated - evaluated_before, time.perf_counter() - start, "nsga2")
