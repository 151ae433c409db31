import pytest

from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasInputError


def test_defaults_carry_provenance_and_artifact_wan():
    config = AtlasConfig.load()
    assert config.rtt_ms == 22.7 and config.bandwidth_bytes_per_s == 10e9 / 8
    assert "us-east-1" in config.cost["_provenance"]
    assert config.round_trip_rule("MongoGetMedia").round_trips(44_000) == 2
    assert config.round_trip_rule("MongoInsertMedia").round_trips(44_000) == 3
    assert config.round_trip_rule("MongoGetMedia").round_trips(600_000) == 4  # 3 GridFS chunks
    assert config.round_trip_rule("ComposePost").round_trips(100) == pytest.approx(1.0, abs=0.15)  # measured RPC


def test_round_trip_curves_interpolate_and_validate():
    config = AtlasConfig.load(overrides={"round_trips": [
        {"operation": "GET", "kind": "redis", "points": [[1000, 1.0], [100000, 3.0]], "warm_points": [[1000, 1.0]]},
        {"operation": "*", "base": 1}]})
    rule = config.round_trip_rule("GET", "redis")
    assert rule.round_trips(10) == 1.0 and rule.round_trips(10_000) == pytest.approx(2.0)  # log-linear
    assert rule.round_trips(199_000) == pytest.approx(3.0 + 2.0 / 99_000 * 99_000)  # last slope beyond
    assert rule.round_trips(100_000, warm=True) == 1.0
    assert config.round_trip_rule("GET", "memcached").base == 1
    with pytest.raises(AtlasInputError, match="points must be"):
        AtlasConfig.load(overrides={"round_trips": [{"operation": "*", "points": [[1000, 1], [10, 2]]}]})
    with pytest.raises(AtlasInputError, match="ingress must be 'onprem', 'cloud' or the cloud share"):
        AtlasConfig.load(overrides={"ingress": 1.5})


def test_toml_file_merges_over_defaults(tmp_path):
    path = tmp_path / "atlas.toml"
    path.write_text('[wan]\nrtt_ms = 40\n\n[[round_trips]]\noperation = "Mmc*"\nbase = 3\n')
    config = AtlasConfig.load(path)
    assert config.rtt_ms == 40 and config.bandwidth_bytes_per_s == 10e9 / 8
    assert config.round_trip_rule("MmcGetUsers").round_trips(0) == 3


def test_bad_configuration_is_named(tmp_path):
    broken = tmp_path / "atlas.toml"
    broken.write_text("[wan\n")
    with pytest.raises(AtlasInputError, match=r"atlas\.toml: not valid toml"):
        AtlasConfig.load(broken)
    negative = tmp_path / "neg.json"
    negative.write_text('{"wan": {"rtt_ms": -1}}')
    with pytest.raises(AtlasInputError, match=r"neg\.json: wan\.rtt_ms must be >= 0"):
        AtlasConfig.load(negative)
    with pytest.raises(AtlasInputError, match="configuration file not found"):
        AtlasConfig.load(tmp_path / "absent.toml")


def test_jaeger_limit_must_be_a_positive_whole_number():
    assert AtlasConfig.load(overrides={"live": {"jaeger_limit": 50}}).live["jaeger_limit"] == 50
    with pytest.raises(AtlasInputError, match="live.jaeger_limit must be a whole number >= 1, got 0"):
        AtlasConfig.load(overrides={"live": {"jaeger_limit": 0}})
