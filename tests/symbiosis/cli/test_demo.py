"""The README's demo runs: six mixed-PEFT clients on one executor, batch statistics at the end."""

from __future__ import annotations

import subprocess
import sys


def test_demo_command_runs_and_reports():
    result = subprocess.run(
        [sys.executable, "-m", "symbiosis.cli.main", "demo", "--steps", "4", "--requests", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for client in ("lora", "ia3", "adalora", "prefix", "chat-lora", "chat-prompt"):
        assert client in out
    assert "executor batch statistics" in out
    assert "all ops" in out
