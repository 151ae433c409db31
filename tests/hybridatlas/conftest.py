"""Shared fixtures: the real DeathStarBench telemetry (never copied into the repo) and synthetic data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from hybridatlas.config import AtlasConfig
from hybridatlas.ingest.dataset import Telemetry, load_directory
from hybridatlas.pipeline import AtlasModels, build_models
from hybridatlas.synthetic import generate

REPO = Path(__file__).resolve().parents[2]


def atlas_data_dir() -> Path:
    """ATLAS_DATA_DIR, else the first of <repo>/../shared/data/atlas and /work/shared/data/atlas that exists."""
    override = os.environ.get("ATLAS_DATA_DIR")
    if override:
        return Path(override)
    candidates = [REPO / ".." / "shared" / "data" / "atlas", Path("/work/shared/data/atlas")]
    return next((path for path in candidates if (path / "traces").is_dir()), candidates[0])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = atlas_data_dir()
    if not (path / "traces").is_dir():
        pytest.fail(f"shared Atlas data not found at {path}; set ATLAS_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def telemetry(data_dir: Path) -> Telemetry:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_directory(data_dir)


@pytest.fixture(scope="session")
def config() -> AtlasConfig:
    return AtlasConfig.load()


@pytest.fixture(scope="session")
def models(telemetry: Telemetry, config: AtlasConfig) -> AtlasModels:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_models(telemetry, config)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic"), seed=1, traces_per_api=30, minutes=40)
