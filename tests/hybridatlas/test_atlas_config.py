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
    assert config.round_trip_rule("ComposePost").round_trips(100) == 1


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
