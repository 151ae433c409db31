"""The project's own ground truth, small: the traced application runs all on-prem and under hybrid
placements over an emulated WAN (network namespaces, RTT 20 ms), and Atlas, learning from the
all-on-prem run only, predicts the mean latency of every API that crosses the WAN within 25%. Needs
root, iproute2, redis-server and memcached (.ci/run installs them); skipped with the reason otherwise."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hybridatlas.cli import main
from hybridatlas.emulation.netns import EmulatedWan, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "atlas_testbed" / "run.py"


def _skip_reason() -> str | None:
    reason = unavailable_reason()
    if reason:
        return reason
    missing = [tool for tool in ("redis-server", "memcached") if shutil.which(tool) is None]
    if missing:
        return f"{missing} not installed (Debian packages redis-server, memcached)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=f"testbed unavailable: {_skip_reason()}")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    done = subprocess.run([sys.executable, str(RUN), "--out", str(out), "--size", "small"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _crossing(rows: dict) -> set[str]:
    return {api for api, row in rows.items() if row["predicted_mean_ms"] > row["onprem_mean_ms"] + 1e-6}


def test_the_testbed_measures_hybrid_placements_atlas_predicts(testbed):
    """Both placements ran and were scored per API; every API Atlas predicts to cross the WAN was
    measured at least 15 ms (3/4 of the 20 ms round trip) slower than on-prem, and the others are
    predicted at their on-prem latency."""
    results = json.loads((testbed / "results.json").read_text())["placements"]
    assert set(results) == {"stores-in-cloud", "entry-in-cloud"}
    for name, result in results.items():
        rows = result["apis"]
        assert len(rows) == 5 and all(row["measured_traces"] == 10 for row in rows.values()), name
        assert len(_crossing(rows)) >= 3, (name, rows)
        for api, row in rows.items():
            if api in _crossing(rows):
                assert row["measured_mean_ms"] >= row["onprem_mean_ms"] + 15, (name, api, row)
                assert row["predicted_mean_ms"] >= row["onprem_mean_ms"] + 15, (name, api, row)
            else:
                assert row["predicted_mean_ms"] == pytest.approx(row["onprem_mean_ms"]), (name, api, row)


def test_atlas_predicts_every_crossing_api_within_25_percent(testbed):
    """Each API that crosses the WAN (25-135 ms here) is predicted within 25% of its measured mean (the
    benchmark's 30-request runs: within 12%; the issue's bound: 30%). APIs that cross nothing take
    3-6 ms, where one scheduling stall in 10 requests moves the mean by 20%: no bound on them survives
    a busy machine, so none is asserted. The bound holds with the application and the delay line under
    real-time scheduling, which keeps other jobs from stalling packets and requests; where that is not
    permitted (no CAP_SYS_NICE) the test is skipped."""
    document = json.loads((testbed / "results.json").read_text())
    if not document["meta"]["realtime"]:
        pytest.skip("real-time scheduling not permitted: measured latencies carry the machine's scheduling stalls")
    for name, result in document["placements"].items():
        for api in _crossing(result["apis"]):
            row = result["apis"][api]
            assert abs(row["error"]) <= 0.25, (name, api, row)


def test_no_namespace_is_left_behind(testbed):
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in listed.splitlines() if line.startswith("ha") and "x" in line.split()[0]]


def test_validate_and_learn_round_trips_from_the_measured_traces(testbed, capsys):
    config = str(testbed / "atlas-config.json")
    run = testbed / "stores-in-cloud"
    cloud = ",".join(json.loads((run / "topology.json").read_text())["cloud"])
    assert main(["validate", "--data", str(testbed / "onprem"), "--config", config,
                 "--measured", str(run / "traces"), "--cloud", cloud, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["apis"]["GET /media/get"]["measured_traces"] == 10 and report["pin_violations"] == []
    assert set(report["apis"]) == {"GET /media/get", "GET /timeline/read", "GET /user/profile", "POST /media/upload",
                                   "POST /post/compose"}
    assert main(["calibrate", "traces", "--data", str(testbed / "onprem"), "--config", config,
                 "--measured", str(run / "traces"), "--cloud", cloud, "--json"]) == 0
    learned = {(r["operation"], r["kind"]): r["base"] for r in json.loads(capsys.readouterr().out)["round_trips"]}
    for operation in ("ZREVRANGE", "EVALSHA", "MULTI", "HGETALL", "GET", "PIPELINE"):
        assert learned[(operation, "redis")] >= 0.8, learned  # each crossing command cost a round trip


def test_wan_emulation_cleans_up_after_an_error():
    with pytest.raises(RuntimeError):
        with EmulatedWan(10.0, 50.0) as wan:
            names = list(wan.netns.values())
            raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)


def test_store_calibration_measures_round_trips():
    from hybridatlas.calibrate.stores import measure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = measure(rtt_ms=20.0, rate_mbit=100.0, sizes=[100, 60_000], reps=3, idle_s=0.3)
    operations = result["_calibration"]["operations"]
    assert {"redis GET", "redis pipeline (10 GETs)", "redis MULTI/EXEC (10 SETs)", "redis EVALSHA (Lua)",
            "memcached get", "memcached get_many (10 keys)", "memcached set", "http GET (keep-alive)"} <= set(operations)
    for name, rows in operations.items():
        assert 0.85 <= rows["100"]["warm_round_trips"] <= 1.6, (name, rows)  # one round trip (not two) for 100 B
        assert rows["60000"]["idle_round_trips"] >= rows["60000"]["warm_round_trips"] - 0.2, (name, rows)
    kinds = {rule["kind"] for rule in result["round_trips"]}
    assert kinds == {"redis", "memcached", "*"}
