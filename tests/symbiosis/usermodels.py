"""Fixtures for the user-facing tools: a tiny model saved with a real tokenizer, and the example data."""

from __future__ import annotations

from pathlib import Path

import pytest

from symbiosis.tiny import save_tiny_model_with_tokenizer

#: The example datasets shipped for the README (examples/symbiosis/make_datasets.py writes them).
EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "examples" / "symbiosis" / "data"


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a trained byte-level BPE tokenizer and a chat template."""
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("chat_llama"))
