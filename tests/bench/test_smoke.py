"""Smoke runs of every Symbiosis experiment (``python -m bench.<name> --smoke``): each runs and writes its outputs.

Tiny model, tiny counts; nothing here measures anything or asserts a time. vLLM is skipped (its
venv is a benchmark-time install, not a test dependency).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

EXPERIMENTS = {
    "split_overhead": ["--pack-weights", "both"],
    "finetune_capacity": [],
    "multi_adapter_decode": ["--no-vllm"],
    "coserve": [],
    "executor_efficiency": ["--pack-weights"],
    "serving": ["--no-vllm"],
    "training_stacks": ["--stacks", "eager", "autocast", "trl-sft"],
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_runs_and_writes_outputs(name: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", f"bench.{name}", "--smoke", "--out", str(tmp_path), *EXPERIMENTS[name]]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["experiment"] == name and "load_average_1_5_15" in result["machine"] and "targets" in result
    assert (tmp_path / f"{name}.md").read_text().startswith("|")
    assert list(tmp_path.glob("*.png"))
    if name == "multi_adapter_decode":  # Symbiosis runs on the serving engine: every op of a step carries all K sequences
        row = next(r for r in result["rows"] if r["system"] == "symbiosis")
        assert row["tokens"] == row["k"] * result["config"]["new_tokens"] and row["executor"]["requests_per_gemm"] == 1.0
        assert row["executor"]["rows_per_gemm"] >= row["k"]
        rooflines = [r for r in result["rows"] if r["system"].startswith("roofline")]  # the step's GEMMs alone, plain and packed; the monolithic forward
        assert len(rooflines) == 3 and all(r["tokens"] == r["k"] * result["config"]["new_tokens"] for r in rooflines)
        assert set(result["targets"]["rooflines_vs_peft_processes"]) == {r["system"] for r in rooflines}


def test_quantized_base_runs(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    command = [sys.executable, "-m", "bench.quantized_base", "--smoke", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "quantized_base.json").read_text())["results"]
    assert set(results) == {"float32", "bfloat16", "int8", "nf4"}
    assert results["nf4"]["executor_linear_bytes"] < results["int8"]["executor_linear_bytes"] < results["float32"]["executor_linear_bytes"]


def test_transport_runs_as_a_module(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.transport", "--iterations", "40", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {"transport.json", "transport.md", "transport.png"} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.skipif(not (REPO / "bench" / ".venv-vllm" / ".installed").exists(),
                    reason="vLLM's venv is not installed (python -c 'from bench import vllm_env; vllm_env.ensure()')")
def test_multi_adapter_decode_runs_vllm_where_installed(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.multi_adapter_decode", "--smoke", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "multi_adapter_decode.json").read_text())
    assert not [s for s in result["skipped"] if s["system"] == "vllm"], result["skipped"]
    vllm = [r for r in result["rows"] if r["system"] == "vllm"]
    assert [r["k"] for r in vllm] == result["config"]["k"] and all(r["tokens"] == r["k"] * result["config"]["new_tokens"] for r in vllm)
