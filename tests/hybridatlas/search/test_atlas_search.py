import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasInputError
from hybridatlas.pipeline import build_models
from hybridatlas.search import baselines
from hybridatlas.search.evaluator import PlanEvaluator
from hybridatlas.search.nsga import local_search, nsga2_search
from hybridatlas.search.pareto import ParetoArchive, label_plans, nondominated
from hybridatlas.search.quality import coverage, hypervolume_ratio

SMALL_PINS = ["media-memcached", "url-shorten-memcached", "user-mongodb", "social-graph-mongodb",
              "url-shorten-mongodb", "post-storage-mongodb", "user-timeline-mongodb", "unique-id-service",
              "media-service", "text-service", "url-shorten-service", "user-mention-service"]


def _brute_force(objectives):
    return [i for i in range(len(objectives))
            if not ((objectives <= objectives[i]).all(1) & (objectives < objectives[i]).any(1)).any()]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 3)), min_size=1, max_size=60))
def test_nondominated_matches_brute_force(points):
    objectives = np.array(points, dtype=float)
    kept = nondominated(objectives)
    unique_brute = {tuple(objectives[i]) for i in _brute_force(objectives)}
    assert {tuple(objectives[i]) for i in kept} == unique_brute
    assert len(kept) == len(unique_brute)  # exact duplicates are kept once


def test_labels():
    front = np.array([[1.0, 9.0, 2.0], [5.0, 1.0, 2.0], [3.0, 4.0, 0.0]])
    labels = label_plans(front)
    assert labels["cheapest"] == 0 and labels["best performance"] == 1 and labels["least disruptive"] == 2


@pytest.fixture(scope="module")
def small(telemetry):
    """14 free components, capacity tight enough that several must move."""
    probe = AtlasConfig.load(overrides={"forecast": {"scale": 5}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = build_models(telemetry, probe).demand("cpu_cores").sum()
        config = AtlasConfig.load(overrides={"forecast": {"scale": 5}, "onprem": {"cpu_cores": 0.7 * total},
                                             "placement": {"pinned_onprem": ["istio-ingressgateway", *SMALL_PINS]}})
        return PlanEvaluator(build_models(telemetry, config))


def test_search_matches_exhaustive_front(small):
    assert small.n_bits == 15
    exact = baselines.exhaustive(small)
    assert exact.evaluated == 2**15
    found = nsga2_search(small, population=60, generations=60, seed=3)
    assert hypervolume_ratio(found.archive.objectives, exact.archive.objectives) >= 0.99
    assert coverage(found.archive.objectives, exact.archive.objectives) >= 0.8
    # everything the search returns is feasible and non-dominated by the exhaustive front
    scores = small.evaluate(found.archive.bits)
    assert scores.feasible.all()
    # and nothing the search found beats the exhaustive front (which would mean enumeration missed plans)
    for point in found.archive.objectives:
        exact_front = exact.archive.objectives
        assert not ((point <= exact_front).all(axis=1) & (point < exact_front).any(axis=1)).any()


def _archive_of(evaluator, plan):
    archive = ParetoArchive(evaluator.n_bits)
    scores = evaluator.evaluate(plan[None, :])
    archive.add(plan[None, :], scores.objectives, scores.feasible)
    return archive, scores.objectives[0]


def test_local_search_respects_its_budget_and_improves_a_plan(small):
    start = np.ones(small.n_bits, dtype=bool)  # everything moved: feasible, but costly and slow
    runs = []
    for _ in range(2):
        archive, start_objectives = _archive_of(small, start)
        before = small.evaluated
        spent = local_search(small, archive, rounds=10, budget=20, rng=np.random.default_rng(5))
        assert spent == small.evaluated - before and 15 < spent <= 20  # one full round, then a sample
        assert ((archive.objectives <= start_objectives).all(axis=1) &
                (archive.objectives < start_objectives).any(axis=1)).any()
        assert small.evaluate(archive.bits).feasible.all()
        runs.append(archive.bits)
    assert np.array_equal(*runs)  # deterministic under the seed
    unbounded, _ = _archive_of(small, start)
    spent = local_search(small, unbounded, rounds=10)
    roomy, _ = _archive_of(small, start)
    assert local_search(small, roomy, rounds=10, budget=spent, rng=np.random.default_rng(1)) == spent
    assert np.array_equal(roomy.bits, unbounded.bits)  # a budget that is not reached changes nothing


def test_boundary_traffic_counts_edges_across_the_placement(small):
    rng = np.random.default_rng(2)
    bits = rng.random((4, small.n_bits)) < 0.5
    cloud = small.placements(bits)
    cost = small.models.cost
    expected = np.zeros((4, len(small.models.components)))
    for s, d, rate in zip(cost.edge_source, cost.edge_destination,
                          cost.edge_request_bytes_per_s + cost.edge_response_bytes_per_s):
        crossing = cloud[:, s] != cloud[:, d]
        expected[:, s] += rate * crossing
        expected[:, d] += rate * crossing
    assert np.allclose(small.boundary_traffic(bits), expected[:, small.free_index])


def test_baselines_fit_the_capacity(small):
    for plan in (baselines.busiest_first(small), baselines.community_grouping(small), baselines.mincut_grouping(small)):
        scores = small.evaluate(plan[None, :])
        assert scores.feasible[0] and plan.any()
    order = baselines.busiest_order(small)
    cpu = small.demand[small.free_index, 0]
    assert list(cpu[order]) == sorted(cpu, reverse=True)
    random = baselines.random_search(small, 500)
    assert random.evaluated == 500 and len(random.archive.bits) > 0


def test_batch_and_single_evaluation_agree(small):
    rng = np.random.default_rng(0)
    bits = rng.random((64, small.n_bits)) < 0.4
    batch = small.evaluate(bits)
    for i in (0, 17, 63):
        one = small.evaluate(bits[i:i + 1])
        np.testing.assert_allclose(one.objectives[0], batch.objectives[i])
        np.testing.assert_allclose(one.violations[0], batch.violations[i])


def test_exhaustive_refuses_huge_instances(models):
    with pytest.raises(AtlasInputError, match="2\\^27 plans"):
        baselines.exhaustive(PlanEvaluator(models))


def test_unknown_or_pinned_components_are_rejected(small):
    with pytest.raises(AtlasInputError, match=r"unknown component\(s\) \['nope'\]"):
        small.bits_for(["nope"])
    with pytest.raises(AtlasInputError, match="pinned on-prem"):
        small.bits_for(["nginx-thrift"])
