"""Self-contained HTML report: plans, per-API latency before/after, cost breakdown, the call graph
as inline SVG with the edges a plan cuts highlighted, and the Pareto chart embedded as PNG."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

import networkx as nx

from hybridatlas.advisor import Advice

WIDTH, HEIGHT = 980, 560
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#f3f3f3}
td.l{text-align:left}.bad{color:#b00}h2{margin-top:2em}.lab{font-weight:bold;color:#064}"""


def call_graph_svg(advice: Advice, plan: dict[str, Any]) -> str:
    """Components laid out by call depth from the gateway; cloud nodes orange, cut edges red."""
    models = advice.models
    graph = nx.DiGraph()
    for api_graph in models.graphs.values():
        graph.add_edges_from(api_graph.calls)
    depth = nx.single_source_shortest_path_length(graph.to_undirected(), models.config.gateway) \
        if models.config.gateway in graph else {}
    for node in graph.nodes:
        graph.nodes[node]["layer"] = depth.get(node, max(depth.values(), default=0) + 1)
    position = nx.multipartite_layout(graph, subset_key="layer", align="vertical")
    xs = [p[0] for p in position.values()]
    ys = [p[1] for p in position.values()]

    def scale(p: tuple[float, float]) -> tuple[float, float]:
        x = 40 + (p[0] - min(xs)) / ((max(xs) - min(xs)) or 1) * (WIDTH - 260)
        y = 40 + (p[1] - min(ys)) / ((max(ys) - min(ys)) or 1) * (HEIGHT - 70)
        return x, y

    cloud, cut = set(plan["cloud"]), {tuple(edge) for edge in plan["cut_edges"]}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-size="10">',
             '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
             'orient="auto"><path d="M0,0L10,5L0,10z" fill="#888"/></marker></defs>',
             '<text x="10" y="16">blue: on-prem · orange: cloud · red: call edge cut by the plan (crosses the WAN)</text>']
    for a, b in graph.edges:
        (x1, y1), (x2, y2) = scale(position[a]), scale(position[b])
        color, width = ("#d00", 2.5) if (a, b) in cut else ("#999", 1)
        parts.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" stroke="{color}" '
                     f'stroke-width="{width}" marker-end="url(#a)"><title>{escape(a)} → {escape(b)}</title></line>')
    for node in graph.nodes:
        x, y = scale(position[node])
        fill = "#f90" if node in cloud else "#39c"
        parts.append(f'<circle cx="{x:.0f}" cy="{y:.0f}" r="7" fill="{fill}"><title>{escape(node)}</title></circle>'
                     f'<text x="{x + 9:.0f}" y="{y + 4:.0f}">{escape(node)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _plans_rows(plans: list[dict[str, Any]]) -> str:
    rows = []
    for i, plan in enumerate(plans):
        o = plan["objectives"]
        rows.append(f"<tr><td>{i}</td><td class='l lab'>{escape(', '.join(plan['labels']))}</td>"
                    f"<td>{o['cost_per_month']:.2f}</td><td>{100 * o['latency_inflation']:.1f}</td>"
                    f"<td>{escape(', '.join(plan['disrupted_apis'])) or '-'}</td>"
                    f"<td class='{'' if plan['feasible'] else 'bad'}'>{'yes' if plan['feasible'] else 'NO'}</td>"
                    f"<td class='l'>{escape(', '.join(plan['cloud'])) or '-'}</td></tr>")
    return "".join(rows)


def _plan_section(advice: Advice, plan: dict[str, Any]) -> str:
    latency = "".join(
        f"<tr><td class='l'>{escape(api)}</td><td>{r['before_mean_ms']:.2f}</td><td>{r['mean_ms']:.2f}</td>"
        f"<td>{r['before_p95_ms']:.2f}</td><td>{r['p95_ms']:.2f}</td></tr>" for api, r in plan["latency"].items())
    cost = "".join(f"<td>{v:.2f}</td>" for v in plan["cost"].values())
    violations = (f"<p class='bad'>Constraint violations: {escape(str(plan['violations']))}</p>"
                  if plan["violations"] else "")
    return (f"<h2>Plan: {escape(', '.join(plan['labels']))}</h2><p>Moves: {escape(', '.join(plan['cloud'])) or 'nothing'}"
            f"</p>{violations}<table><tr><th>API</th><th>mean before (ms)</th><th>mean after (ms)</th>"
            f"<th>p95 before (ms)</th><th>p95 after (ms)</th></tr>{latency}</table>"
            f"<table><tr>{''.join(f'<th>{escape(k)}</th>' for k in plan['cost'])}</tr><tr>{cost}</tr></table>"
            f"<p>Disrupted APIs: {escape(', '.join(plan['disrupted_apis'])) or 'none'}</p>"
            f"{call_graph_svg(advice, plan)}")


def html_report(advice: Advice, path: str | Path, chart_png: Path | None = None) -> Path:
    """Write the report; the chart (if given) is embedded so the file stands alone."""
    search = advice.search
    chart = ""
    if chart_png is not None and chart_png.is_file():
        chart = f"<img alt='Pareto chart' src='data:image/png;base64,{base64.b64encode(chart_png.read_bytes()).decode()}'>"
    baselines = [plan for plan in advice.baselines.values() if "cloud" in plan]
    labelled = [plan for plan in advice.plans if plan["labels"]]
    body = (f"<h1>Atlas migration advice</h1><p>{search['evaluated']} plans scored in {search['seconds']:.2f} s "
            f"({search['plans_per_second']:.0f} plans/s); {len(search['free_components'])} free components; "
            f"pinned on-prem: {escape(', '.join(search['pinned_onprem']))}. WAN: RTT {advice.models.config.rtt_ms} ms."
            f"</p>{chart}<h2>Pareto set</h2><table><tr><th>#</th><th>labels</th><th>$/month</th>"
            f"<th>latency +%</th><th>disrupted APIs</th><th>feasible</th><th>moved to cloud</th></tr>"
            f"{_plans_rows(advice.plans)}</table>"
            + (f"<h2>Baselines</h2><table><tr><th>#</th><th>baseline</th><th>$/month</th><th>latency +%</th>"
               f"<th>disrupted APIs</th><th>feasible</th><th>moved to cloud</th></tr>{_plans_rows(baselines)}</table>"
               if baselines else "")
            + "".join(_plan_section(advice, plan) for plan in labelled))
    path = Path(path)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Atlas report</title>"
                    f"<style>{STYLE}</style></head><body>{body}</body></html>", encoding="utf-8")
    return path
