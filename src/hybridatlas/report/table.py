"""Rich tables for the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def short_api(api: str) -> str:
    """The last two path segments of an API name ('/wrk2-api/user/login' -> 'user/login')."""
    return api.rsplit("/", 2)[-2] + "/" + api.rsplit("/", 1)[-1] if api.count("/") > 1 else api


def plans_table(plans: list[dict[str, Any]], baselines: dict[str, dict[str, Any]] | None = None) -> Table:
    """One row per plan: labels, cost, latency inflation, disrupted APIs, what moves."""
    table = Table(title="Atlas plans (Pareto set)", show_lines=False)
    for column in ("#", "labels", "$/month", "latency +%", "disrupted", "feasible", "moved to cloud"):
        table.add_column(column, overflow="fold")
    rows = [(str(i), plan) for i, plan in enumerate(plans)]  # numbering of the plans shown
    rows += [(name, plan) for name, plan in (baselines or {}).items() if "objectives" in plan and "cloud" in plan]
    for key, plan in rows:
        objectives = plan["objectives"]
        table.add_row(key, ", ".join(plan["labels"]), f"{objectives['cost_per_month']:.2f}",
                      f"{100 * objectives['latency_inflation']:.1f}", str(len(plan["disrupted_apis"])),
                      "yes" if plan["feasible"] else "NO", ", ".join(plan["cloud"]) or "-")
    return table


def latency_table(plan: dict[str, Any]) -> Table:
    """Per-API latency before and after one plan."""
    table = Table(title=f"Per-API latency: {', '.join(plan['labels']) or 'plan'}")
    for column in ("API", "mean before ms", "mean after ms", "p95 before ms", "p95 after ms", "disrupted"):
        table.add_column(column)
    for api, row in plan["latency"].items():
        table.add_row(short_api(api), f"{row['before_mean_ms']:.2f}", f"{row['mean_ms']:.2f}",
                      f"{row['before_p95_ms']:.2f}", f"{row['p95_ms']:.2f}",
                      "yes" if api in plan["disrupted_apis"] else "")
    return table


def cost_table(plan: dict[str, Any]) -> Table:
    table = Table(title="Monthly cloud cost")
    for part in plan["cost"]:
        table.add_column(part)
    table.add_row(*(f"{value:.2f}" for value in plan["cost"].values()))
    return table


def print_plan(console: Console, plan: dict[str, Any]) -> None:
    console.print(latency_table(plan))
    console.print(cost_table(plan))
    if plan["violations"]:
        console.print(f"[red]constraint violations:[/red] {plan['violations']}")
    for pin in plan.get("pin_violations", []):
        console.print(f"[red]pin violated:[/red] {pin}")
