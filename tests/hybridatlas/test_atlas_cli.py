"""End to end through the CLI, on the shared data and on the synthetic generator's output."""

import json

import pytest

from hybridatlas.cli import main


def test_advise_on_synthetic_writes_all_outputs(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["advise", "--data", str(synthetic_dir), "--scale", "3", "--onprem-cpu", "0.2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Pareto set" in text and "busiest-first" in text
    advice = json.loads((out / "advice.json").read_text())
    assert advice["plans"] and all(p["feasible"] for p in advice["plans"])
    assert {"cheapest", "least disruptive", "best performance"} <= {l for p in advice["plans"] for l in p["labels"]}
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "<svg" in html and 'stroke="#d00"' in html and "data:image/png;base64," in html


def test_advise_json_on_shared_data(data_dir, capsys):
    assert main(["advise", "--data", str(data_dir), "--scale", "5", "--onprem-cpu", "1.3", "--json",
                 "--no-baselines"]) == 0
    advice = json.loads(capsys.readouterr().out)
    cheapest = next(p for p in advice["plans"] if "cheapest" in p["labels"])
    assert cheapest["feasible"] and cheapest["cloud"]
    assert len(cheapest["latency"]) == 9
    assert all(row["mean_ms"] >= row["before_mean_ms"] - 1e-9 for row in cheapest["latency"].values())
    assert advice["search"]["plans_per_second"] > 0


def test_evaluate_what_if(data_dir, capsys):
    assert main(["evaluate", "--data", str(data_dir), "--cloud", "media-mongodb,post-storage-service", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cloud"] == ["media-mongodb", "post-storage-service"]
    assert plan["disrupted_apis"] == ["/get-media", "/upload-media"]
    home = plan["latency"]["/wrk2-api/home-timeline/read"]
    assert home["mean_ms"] > home["before_mean_ms"] + 22.7 and home["p95_ms"] >= home["mean_ms"] - 1e-9
    assert set(plan["cost"]) == {"compute", "storage", "egress", "cluster", "total"}
    assert ["home-timeline-service", "post-storage-service"] in plan["cut_edges"]


def test_evaluate_reports_constraint_violations(data_dir, capsys):
    assert main(["evaluate", "--data", str(data_dir), "--cloud", "", "--onprem-cpu", "0.1", "--budget", "10",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not plan["feasible"] and "onprem_cpu_cores" in plan["violations"]


def test_inspect_json(synthetic_dir, capsys):
    assert main(["inspect", "--data", str(synthetic_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["footprint_fit"] and info["components"]["web-frontend"]["pinned"] == "on-prem"
    assert info["call_graphs"] and info["resource_fit"]


def test_inspect_tables_say_what_only_json_holds(synthetic_dir, capsys):
    assert main(["inspect", "--data", str(synthetic_dir)]) == 0
    out = capsys.readouterr().out
    assert "Network footprint fit per edge" in out and "Forecast utilisation" in out
    assert "call graphs, resource fits, forecast rates and measured latency: --json" in out


def test_bad_input_exits_2_with_the_file_named(tmp_path, capsys):
    bad = tmp_path / "traces.json"
    bad.write_text("{oops")
    assert main(["evaluate", "--traces", str(bad), "--cloud", ""]) == 2
    assert "traces.json: not valid JSON" in capsys.readouterr().out
    assert main(["evaluate", "--data", str(tmp_path / "missing"), "--cloud", ""]) == 2
    assert "data directory not found" in capsys.readouterr().out


def test_partial_data_degrades_with_warnings(synthetic_dir, tmp_path, capsys):
    import shutil
    partial = tmp_path / "partial"
    shutil.copytree(synthetic_dir / "traces", partial / "traces")
    assert main(["evaluate", "--data", str(partial), "--cloud", "catalog-service", "--json"]) == 0
    captured = capsys.readouterr()
    assert "no per-edge byte series found" in captured.err and "no resource run found" in captured.err
    plan = json.loads(captured.out)
    assert plan["latency"]["/api/catalog/browse"]["mean_ms"] > plan["latency"]["/api/catalog/browse"]["before_mean_ms"]


def test_evaluate_names_components_moved_by_pins(synthetic_dir, capsys):
    assert main(["evaluate", "--data", str(synthetic_dir), "--cloud", "", "--pin-cloud", "cart-service"]) == 0
    out = capsys.readouterr().out
    assert "moving cart-service:" in out and "moving nothing" not in out


def test_what_if_answers_plans_that_break_pins_and_lists_them(synthetic_dir, capsys):
    assert main(["evaluate", "--data", str(synthetic_dir), "--cloud", "web-frontend", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cloud"] == ["web-frontend"] and not plan["feasible"]
    assert plan["pin_violations"] == ["web-frontend is pinned on-prem by placement.pinned_onprem_kinds (kind 'frontend')"]
    browse = plan["latency"]["/api/catalog/browse"]
    assert browse["mean_ms"] > browse["before_mean_ms"] + 2 * 22.7  # ingress and frontend -> service both cross
    assert main(["evaluate", "--data", str(synthetic_dir), "--cloud", "cart-redis", "--pin-onprem", "cart-redis"]) == 0
    assert "pin violated: cart-redis is pinned on-prem by placement.pinned_onprem" in capsys.readouterr().out
    assert main(["evaluate", "--data", str(synthetic_dir), "--cloud", "istio-ingressgateway"]) == 2
    assert "the ingress option" in capsys.readouterr().out


def test_search_still_honours_pins(synthetic_dir, capsys):
    assert main(["advise", "--data", str(synthetic_dir), "--scale", "3", "--onprem-cpu", "0.2", "--json",
                 "--no-baselines", "--pin-onprem", "catalog-service"]) == 0
    advice = json.loads(capsys.readouterr().out)
    assert "catalog-service" not in advice["search"]["free_components"]
    assert all("catalog-service" not in p["cloud"] and "web-frontend" not in p["cloud"] and not p["pin_violations"]
               for p in advice["plans"])


def test_ingress_moves_the_gateway_for_latency_and_egress(synthetic_dir, capsys):
    results = {}
    for ingress in ("onprem", "cloud", "0.5"):
        assert main(["evaluate", "--data", str(synthetic_dir), "--cloud", "", "--ingress", ingress, "--json"]) == 0
        results[ingress] = json.loads(capsys.readouterr().out)
    before = results["onprem"]["latency"]["/api/cart/add"]
    assert before["mean_ms"] == before["before_mean_ms"] and results["onprem"]["cost"]["egress"] == 0
    cloud = results["cloud"]["latency"]["/api/cart/add"]["mean_ms"]
    assert 22.7 < cloud - before["mean_ms"] < 1.2 * 22.7  # users cross the WAN to the on-prem frontend
    half = results["0.5"]
    assert half["latency"]["/api/cart/add"]["mean_ms"] == pytest.approx((before["mean_ms"] + cloud) / 2, rel=1e-6)
    assert results["cloud"]["cost"]["egress"] > 0
    assert half["cost"]["egress"] == pytest.approx(results["cloud"]["cost"]["egress"] / 2, rel=1e-6)
    assert main(["evaluate", "--data", str(synthetic_dir), "--cloud", "", "--ingress", "edge"]) == 2
    assert "expected onprem, cloud or a number" in capsys.readouterr().out


def test_advise_without_capacity_limits_says_why_nothing_moves(synthetic_dir, capsys):
    assert main(["advise", "--data", str(synthetic_dir), "--no-baselines"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the only Pareto plan moves nothing: no on-prem capacity limit is set" in out
    assert "--onprem-cpu" in out and "--scale" in out
    assert main(["advise", "--data", str(synthetic_dir), "--no-baselines", "--onprem-cpu", "0.2", "--scale", "3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["search"]["note"] is None
