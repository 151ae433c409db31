"""bench/atlas_bench.py compares Atlas with a baseline only among plans that disrupt no more than it."""

import importlib.util
import warnings
from pathlib import Path

import numpy as np

from hybridatlas.advisor import describe_plan
from hybridatlas.config import AtlasConfig
from hybridatlas.ingest.dataset import load_directory
from hybridatlas.pipeline import build_models
from hybridatlas.search import baselines
from hybridatlas.search.evaluator import PlanEvaluator

BENCH = Path(__file__).resolve().parents[2] / "bench" / "atlas_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("atlas_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_atlas_plans_disrupt_no_more_than_the_baseline(synthetic_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AtlasConfig.load(overrides={"forecast": {"scale": 3}, "onprem": {"cpu_cores": 0.2}})
        evaluator = PlanEvaluator(build_models(load_directory(synthetic_dir), config))
    exact = baselines.exhaustive(evaluator)
    baseline = describe_plan(evaluator, evaluator.bits_for(["cart-service", "catalog-service"]), ["baseline"])
    assert baseline["feasible"] and baseline["disrupted_apis"] == []
    objectives, cost = exact.archive.objectives, baseline["objectives"]["cost_per_month"]
    cheaper = objectives[objectives[:, 0] <= cost + 1e-6]
    assert cheaper[np.argmin(cheaper[:, 1]), 2] > 0  # ignoring disruption would pick a disruptive plan

    result = _bench().compare(evaluator, exact.archive, baseline)
    assert result["baseline_disrupted_apis"] == []
    assert result["atlas_disrupted_apis_at_equal_or_lower_cost"] == []
    assert result["atlas_disrupted_apis_at_equal_or_lower_inflation"] == []
    calm = cheaper[cheaper[:, 2] == 0]
    assert result["atlas_inflation_at_equal_or_lower_cost"] == calm[:, 1].min()
