"""Command line: `hybridatlas advise | evaluate | validate | calibrate | inspect | watch | synth`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasDataWarning, AtlasInputError

if TYPE_CHECKING:
    from hybridatlas.ingest.dataset import Telemetry
    from hybridatlas.pipeline import AtlasModels

EXAMPLE_DATA_HINT = "give --data DIR, explicit files (--traces ...), or --prometheus/--jaeger URLs"


def _csv_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise AtlasInputError(flag, f"expected onprem, cloud or a number, got {text!r}") from None


def _pairs(text: str, flag: str) -> dict[str, float]:
    """'a=1,b=2' -> {'a': 1.0, 'b': 2.0}; API names may contain '/' but not ',' or '='."""
    out = {}
    for item in _csv_list(text):
        name, sep, value = item.rpartition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise AtlasInputError(flag, f"expected NAME=NUMBER items separated by commas, got {item!r}")
    return out


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("telemetry (files)")
    group.add_argument("--data", help="directory in the standard layout (traces/, network run, resource runs)")
    group.add_argument("--traces", nargs="+", help="Jaeger JSON files or directories")
    group.add_argument("--request-bytes", help="query_range JSON of per-edge request bytes")
    group.add_argument("--response-bytes", help="query_range JSON of per-edge response bytes")
    group.add_argument("--edge-bytes-csv", help="long CSV: timestamp,source,destination,request_bytes,response_bytes")
    group.add_argument("--api-calls", help="wide CSV of per-API call counts (default: counted from trace roots)")
    group.add_argument("--resources", nargs="+", help="resource runs: directories or resources.csv files")
    group.add_argument("--components", help="components.json (kinds, stateful flags); optional")
    group.add_argument("--kubernetes", help="output of `kubectl get deploy,sts,svc,pvc -o json`: kinds, stateful "
                       "flags, replicas, requests, volume sizes, Service names (makes components.json optional)")
    live = parser.add_argument_group("telemetry (live)")
    live.add_argument("--prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    live.add_argument("--jaeger", help="Jaeger query base URL, e.g. http://127.0.0.1:16686")
    live.add_argument("--start", type=float, help="start, Unix seconds (live)")
    live.add_argument("--end", type=float, help="end, Unix seconds (live)")
    live.add_argument("--step", type=float, default=5.0, help="query step in seconds (live)")
    live.add_argument("--jaeger-limit", type=int, help="most traces fetched per Jaeger service (live.jaeger_limit)")
    knobs = parser.add_argument_group("configuration")
    knobs.add_argument("--config", help="TOML or JSON file merged over the packaged defaults")
    knobs.add_argument("--scale", type=float, help="multiply the forecast traffic (forecast.scale)")
    knobs.add_argument("--rates", help="expected calls/s per API: API=RPS,... (overrides history)")
    knobs.add_argument("--mix", help="expected traffic mix: API=WEIGHT,... (with --rps)")
    knobs.add_argument("--rps", type=float, help="total expected requests/s for --mix")
    knobs.add_argument("--onprem-cpu", type=float, help="on-prem CPU cores available")
    knobs.add_argument("--onprem-memory", type=float, help="on-prem memory GiB available")
    knobs.add_argument("--onprem-disk", type=float, help="on-prem disk GiB available")
    knobs.add_argument("--budget", type=float, help="monthly cloud budget")
    knobs.add_argument("--pin-onprem", help="components that must stay on-prem (comma-separated)")
    knobs.add_argument("--pin-cloud", help="components that must move (comma-separated)")
    knobs.add_argument("--critical", help="critical APIs (comma-separated)")
    knobs.add_argument("--ingress", help="where users' traffic enters: onprem (default), cloud, or the cloud share "
                       "of requests (0-1)")
    knobs.add_argument("--rtt-ms", type=float, help="WAN round-trip time")
    knobs.add_argument("--bandwidth-gbps", type=float, help="WAN bandwidth")


def config_from_args(args: argparse.Namespace) -> AtlasConfig:
    overrides: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("forecast", "scale", args.scale)
    put("onprem", "cpu_cores", args.onprem_cpu)
    put("onprem", "memory_gib", args.onprem_memory)
    put("onprem", "disk_gib", args.onprem_disk)
    put("wan", "rtt_ms", args.rtt_ms)
    put("wan", "bandwidth_gbps", args.bandwidth_gbps)
    put("live", "jaeger_limit", args.jaeger_limit)
    if args.budget is not None:
        overrides["budget_per_month"] = args.budget
    if args.ingress is not None:
        overrides["ingress"] = args.ingress if args.ingress in ("onprem", "cloud") else _number(args.ingress, "--ingress")
    base = AtlasConfig.load(args.config)
    if args.pin_onprem:
        put("placement", "pinned_onprem", base.pinned_onprem + _csv_list(args.pin_onprem))
    if args.pin_cloud:
        put("placement", "pinned_cloud", base.pinned_cloud + _csv_list(args.pin_cloud))
    if args.critical:
        put("availability", "critical_apis", _csv_list(args.critical))
    return AtlasConfig.load(args.config, overrides)


def telemetry_from_args(args: argparse.Namespace, config: AtlasConfig) -> Telemetry:
    from hybridatlas.ingest import dataset

    if args.prometheus or args.jaeger:
        if args.start is None or args.end is None:
            raise AtlasInputError("--start/--end", "live queries need a time range")
        if args.end <= args.start:
            raise AtlasInputError("--start/--end", f"end {args.end} is not after start {args.start}")
        telemetry = dataset.load_live(config, args.prometheus, args.jaeger, args.start, args.end, args.step, args.traces)
        if args.resources:
            telemetry.resource_runs = [dataset.load_resource_run(path) for path in args.resources]
        telemetry.add_components(args.kubernetes, args.components, config.kind_of)
        return telemetry
    if args.data:
        telemetry = dataset.load_directory(args.data, config.kind_of)
        if args.kubernetes or args.components:
            telemetry.add_components(args.kubernetes, args.components, config.kind_of)
        return telemetry
    if not args.traces:
        raise AtlasInputError("telemetry", f"no input: {EXAMPLE_DATA_HINT}")
    telemetry = dataset.Telemetry(traces=dataset.load_traces(args.traces))
    if args.edge_bytes_csv:
        telemetry.request_bytes, telemetry.response_bytes = dataset.load_edge_bytes(args.edge_bytes_csv)
    elif args.request_bytes or args.response_bytes:
        if not (args.request_bytes and args.response_bytes):
            raise AtlasInputError("--request-bytes/--response-bytes", "give both files")
        telemetry.request_bytes, telemetry.response_bytes = dataset.load_edge_bytes(args.request_bytes, args.response_bytes)
    if args.api_calls:
        telemetry.api_calls = dataset.load_api_calls_csv(args.api_calls)
    elif telemetry.request_bytes is not None:
        telemetry.api_calls = dataset.calls_for_byte_series(
            telemetry.traces, telemetry.request_bytes, "--api-calls",
            "--api-calls (a CSV of per-API call counts) for the byte series' period, or --traces recorded during it")
    telemetry.resource_runs = [dataset.load_resource_run(path) for path in args.resources or []]
    telemetry.add_components(args.kubernetes, args.components, config.kind_of)
    return telemetry


def expected_rates(args: argparse.Namespace, telemetry: Telemetry) -> dict[str, float] | None:
    from hybridatlas.models.traffic import rates_from_mix

    if args.rates:
        rates = _pairs(args.rates, "--rates")
        known = telemetry.apis
        return rates_from_mix(rates, sum(rates.values()), known, "--rates") if sum(rates.values()) > 0 else \
            {api: 0.0 for api in known}
    if args.mix:
        if args.rps is None:
            raise AtlasInputError("--mix", "needs --rps (total requests per second)")
        return rates_from_mix(_pairs(args.mix, "--mix"), args.rps, telemetry.apis, "--mix")
    return None


def _models(args: argparse.Namespace) -> AtlasModels:
    from hybridatlas.pipeline import build_models

    config = config_from_args(args)
    telemetry = telemetry_from_args(args, config)
    return build_models(telemetry, config, expected_rates(args, telemetry))


def cmd_advise(args: argparse.Namespace, console: Console) -> int:
    from hybridatlas.advisor import advise
    from hybridatlas.report.chart import pareto_chart
    from hybridatlas.report.html import html_report
    from hybridatlas.report.table import plans_table, print_plan

    advice = advise(_models(args), with_baselines=not args.no_baselines)
    result = advice.to_dict()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "advice.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        chart = pareto_chart(advice.plans, advice.baselines, out / "pareto.png")
        html_report(advice, out / "report.html", chart)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    shown = advice.plans if args.all else [plan for plan in advice.plans if plan["labels"]]
    console.print(plans_table(shown, advice.baselines))
    if len(shown) < len(advice.plans):
        console.print(f"{len(advice.plans) - len(shown)} more Pareto plans: --all, --json or advice.json (--out)")
    if advice.search["note"]:
        console.print(f"[cyan]note:[/cyan] {advice.search['note']}")
    chosen = advice.labelled("balanced") or advice.plans[0]
    print_plan(console, chosen)
    console.print(f"{advice.search['evaluated']} plans scored in {advice.search['seconds']:.2f} s "
                  f"({advice.search['plans_per_second']:.0f} plans/s)")
    if args.out:
        console.print(f"wrote {args.out}/advice.json, pareto.png, report.html")
    return 0


def cmd_evaluate(args: argparse.Namespace, console: Console) -> int:
    from hybridatlas.advisor import describe_plan
    from hybridatlas.report.table import print_plan
    from hybridatlas.search.evaluator import PlanEvaluator

    models = _models(args)
    evaluator = PlanEvaluator(models, str(models.config.search.get("latency_apis", "all")))
    cloud = _csv_list(args.cloud)
    plan = describe_plan(evaluator, None, ["what-if"], cloud + sorted(models.pinned_cloud - set(cloud)))
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        console.print(f"moving {', '.join(plan['cloud']) or 'nothing'}: ${plan['cost']['total']:.2f}/month, "
                      f"latency +{100 * plan['objectives']['latency_inflation']:.1f}%")
        print_plan(console, plan)
    return 0


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    models = _models(args)
    info = {
        "components": {c: {"kind": models.kinds[c], "stateful": c in models.stateful,
                           "pinned": "on-prem" if c in models.pinned_onprem else "cloud" if c in models.pinned_cloud else None,
                           "forecast": models.forecast.get(c)} for c in models.components},
        "call_graphs": {api: {f"{a} -> {b}": calls for (a, b), calls in g.calls.items()} for api, g in models.graphs.items()},
        "footprint_fit": models.footprint.quality_rows() if models.footprint else [],
        "resource_fit": {c: {m: vars(f) for m, f in fits.items()} for c, fits in models.resources.fits.items()}
        if models.resources else {},
        "forecast_rates_per_s": models.rates,
        "measured_latency_ms": {api: {"mean": float(models.latency.baseline_mean_ms[a]),
                                      "p95": float(models.latency.baseline_p95_ms[a])} for a, api in enumerate(models.apis)},
    }
    if args.json:
        print(json.dumps(info, indent=2, default=float))
        return 0
    table = Table(title="Network footprint fit per edge")
    for column in ("edge", "direction", "R²", "rel. error", "samples", "bytes per call"):
        table.add_column(column, overflow="fold")
    for row in info["footprint_fit"]:
        table.add_row(f"{row['source']} -> {row['destination']}", row["direction"], f"{row['r2']:.3f}",
                      f"{row['relative_error']:.3f}", str(row["samples"]),
                      ", ".join(f"{api}: {v:.0f}" for api, v in row["bytes_per_call"].items()))
    console.print(table)
    forecast = Table(title="Forecast utilisation")
    for column in ("component", "kind", "stateful", "pinned", "CPU cores", "memory GiB", "disk GiB"):
        forecast.add_column(column)
    for name, c in info["components"].items():
        f = c["forecast"] or {}
        forecast.add_row(name, c["kind"], "yes" if c["stateful"] else "", c["pinned"] or "",
                         f"{f.get('cpu_cores', 0):.3f}", f"{f.get('memory_gib', 0):.3f}", f"{f.get('disk_gib', 0):.2f}")
    console.print(forecast)
    console.print("call graphs, resource fits, forecast rates and measured latency: --json")
    return 0


def cmd_watch(args: argparse.Namespace, console: Console) -> int:
    from hybridatlas.ingest.dataset import load_live
    from hybridatlas.watch import OK, watch_live, watch_windows

    config = config_from_args(args)
    plan = _csv_list(args.plan)
    if args.prometheus:
        events = watch_live(lambda start, end: load_live(config, args.prometheus, args.jaeger, start, end,
                                                         args.step, args.traces),
                            config, args.interval, args.iterations, plan, args.follow)
    else:
        events = watch_windows(telemetry_from_args(args, config), config, args.window_minutes, plan, args.follow)
    for event in events:
        if args.json:
            print(json.dumps(event), flush=True)
            continue
        colour = "green" if event["status"] == OK else "yellow"
        line = f"[{colour}]{event['window_end']:.0f}: {event['status']}[/{colour}] plan={','.join(event['plan']) or '-'}"
        if "recommended" in event:
            line += f" recommended={','.join(event['recommended']) or '-'}"
            if args.follow and event["status"] != OK:
                line += " (followed from the next window)"
        console.print(line)
    return 0


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from hybridatlas.ingest.traces import load_traces
    from hybridatlas.report.table import short_api
    from hybridatlas.validate import validate

    report = validate(_models(args), load_traces(args.measured), _csv_list(args.cloud))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"Measured vs predicted mean latency from the entry span on (cloud: {args.cloud or '-'})")
    for column in ("API", "on-prem ms", "measured ms", "predicted ms", "error", "traces"):
        table.add_column(column)
    for api, row in report["apis"].items():
        table.add_row(short_api(api), f"{row['onprem_mean_ms']:.2f}", f"{row['measured_mean_ms']:.2f}",
                      f"{row['predicted_mean_ms']:.2f}", f"{100 * row['error']:+.1f}%", str(row["measured_traces"]))
    console.print(table)
    console.print(f"mean |error| {100 * report['mean_abs_error']:.1f}%, worst {100 * report['max_abs_error']:.1f}%")
    for pin in report["pin_violations"]:
        console.print(f"[yellow]note:[/yellow] the measured placement breaks a pin: {pin}")
    return 0


def cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    if args.source == "stores":
        from hybridatlas.calibrate.stores import measure

        result = measure(args.rtt_ms or 20.0, args.rate_mbit, [int(s) for s in _csv_list(args.sizes)] or None,
                         args.reps, args.idle_s)
    else:
        from hybridatlas.calibrate.traces import learn_round_trips
        from hybridatlas.ingest.traces import load_traces
        from hybridatlas.pipeline import build_models

        if not args.measured:
            raise AtlasInputError("calibrate traces", "needs --measured traces and --cloud (the placement they ran under)")
        config = config_from_args(args)
        telemetry = telemetry_from_args(args, config)
        models = build_models(telemetry, config, expected_rates(args, telemetry))
        result = learn_round_trips(models, telemetry.traces, load_traces(args.measured), _csv_list(args.cloud))
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if args.json:
        print(text)
        return 0
    for rule in result["round_trips"]:
        curve = rule.get("points") or rule.get("base")
        console.print(f"{rule['kind']:>10} {rule['operation']:<24} round trips {curve}  ({rule['why']})")
    if args.out:
        console.print(f"wrote {args.out}: pass it with --config (its round_trips replace the default rules)")
    return 0


def cmd_synth(args: argparse.Namespace, console: Console) -> int:
    from hybridatlas.synthetic import generate

    path = generate(Path(args.out), seed=args.seed, traces_per_api=args.traces_per_api, minutes=args.minutes)
    console.print(f"wrote synthetic telemetry to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridatlas", description="Atlas: hybrid-cloud migration advisor")
    sub = parser.add_subparsers(dest="command", required=True)
    advise_p = sub.add_parser("advise", help="search plans and report the labelled Pareto set")
    add_data_options(advise_p)
    advise_p.add_argument("--out", help="write advice.json, pareto.png and report.html here")
    advise_p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    advise_p.add_argument("--no-baselines", action="store_true", help="skip the baseline plans")
    advise_p.add_argument("--all", action="store_true", help="list every Pareto plan, not only the labelled ones")
    advise_p.set_defaults(func=cmd_advise)
    evaluate_p = sub.add_parser("evaluate", help="score one plan (what-if)")
    add_data_options(evaluate_p)
    evaluate_p.add_argument("--cloud", required=True, help="components to move (comma-separated; '' = none)")
    evaluate_p.add_argument("--json", action="store_true")
    evaluate_p.set_defaults(func=cmd_evaluate)
    inspect_p = sub.add_parser("inspect", help="show the learned models: footprint fit, forecast, call graphs")
    add_data_options(inspect_p)
    inspect_p.add_argument("--json", action="store_true")
    inspect_p.set_defaults(func=cmd_inspect)
    watch_p = sub.add_parser("watch", help="re-run the advice on each new telemetry window")
    add_data_options(watch_p)
    watch_p.add_argument("--plan", default="", help="current plan: components in the cloud (default: nothing moved)")
    watch_p.add_argument("--follow", action="store_true",
                         help="switch the current plan to the recommended one whenever it stops fitting or is "
                              "dominated (default: the plan never changes)")
    watch_p.add_argument("--window-minutes", type=float, default=30.0, help="window length for recorded files")
    watch_p.add_argument("--interval", type=float, default=300.0, help="seconds between live checks")
    watch_p.add_argument("--iterations", type=int, default=12, help="number of live checks")
    watch_p.add_argument("--json", action="store_true", help="one JSON object per window")
    watch_p.set_defaults(func=cmd_watch)
    validate_p = sub.add_parser("validate", help="measured traces under a placement vs Atlas's prediction, per API")
    add_data_options(validate_p)
    validate_p.add_argument("--measured", nargs="+", required=True, help="traces measured under the placement")
    validate_p.add_argument("--cloud", required=True, help="components that ran in the cloud (comma-separated)")
    validate_p.add_argument("--json", action="store_true")
    validate_p.set_defaults(func=cmd_validate)
    calibrate_p = sub.add_parser("calibrate", help="round trips per operation: measured on stores, or learned from traces")
    calibrate_p.add_argument("source", choices=["stores", "traces"],
                             help="stores: time real Redis/memcached/HTTP clients over an emulated WAN (root); "
                                  "traces: learn from traces measured under a placement (--measured, --cloud)")
    add_data_options(calibrate_p)
    calibrate_p.add_argument("--measured", nargs="+", help="traces measured under the placement (traces)")
    calibrate_p.add_argument("--cloud", default="", help="components that ran in the cloud (traces)")
    calibrate_p.add_argument("--rate-mbit", type=float, default=100.0, help="emulated link rate (stores)")
    calibrate_p.add_argument("--sizes", default="", help="payload bytes to probe, comma-separated (stores)")
    calibrate_p.add_argument("--reps", type=int, default=3, help="timed repetitions per operation and size (stores)")
    calibrate_p.add_argument("--idle-s", type=float, default=1.5,
                             help="idle time before each timed operation: long enough (several retransmission "
                                  "timeouts) for TCP to restart from its initial window (stores)")
    calibrate_p.add_argument("--out", help="write the result as a config file here")
    calibrate_p.add_argument("--json", action="store_true")
    calibrate_p.set_defaults(func=cmd_calibrate)
    synth_p = sub.add_parser("synth", help="write synthetic telemetry in the real formats")
    synth_p.add_argument("--out", required=True)
    synth_p.add_argument("--seed", type=int, default=0)
    synth_p.add_argument("--traces-per-api", type=int, default=50)
    synth_p.add_argument("--minutes", type=float, default=60.0)
    synth_p.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stderr = bool(getattr(args, "json", False))
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=160)
    with warnings.catch_warnings():
        warnings.simplefilter("always", AtlasDataWarning)
        warnings.showwarning = lambda message, category, *rest: console.print(f"[yellow]warning:[/yellow] {message}")
        try:
            return int(args.func(args, console))
        except AtlasInputError as exc:
            console.print(f"[red]error:[/red] {exc}")
            return 2


if __name__ == "__main__":
    sys.exit(main())
