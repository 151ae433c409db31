"""Fixtures: executor servers in this process, one per saved tiny model, stopped at session end."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from symbiosis import BaseExecutor
from symbiosis.server import ExecutorServer


@pytest.fixture(scope="session")
def served(model_dir) -> Iterator[Callable[..., ExecutorServer]]:
    """``served("llama")`` -> a running in-process ExecutorServer of that tiny model (cached)."""
    servers: dict[tuple, ExecutorServer] = {}

    def serve(model_type: str, **overrides) -> ExecutorServer:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in servers:
            servers[key] = ExecutorServer(BaseExecutor.from_pretrained(model_dir(model_type, **overrides))).start()
        return servers[key]

    yield serve
    for server in servers.values():
        server.stop(1.0)
