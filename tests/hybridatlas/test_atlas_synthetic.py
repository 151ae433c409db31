import warnings

import numpy as np

from hybridatlas.ingest.csvfiles import load_edge_bytes_csv, load_resources_csv
from hybridatlas.ingest.dataset import load_directory, load_resource_run
from hybridatlas.synthetic import API_TREES, generate


def test_generated_layout_loads_in_every_format(synthetic_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean data set raises no data warning
        telemetry = load_directory(synthetic_dir)
    assert set(telemetry.apis) == set(API_TREES)
    request_csv, _ = load_edge_bytes_csv(synthetic_dir / "network-run" / "edge_bytes.csv")
    assert request_csv.names == telemetry.request_bytes.names
    np.testing.assert_allclose(request_csv.values, telemetry.request_bytes.values, atol=0.01)
    from_json = load_resource_run(synthetic_dir / "resources-run")
    from_csv = load_resources_csv(synthetic_dir / "resources-run" / "resources.csv")
    np.testing.assert_allclose(from_json.metrics["cpu_cores"].values, from_csv["cpu_cores"].values, atol=1e-5)


def test_generation_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", seed=7, traces_per_api=5, minutes=5)
    b = generate(tmp_path / "b", seed=7, traces_per_api=5, minutes=5)
    assert (a / "network-run" / "api_calls.csv").read_text() == (b / "network-run" / "api_calls.csv").read_text()
