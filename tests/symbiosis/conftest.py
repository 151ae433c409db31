"""Shared fixtures: tiny random-weight models saved with ``save_pretrained`` and loaded back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from symbiosis.tiny import save_random_model, tiny_config


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``model_dir("llama", num_hidden_layers=3)`` -> a saved tiny model directory (cached per session)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str, **overrides) -> Path:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(model_type.replace("-", "_"))
            cache[key] = save_random_model(tiny_config(model_type, **overrides), path)
        return cache[key]

    return make
