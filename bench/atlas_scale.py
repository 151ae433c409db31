"""Atlas at scale: synthetic applications of 100, 300 and 1,000 components (synthetic.random_app).

For each size: telemetry in the real formats, models, then `advise` as users run it (NSGA-II + local
search, timed), its front against a long run (population 400, --long-generations: hypervolume ratio),
and, with all but ENUMERABLE components pinned, against the exhaustive front.

Usage: python bench/atlas_scale.py [--out bench/results] [--sizes 100,300,1000]
Writes atlas_scale.json and atlas_scale.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from hybridatlas.advisor import advise
from hybridatlas.config import AtlasConfig
from hybridatlas.ingest.dataset import load_directory
from hybridatlas.pipeline import build_models
from hybridatlas.search import baselines
from hybridatlas.search.evaluator import PlanEvaluator
from hybridatlas.search.nsga import nsga2_search
from hybridatlas.search.quality import hypervolume_ratio
from hybridatlas.synthetic import generate, random_app

REPO = Path(__file__).resolve().parents[1]
ENUMERABLE = 18
SCALE, CPU_SHARE = 3.0, 0.6


def scenario(telemetry, pins: list[str] | None = None) -> AtlasConfig:
    probe = build_models(telemetry, AtlasConfig.load(overrides={"forecast": {"scale": SCALE}}))
    overrides = {"forecast": {"scale": SCALE}, "onprem": {"cpu_cores": CPU_SHARE * probe.demand("cpu_cores").sum()}}
    if pins is not None:
        overrides["placement"] = {"pinned_onprem": ["istio-ingressgateway", *pins]}
    return AtlasConfig.load(overrides=overrides)


def run_size(n: int, workdir: Path, long_generations: int, exhaustive: bool) -> dict:
    app = random_app(n, seed=n)
    data = generate(workdir / f"app{n}", seed=n, traces_per_api=20, minutes=30, app=app)
    telemetry = load_directory(data)
    started = time.perf_counter()
    models = build_models(telemetry, scenario(telemetry))
    model_s = time.perf_counter() - started
    started = time.perf_counter()
    advice = advise(models, with_baselines=False)
    advise_s = time.perf_counter() - started
    front = np.array([[p["objectives"][k] for k in ("cost_per_month", "latency_inflation", "disruption")]
                      for p in advice.plans if p["feasible"]])
    evaluator = PlanEvaluator(models)
    seeds = [baselines.busiest_first(evaluator), baselines.community_grouping(evaluator)]
    row = {"components": len(models.components), "apis": len(models.apis), "free": evaluator.n_bits,
           "replay_nodes": int(len(models.latency.slack)), "model_seconds": model_s, "advise_seconds": advise_s,
           "advise_evaluated": advice.search["evaluated"], "front": int(len(front))}
    if long_generations:
        long = nsga2_search(evaluator, population=400, generations=long_generations, seeds=seeds)
        row.update({"long_run_generations": long_generations, "long_run_seconds": long.seconds,
                    "long_run_evaluated": long.evaluated,
                    "hv_ratio_vs_long_run": hypervolume_ratio(front, long.archive.objectives) if len(front) else 0.0})
    if not exhaustive:
        return row
    free = [c for c in models.free_components]
    keep = set(sorted(free, key=lambda c: -models.forecast.get(c, {}).get("cpu_cores", 0.0))[:ENUMERABLE])
    small = build_models(telemetry, scenario(telemetry, [c for c in free if c not in keep]))
    small_eval = PlanEvaluator(small)
    exact = baselines.exhaustive(small_eval)
    found = nsga2_search(small_eval, seeds=[baselines.busiest_first(small_eval)])
    row.update({"enumerable_free": small_eval.n_bits, "exhaustive_seconds": exact.seconds,
                "search_seconds_on_enumerable": found.seconds,
                "hv_ratio_vs_exhaustive": hypervolume_ratio(found.archive.objectives, exact.archive.objectives)})
    return row


def markdown(rows: list[dict], machine: str) -> str:
    lines = ["# Atlas at scale (synthetic applications)", "", f"Machine: {machine}. Scenario: forecast x{SCALE}, "
             f"on-prem CPU = {CPU_SHARE} of the forecast total.", "",
             "| components | APIs | free | replay nodes | advise s | plans scored | HV ratio vs long run | long run s | "
             f"HV ratio vs exhaustive ({ENUMERABLE} free) | exhaustive s |", "|---|---|---|---|---|---|---|---|---|---|"]
    def cell(row: dict, key: str, form: str) -> str:
        return format(row[key], form) if key in row else "not run"

    for r in rows:
        lines.append(f"| {r['components']} | {r['apis']} | {r['free']} | {r['replay_nodes']} | {r['advise_seconds']:.1f} | "
                     f"{r['advise_evaluated']} | {cell(r, 'hv_ratio_vs_long_run', '.4f')} | "
                     f"{cell(r, 'long_run_seconds', '.0f')} | {cell(r, 'hv_ratio_vs_exhaustive', '.4f')} | "
                     f"{cell(r, 'exhaustive_seconds', '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--long-generations", type=int, default=1000,
                        help="generations of the long reference run (0: no long run)")
    parser.add_argument("--exhaustive", action=argparse.BooleanOptionalAction, default=True,
                        help=f"compare with the exhaustive front on {ENUMERABLE} free components")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(run_size(n, Path(workdir), args.long_generations, args.exhaustive))
            print(json.dumps(rows[-1]), flush=True)
    machine = f"{os.cpu_count()} CPU cores, no GPU"
    (out / "atlas_scale.json").write_text(json.dumps({"machine": machine, "sizes": rows}, indent=2))
    (out / "atlas_scale.md").write_text(markdown(rows, machine))
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
