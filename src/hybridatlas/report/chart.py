"""Pareto-front chart (PNG): cost vs latency inflation, coloured by disruption, baselines marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto_chart(plans: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], path: str | Path,
                 reference_front: list[list[float]] | None = None) -> Path:
    """Write the chart to `path`; `reference_front` (e.g. exhaustive) is drawn as small grey points."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if reference_front:
        ax.scatter([p[0] for p in reference_front], [100 * p[1] for p in reference_front], s=10, c="lightgrey",
                   label="exhaustive front")
    cost = [p["objectives"]["cost_per_month"] for p in plans]
    inflation = [100 * p["objectives"]["latency_inflation"] for p in plans]
    disruption = [p["objectives"]["disruption"] for p in plans]
    points = ax.scatter(cost, inflation, c=disruption, cmap="viridis", s=36, label="Atlas Pareto set", zorder=3)
    fig.colorbar(points, ax=ax, label="disruption (weighted APIs)")
    for plan, x, y in zip(plans, cost, inflation):
        if plan["labels"]:
            ax.annotate(", ".join(plan["labels"]), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    markers = iter("sX^Dv")
    for name, plan in baselines.items():
        if "cloud" in plan:
            ax.scatter(plan["objectives"]["cost_per_month"], 100 * plan["objectives"]["latency_inflation"],
                       marker=next(markers), s=70, edgecolors="black", facecolors="none", label=name, zorder=4)
    ax.set_xlabel("cloud cost ($/month)")
    ax.set_ylabel("mean API latency inflation (%)")
    ax.set_title("Atlas: cost vs latency of hybrid plans")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
