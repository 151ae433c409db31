"""The README's "Fine-tuning and serving" blocks, run as written in one shell (real processes: a
remote executor, three fine-tuning jobs, the OpenAI server), with free ports and a temporary
directory in place of 50051, 8000 and /tmp/sym."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_script(scratch: Path) -> str:
    """The section's bash blocks as they are and its Python blocks as heredocs, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"<!-- finetune-serving:begin -->(.*?)<!-- finetune-serving:end -->", text, re.S).group(1)
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["bash", "python", "python", "bash"]
    script = "\n".join(code if lang == "bash" else f"python - <<'PY'\n{code}PY\n" for lang, code in blocks)
    return "set -euo pipefail\n" + script.replace("/tmp/sym", str(scratch)).replace("50051", str(free_port())).replace("8000", str(free_port()))


def test_readme_finetune_and_serve_example_runs_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    shell = subprocess.Popen(
        ["bash", "-c", readme_script(tmp_path / "sym")], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = shell.communicate(timeout=600)
    finally:
        if shell.poll() is None or shell.returncode != 0:
            os.killpg(shell.pid, signal.SIGKILL)  # whatever the script left running (its own process group)
    assert shell.returncode == 0, stderr[-4000:]
    lines = stdout.splitlines()
    assert any(line.startswith('{"id":"chatcmpl-') and '"model":"qa"' in line for line in lines)
    assert any('"peft_type":"LORA"' in line for line in lines) and any('"peft_type":"IA3"' in line for line in lines)
    models = lines.index("['base', 'qa', 'chat-lora', 'text-ia3']")
    streamed, sampled, plain_peft = lines[models + 1 :]
    assert plain_peft == streamed  # the server's greedy answer is the monolithic PEFT model's
    assert sampled.startswith("['")
    for adapter in ("qa", "chat-lora", "text-ia3"):
        assert (tmp_path / "sym" / adapter / "adapter_model.safetensors").is_file()
