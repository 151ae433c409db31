"""Monitoring: the operator's plan is judged per window and never silently replaced by the advice."""

import json

from hybridatlas.cli import main


def _watch(capsys, *args: str) -> list[dict]:
    assert main(["watch", "--json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_default_plan_is_nothing_moved_and_never_changes(synthetic_dir, capsys):
    events = _watch(capsys, "--data", str(synthetic_dir), "--window-minutes", "15", "--onprem-cpu", "0.2", "--scale", "3")
    assert len(events) >= 2
    assert all(e["plan"] == [] for e in events)
    assert all(e["status"] == "stops fitting the forecast" and "onprem_cpu_cores" in e["violations"] for e in events)
    assert all(e["recommended"] for e in events)  # the advice is reported beside the plan, not adopted


def test_a_plan_dominated_by_the_advice_is_flagged(synthetic_dir, capsys):
    # without capacity limits, staying on-prem costs nothing and adds no latency: moving a service is
    # feasible but worse in cost and latency than the recommended plan
    events = _watch(capsys, "--data", str(synthetic_dir), "--window-minutes", "20", "--plan", "catalog-service")
    assert events and all(e["status"] == "dominated" and e["plan"] == ["catalog-service"] for e in events)
    assert all(e["recommended"] == [] for e in events)
    assert events[0]["objectives"]["cost_per_month"] > events[0]["recommended_objectives"]["cost_per_month"]


def test_a_plan_that_stops_fitting_is_flagged(synthetic_dir, capsys):
    events = _watch(capsys, "--data", str(synthetic_dir), "--window-minutes", "20", "--onprem-cpu", "0.05",
                    "--plan", "cart-service")
    assert events[0]["status"] == "stops fitting the forecast" and "onprem_cpu_cores" in events[0]["violations"]
    assert all(e["plan"] == ["cart-service"] for e in events)


def test_follow_switches_to_the_recommendation(synthetic_dir, capsys):
    events = _watch(capsys, "--data", str(synthetic_dir), "--window-minutes", "15", "--onprem-cpu", "0.2", "--scale", "3",
                    "--follow")
    assert events[0]["plan"] == [] and events[0]["status"] == "stops fitting the forecast"
    assert events[1]["plan"] == events[0]["recommended"] and events[1]["status"] == "ok"


def test_text_output_shows_plan_and_recommendation(synthetic_dir, capsys):
    assert main(["watch", "--data", str(synthetic_dir), "--window-minutes", "20", "--plan", "catalog-service"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert "dominated plan=catalog-service recommended=-" in line
