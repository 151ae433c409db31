"""Partial data through the CLI: it degrades with a warning that says what is lost, or stops with an
error that says what to provide."""

import json
import shutil

from hybridatlas.cli import main


def test_missing_network_metric_warns_that_capacity_is_not_constrained(synthetic_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    (data / "resources-run" / "prometheus" / "network_receive_bytes_per_second.query_range.json.gz").unlink()
    assert main(["evaluate", "--data", str(data), "--cloud", "", "--onprem-cpu", "0.001", "--json"]) == 0
    captured = capsys.readouterr()
    assert "resources-run: no net_rx_bytes_per_s (network receive bytes/s) series" in captured.err
    assert "NO component has a resource forecast" in captured.err
    assert "on-prem capacity constraints ignore its load" in " ".join(captured.err.split())
    assert "in no resource metric series" not in captured.err and "in no metric series" not in captured.err
    assert json.loads(captured.out)["feasible"]  # what the warning is about: nothing constrains the plan


def test_data_without_api_calls_counts_calls_from_traces(synthetic_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    (data / "network-run" / "api_calls.csv").unlink()
    assert main(["evaluate", "--data", str(data), "--cloud", "catalog-service", "--json"]) == 0
    captured = capsys.readouterr()
    assert "no per-API call counts: counting calls from the traces' root spans" in " ".join(captured.err.split())
    assert json.loads(captured.out)["cost"]["egress"] > 0


def test_traces_from_another_period_than_the_bytes_say_what_to_provide(synthetic_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    (data / "network-run" / "api_calls.csv").unlink()
    for trace_file in (data / "traces").glob("*.json"):
        document = json.loads(trace_file.read_text())
        for trace in document["data"]:
            for span in trace["spans"]:
                span["startTime"] += 86_400_000_000  # a day later
        trace_file.write_text(json.dumps(document))
    assert main(["evaluate", "--data", str(data), "--cloud", ""]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "network-run (no api_calls.csv): no per-API call counts, and the traces" in out
    assert "are from another period than the byte series" in out and "provide" in out and "api_calls.csv" in out


def test_explicit_files_without_api_calls_warn(synthetic_dir, capsys):
    run = synthetic_dir / "network-run"
    assert main(["evaluate", "--traces", str(synthetic_dir / "traces"), "--edge-bytes-csv", str(run / "edge_bytes.csv"),
                 "--cloud", "", "--json"]) == 0
    assert "--api-calls: no per-API call counts" in capsys.readouterr().err
