"""Shared fixtures: tiny random-weight models saved with ``save_pretrained`` and loaded back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from symbiosis import BaseExecutor
from symbiosis.executor import scheduler
from symbiosis.protocol import PRIORITY_INFERENCE, PRIORITY_TRAINING, Direction, OpKind, OpRequest
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


@pytest.fixture
def hold_batches(monkeypatch: pytest.MonkeyPatch) -> Callable:
    """``hold_batches(target)``: from now on every batch of ``target`` (an executor built in this
    test, or a transport to a server started with ``--active-window-ms`` longer than the test) waits
    out its ``max_wait_s`` (or fills ``max_rows``), because one more client, active in both lanes,
    never reaches another op. An executor's statistics leave that client out. Tests use it to keep
    requests queued."""
    monkeypatch.setattr(scheduler, "ACTIVE_WINDOW_S", 3600.0)

    def hold(target):
        op = next(info for info in target.spec().ops.values() if info.kind is OpKind.LINEAR)
        for priority in (PRIORITY_INFERENCE, PRIORITY_TRAINING):
            target.run(OpRequest(op.name, Direction.FORWARD, torch.zeros(1, op.in_features), client_id="bystander", priority=priority))
        if isinstance(target, BaseExecutor):
            target.stats.reset()
        return target

    return hold
