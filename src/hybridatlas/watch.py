"""Monitoring: re-run the advice on each new telemetry window and say when the current plan stops
fitting the forecast (a constraint is violated) or is dominated by a plan the new search found."""

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


def check_plan(telemetry: Telemetry, config: AtlasConfig, current: list[str] | None) -> dict[str, Any]:
    """Advice for this telemetry and the verdict on `current` (None: adopt the balanced plan)."""
    models = build_models(telemetry, config)
    advice = advise(models, with_baselines=False)
    recommended = advice.labelled("balanced") or advice.plans[0]
    event: dict[str, Any] = {"rates_per_s": models.rates, "recommended": recommended["cloud"],
                             "recommended_objectives": recommended["objectives"]}
    if current is None:
        return event | {"status": "adopted", "plan": recommended["cloud"], "objectives": recommended["objectives"]}
    evaluator = PlanEvaluator(models)
    plan = describe_plan(evaluator, evaluator.bits_for(current))
    mine = np.array(list(plan["objectives"].values()))
    front = np.array([list(p["objectives"].values()) for p in advice.plans if p["feasible"]]).reshape(-1, 3)
    dominated = bool(((front <= mine + 1e-9).all(axis=1) & (front < mine - 1e-9).any(axis=1)).any())
    if not plan["feasible"]:
        status = "stops fitting the forecast"
    elif dominated:
        status = "dominated"
    else:
        status = "ok"
    return event | {"status": status, "plan": current, "objectives": plan["objectives"],
                    "violations": plan["violations"]}


def watch_windows(telemetry: Telemetry, config: AtlasConfig, window_minutes: float,
                  plan: list[str] | None) -> Iterator[dict[str, Any]]:
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
        current = event["plan"] if event["status"] in ("adopted", "ok") else event["recommended"]
        yield {"window_end": float(min(end, times[-1]))} | event


def watch_live(load: Callable[[float, float], Telemetry], config: AtlasConfig, interval_s: float,
               iterations: int, plan: list[str] | None,
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
        current = event["plan"] if event["status"] in ("adopted", "ok") else event["recommended"]
        yield {"window_end": now} | event
