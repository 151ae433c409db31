"""Monitoring: re-run the advice on each new telemetry window and say when the operator's current plan
stops fitting the forecast (a constraint is violated) or is dominated by a plan the new search found.

The current plan is what the operator says is deployed (default: nothing moved). It is never assumed
that the advice was adopted: the recommended plan is reported beside it, and the current plan only
changes to the recommendation when the caller asks to `follow` it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import numpy as np

from hybridatlas.advisor import advise, describe_plan
from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasInputError
from hybridatlas.ingest.dataset import Telemetry, telemetry_until
from hybridatlas.pipeline import build_models
from hybridatlas.search.evaluator import PlanEvaluator

OK, STOPS_FITTING, DOMINATED = "ok", "stops fitting the forecast", "dominated"


def verdict(plan: dict[str, Any], front: list[dict[str, Any]]) -> str:
    """OK, STOPS_FITTING (a constraint is violated) or DOMINATED (a feasible plan of `front` is at least as
    good in every objective and better in one) for a described plan."""
    if not plan["feasible"]:
        return STOPS_FITTING
    mine = np.array(list(plan["objectives"].values()))
    others = np.array([list(p["objectives"].values()) for p in front if p["feasible"]]).reshape(-1, len(mine))
    dominated = ((others <= mine + 1e-9).all(axis=1) & (others < mine - 1e-9).any(axis=1)).any()
    return DOMINATED if dominated else OK


def check_plan(telemetry: Telemetry, config: AtlasConfig, current: list[str]) -> dict[str, Any]:
    """Verdict on the plan `current` (components in the cloud) under this telemetry, and the advice's
    recommended (balanced) plan reported separately."""
    models = build_models(telemetry, config)
    advice = advise(models, with_baselines=False)
    recommended = advice.labelled("balanced") or advice.plans[0]
    evaluator = PlanEvaluator(models)
    plan = describe_plan(evaluator, evaluator.bits_for(current))
    return {"status": verdict(plan, advice.plans), "plan": plan["cloud"], "objectives": plan["objectives"],
            "violations": plan["violations"], "recommended": recommended["cloud"],
            "recommended_objectives": recommended["objectives"], "rates_per_s": models.rates}


def next_plan(event: dict[str, Any], current: list[str], follow: bool) -> list[str]:
    """The plan to check next: the recommendation if following it and the current plan is not OK."""
    return event["recommended"] if follow and event["status"] != OK else current


def watch_windows(telemetry: Telemetry, config: AtlasConfig, window_minutes: float,
                  plan: list[str], follow: bool = False) -> Iterator[dict[str, Any]]:
    """Replay the recorded series window by window, as if each window had just arrived."""
    if telemetry.api_calls is None:
        raise AtlasInputError("watch", "needs per-API call series to cut into windows")
    times = telemetry.api_calls.timestamps
    if window_minutes <= 0:
        raise AtlasInputError("--window-minutes", "must be > 0")
    current = plan
    for end in np.arange(times[0] + window_minutes * 60.0, times[-1] + window_minutes * 60.0, window_minutes * 60.0):
        window = telemetry_until(telemetry, float(min(end, times[-1])))
        recent = window.api_calls.window(float(end) - window_minutes * 60.0, None)  # type: ignore[union-attr]
        if not np.nansum(recent.values) > 0:
            yield {"window_end": float(end), "status": "no traffic in this window; plan kept", "plan": current}
            continue
        event = check_plan(window, config, current)
        current = next_plan(event, current, follow)
        yield {"window_end": float(min(end, times[-1]))} | event


def watch_live(load: Callable[[float, float], Telemetry], config: AtlasConfig, interval_s: float,
               iterations: int, plan: list[str], follow: bool = False,
               clock: Callable[[], float] = time.time) -> Iterator[dict[str, Any]]:
    """Every `interval_s`, load the last forecast.history_minutes of live telemetry up to `clock()`
    and check the plan."""
    history_s = float(config.forecast["history_minutes"]) * 60.0
    current = plan
    for iteration in range(iterations):
        if iteration:
            time.sleep(interval_s)
        now = clock()
        event = check_plan(load(now - history_s, now), config, current)
        current = next_plan(event, current, follow)
        yield {"window_end": now} | event
