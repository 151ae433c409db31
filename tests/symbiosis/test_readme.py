"""The README's Symbiosis quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text()
    match = re.search(r"<!-- readme-test: quickstart -->\n```python\n(.*?)```", text, re.S)
    assert match, "the quick start block is missing from README.md"
    code = match.group(1).replace("/tmp/symbiosis-tiny-llama", str(tmp_path / "tiny"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
