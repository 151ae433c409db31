"""A short run of the load test (bench/load_test.py): 8 client processes, mixed PEFT methods, both roles."""

from __future__ import annotations

import json
import subprocess
import sys

from .servers import REPO


def test_load_test_smoke(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "load_test.py"), "--clients", "8", "--duration", "4", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "load_test.json").read_text())
    assert summary["clients"] == 8 and summary["errors"] == [] and summary["count_mismatches"] == {}
    assert summary["requests_client_side"] == summary["requests_server_side"] > 0
    assert all(client["iterations"] > 0 for client in summary["per_client"])
    assert {client["role"] for client in summary["per_client"]} == {"fine-tune", "generate"}
    assert len({client["method"] for client in summary["per_client"]}) == 8
    assert summary["latency_us"] and (tmp_path / "load_test.md").exists()
