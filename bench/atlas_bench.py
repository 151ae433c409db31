"""Atlas benchmark on the shared DeathStarBench data: model fidelity, search vs baselines, optimality.

Usage: python bench/atlas_bench.py [--out bench/results] [--data DIR]
Writes atlas_results.json, atlas_results.md, atlas_pareto.png and atlas_exhaustive.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from hybridatlas.advisor import describe_plan
from hybridatlas.config import AtlasConfig
from hybridatlas.ingest.dataset import Telemetry, load_directory
from hybridatlas.pipeline import build_models
from hybridatlas.report.chart import pareto_chart
from hybridatlas.report.table import short_api
from hybridatlas.search import baselines
from hybridatlas.search.evaluator import PlanEvaluator
from hybridatlas.search.nsga import nsga2_search
from hybridatlas.search.pareto import ParetoArchive
from hybridatlas.search.quality import coverage, hypervolume_ratio

REPO = Path(__file__).resolve().parents[1]
# Scenarios: traffic growth (x the last 30 minutes of the Istio run) and the share of the forecast
# CPU / disk that the on-prem cluster can hold.
SCENARIOS = [(3.0, 0.6, 0.7), (5.0, 0.5, 0.7), (5.0, 0.7, 0.6), (8.0, 0.6, 0.8)]
DISRUPTION_RULE = ("Atlas plans are chosen only among those whose disruption (weighted disrupted APIs) is <= the "
                   "baseline's; the disrupted APIs of the baseline and of each chosen Atlas plan are listed.")
ENUMERABLE_PINS = ["media-memcached", "url-shorten-memcached", "user-mongodb", "social-graph-mongodb",
                   "url-shorten-mongodb", "post-storage-mongodb", "user-timeline-mongodb"]


def scenario_config(telemetry: Telemetry, scale: float, cpu_share: float, disk_share: float,
                    extra_pins: list[str] | None = None) -> AtlasConfig:
    probe = build_models(telemetry, AtlasConfig.load(overrides={"forecast": {"scale": scale}}))
    overrides = {"forecast": {"scale": scale},
                 "onprem": {"cpu_cores": cpu_share * probe.demand("cpu_cores").sum(),
                            "memory_gib": None, "disk_gib": disk_share * probe.demand("disk_gib").sum()}}
    if extra_pins:
        overrides["placement"] = {"pinned_onprem": ["istio-ingressgateway", *extra_pins]}
    return AtlasConfig.load(overrides=overrides)


def compare(evaluator: PlanEvaluator, archive: ParetoArchive, baseline: dict) -> dict:
    """Atlas vs one baseline plan, among the Atlas plans that disrupt no more than the baseline: latency
    gain at <= its cost, cost saving at <= its inflation, and the disrupted APIs of each plan compared."""
    front = archive.objectives
    cost_b, infl_b, disr_b = (baseline["objectives"][k] for k in ("cost_per_month", "latency_inflation", "disruption"))
    allowed = front[:, 2] <= disr_b + 1e-9
    cheaper = np.flatnonzero(allowed & (front[:, 0] <= cost_b + 1e-6))
    faster = np.flatnonzero(allowed & (front[:, 1] <= infl_b + 1e-9))
    fast_pick = int(cheaper[np.argmin(front[cheaper, 1])]) if len(cheaper) else None
    cheap_pick = int(faster[np.argmin(front[faster, 0])]) if len(faster) else None

    def disrupted(index: int | None) -> list[str] | None:
        return None if index is None else describe_plan(evaluator, archive.bits[index])["disrupted_apis"]

    best_inflation = None if fast_pick is None else float(front[fast_pick, 1])
    best_cost = None if cheap_pick is None else float(front[cheap_pick, 0])
    return {"baseline_cost": cost_b, "baseline_inflation": infl_b, "baseline_disruption": disr_b,
            "baseline_disrupted_apis": baseline["disrupted_apis"],
            "atlas_inflation_at_equal_or_lower_cost": best_inflation,
            "atlas_disrupted_apis_at_equal_or_lower_cost": disrupted(fast_pick),
            "latency_inflation_reduction": None if best_inflation is None or infl_b <= 0 else 1 - best_inflation / infl_b,
            "atlas_cost_at_equal_or_lower_inflation": best_cost,
            "atlas_disrupted_apis_at_equal_or_lower_inflation": disrupted(cheap_pick),
            "cost_reduction": None if best_cost is None or cost_b <= 0 else 1 - best_cost / cost_b}


def fidelity(telemetry: Telemetry) -> dict:
    models = build_models(telemetry, AtlasConfig.load())
    nothing = np.zeros((1, len(models.components)), dtype=bool)
    mean, p95 = models.latency.mean_ms(nothing)[0], models.latency.p95_ms(nothing)[0]
    reproduction = {}
    for a, api in enumerate(models.apis):
        measured = np.array([t.duration_ms for t in telemetry.traces if t.api == api])
        reproduction[api] = {"measured_mean_ms": float(measured.mean()), "predicted_mean_ms": float(mean[a]),
                             "measured_p95_ms": float(np.percentile(measured, 95)), "predicted_p95_ms": float(p95[a])}
    rows = models.footprint.quality_rows()
    r2 = np.array([r["r2"] for r in rows])
    rel = np.array([r["relative_error"] for r in rows])
    return {"onprem_reproduction": reproduction,
            "max_abs_error_ms": float(max(max(abs(v["predicted_mean_ms"] - v["measured_mean_ms"]),
                                              abs(v["predicted_p95_ms"] - v["measured_p95_ms"])) for v in reproduction.values())),
            "footprint": {"series": len(rows), "median_r2": float(np.median(r2)), "min_r2": float(r2.min()),
                          "share_r2_over_0.9": float((r2 > 0.9).mean()), "median_relative_error": float(np.median(rel)),
                          "worst": sorted(({"edge": f"{r['source']} -> {r['destination']}", "direction": r["direction"],
                                            "r2": r["r2"], "relative_error": r["relative_error"]} for r in rows),
                                          key=lambda r: r["r2"])[:5]},
            "representative_shapes": int(models.latency.n_reps), "replay_nodes": int(len(models.latency.slack))}


def run_scenario(telemetry: Telemetry, scale: float, cpu_share: float, disk_share: float) -> tuple[dict, dict]:
    config = scenario_config(telemetry, scale, cpu_share, disk_share)
    models = build_models(telemetry, config)
    evaluator = PlanEvaluator(models)
    seeds = [baselines.busiest_first(evaluator), baselines.community_grouping(evaluator)]
    result = nsga2_search(evaluator, seeds=seeds)
    front = result.archive.objectives
    plans = {name: describe_plan(evaluator, fn(evaluator), [name]) for name, fn in (
        ("busiest-first", baselines.busiest_first), ("community-grouping", baselines.community_grouping),
        ("min-cut-grouping", baselines.mincut_grouping))}
    random = baselines.random_search(evaluator, result.evaluated, seed=1)
    random_vs_atlas = hypervolume_ratio(random.archive.objectives, front) if len(random.archive.objectives) else 0.0
    summary = {"scale": scale, "onprem_cpu_share": cpu_share, "onprem_disk_share": disk_share,
               "free_components": evaluator.n_bits, "pareto_size": int(len(front)), "search_seconds": result.seconds,
               "evaluated": result.evaluated,
               "vs": {name: compare(evaluator, result.archive, plan) for name, plan in plans.items()},
               "random_search_hv_ratio_vs_atlas": random_vs_atlas,
               "baseline_feasible": {name: plan["feasible"] for name, plan in plans.items()}}
    chart_plans = [{"objectives": {"cost_per_month": o[0], "latency_inflation": o[1], "disruption": o[2]}, "labels": []}
                   for o in front]
    return summary, {"plans": chart_plans, "baselines": plans}


def optimality(telemetry: Telemetry) -> tuple[dict, dict]:
    config = scenario_config(telemetry, 5.0, 0.6, 0.7, ENUMERABLE_PINS)
    evaluator = PlanEvaluator(build_models(telemetry, config))
    exact = baselines.exhaustive(evaluator)
    found = nsga2_search(evaluator)
    raw = np.random.default_rng(0).random((1 << 16, evaluator.n_bits)) < 0.5
    start = time.perf_counter()
    evaluator.evaluate_chunked(raw)
    raw_rate = len(raw) / (time.perf_counter() - start)
    summary = {"free_components": evaluator.n_bits, "plans": 1 << evaluator.n_bits,
               "exhaustive_seconds": exact.seconds, "exhaustive_plans_per_second": exact.plans_per_second,
               "evaluator_plans_per_second": raw_rate,
               "exhaustive_front_size": int(len(exact.archive.objectives)), "search_seconds": found.seconds,
               "search_evaluated": found.evaluated, "search_front_size": int(len(found.archive.objectives)),
               "hypervolume_ratio": hypervolume_ratio(found.archive.objectives, exact.archive.objectives),
               "exact_point_coverage": coverage(found.archive.objectives, exact.archive.objectives)}
    chart = {"plans": [{"objectives": {"cost_per_month": o[0], "latency_inflation": o[1], "disruption": o[2]},
                        "labels": []} for o in found.archive.objectives],
             "reference": exact.archive.objectives[:, :2].tolist()}
    return summary, chart


def _apis(names: list[str] | None) -> str:
    """Disrupted APIs, shortened ('-' for none, 'n/a' without a plan)."""
    if names is None:
        return "n/a"
    return ", ".join(short_api(name) for name in names) or "-"


def markdown(results: dict) -> str:
    lines = ["# Atlas benchmark", "", f"Machine: {results['machine']}", "",
             "## Latency model", "",
             f"On-prem reproduction: max |predicted - measured| over mean and p95 of 9 APIs = "
             f"{results['fidelity']['max_abs_error_ms']:.2e} ms.",
             f"Footprint: {results['fidelity']['footprint']['series']} edge-direction series, median R² "
             f"{results['fidelity']['footprint']['median_r2']:.3f}, {100 * results['fidelity']['footprint']['share_r2_over_0.9']:.0f}% "
             f"with R² > 0.9, median relative error {results['fidelity']['footprint']['median_relative_error']:.3f}.", "",
             "## Search vs baselines (all 27 application components free)", "",
             DISRUPTION_RULE, "",
             "| scale | CPU share | disk share | baseline | baseline $/mo | baseline infl. | baseline disrupted | "
             "Atlas infl. at <= cost | disrupted | latency gain | Atlas $ at <= infl. | disrupted | cost saving | search s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in results["scenarios"]:
        for name, c in s["vs"].items():
            gain = "-" if c["latency_inflation_reduction"] is None else f"{100 * c['latency_inflation_reduction']:.0f}%"
            saving = "-" if c["cost_reduction"] is None else f"{100 * c['cost_reduction']:.0f}%"
            ai = "-" if c["atlas_inflation_at_equal_or_lower_cost"] is None else f"{100 * c['atlas_inflation_at_equal_or_lower_cost']:.0f}%"
            ac = "-" if c["atlas_cost_at_equal_or_lower_inflation"] is None else f"{c['atlas_cost_at_equal_or_lower_inflation']:.0f}"
            lines.append(f"| {s['scale']} | {s['onprem_cpu_share']} | {s['onprem_disk_share']} | {name} | "
                         f"{c['baseline_cost']:.0f} | {100 * c['baseline_inflation']:.0f}% | {_apis(c['baseline_disrupted_apis'])} | "
                         f"{ai} | {_apis(c['atlas_disrupted_apis_at_equal_or_lower_cost'])} | {gain} | {ac} | "
                         f"{_apis(c['atlas_disrupted_apis_at_equal_or_lower_inflation'])} | {saving} | "
                         f"{s['search_seconds']:.1f} |")
    o = results["optimality"]
    lines += ["", "## Optimality on the enumerable instance", "",
              f"{o['free_components']} free components = {o['plans']} plans. Exhaustive: {o['exhaustive_seconds']:.1f} s "
              f"({o['exhaustive_plans_per_second']:.0f} plans/s incl. Pareto filtering; raw evaluator "
              f"{o['evaluator_plans_per_second']:.0f} plans/s). NSGA-II + local search: {o['search_seconds']:.1f} s, "
              f"{o['search_evaluated']} plans scored, hypervolume ratio {o['hypervolume_ratio']:.4f}, "
              f"{100 * o['exact_point_coverage']:.0f}% of the {o['exhaustive_front_size']} exhaustive Pareto points found exactly.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--data", default=os.environ.get("ATLAS_DATA_DIR", str(REPO / ".." / "shared" / "data" / "atlas")))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    telemetry = load_directory(args.data)
    results = {"machine": f"{os.cpu_count()} CPU cores, no GPU", "fidelity": fidelity(telemetry), "scenarios": []}
    charts = None
    for scale, cpu_share, disk_share in SCENARIOS:
        summary, chart = run_scenario(telemetry, scale, cpu_share, disk_share)
        results["scenarios"].append(summary)
        charts = charts or chart
        print(f"scenario scale={scale} cpu={cpu_share} disk={disk_share} (Atlas disruption <= baseline's): "
              + ", ".join(f"{n} (disrupts {_apis(c['baseline_disrupted_apis'])}): "
                          f"-{100 * (c['latency_inflation_reduction'] or 0):.0f}% latency, "
                          f"-{100 * (c['cost_reduction'] or 0):.0f}% cost" for n, c in summary["vs"].items()), flush=True)
    results["optimality"], exhaustive_chart = optimality(telemetry)
    print(json.dumps(results["optimality"], indent=1), flush=True)
    (out / "atlas_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "atlas_results.md").write_text(markdown(results), encoding="utf-8")
    pareto_chart(charts["plans"], charts["baselines"], out / "atlas_pareto.png")
    pareto_chart(exhaustive_chart["plans"], {}, out / "atlas_exhaustive.png", exhaustive_chart["reference"])
    print(markdown(results))


if __name__ == "__main__":
    main()
