import numpy as np
import pytest

from hybridatlas.config import AtlasConfig
from hybridatlas.models.availability import build_availability
from hybridatlas.models.cost import CostModel
from hybridatlas.models.resources import component_traffic
from hybridatlas.models.traffic import rates_from_history, rates_from_mix
from hybridatlas.pipeline import build_cost_model
from hybridatlas.errors import AtlasInputError


def _cloud(models, *names):
    row = np.zeros((1, len(models.components)), dtype=bool)
    row[0, [models.components.index(n) for n in names]] = True
    return row


def test_cpu_follows_traffic_in_both_resource_runs(models):
    fits = models.resources.fits
    for busy in ("compose-post-service", "nginx-thrift", "media-frontend", "post-storage-service"):
        assert fits[busy]["cpu_cores"].r2 > 0.6 and fits[busy]["cpu_cores"].slope > 0
        assert fits[busy]["cpu_cores"].samples == 961 + 1225


def test_forecast_scales_with_traffic(models):
    double = {api: 2 * r for api, r in models.rates.items()}
    base = models.resources.forecast(component_traffic(models.footprint, models.rates), 30)
    more = models.resources.forecast(component_traffic(models.footprint, double), 30)
    assert more["compose-post-service"]["cpu_cores"] > base["compose-post-service"]["cpu_cores"]
    assert base["compose-post-service"]["disk_gib"] == 0.0
    assert more["media-mongodb"]["disk_gib"] > base["media-mongodb"]["disk_gib"] > 5.0  # uploads grow GridFS


def test_traffic_history_and_mix(telemetry):
    rates = rates_from_history(telemetry.api_calls, 60.0, 30)
    assert set(rates) == set(telemetry.apis) and all(r > 0 for r in rates.values())
    mix = rates_from_mix({"/get-media": 3, "/upload-media": 1}, 100.0, telemetry.apis, "--mix")
    assert mix["/get-media"] == 75.0 and mix["/wrk2-api/user/login"] == 0.0
    with pytest.raises(AtlasInputError, match=r"unknown API\(s\) \['/nope'\]"):
        rates_from_mix({"/nope": 1}, 1.0, telemetry.apis, "--mix")


def test_nothing_moved_costs_nothing(models):
    assert models.cost.breakdown(np.zeros((1, len(models.components)), dtype=bool)).sum() == 0.0


def test_cost_breakdown_by_hand(models):
    config = AtlasConfig.load(overrides={"cost": {"headroom": 0.0, "cluster_fee_per_hour": 0.0, "instances": [
        {"name": "small", "vcpu": 1, "memory_gib": 100, "per_hour": 1.0}]}})
    cost = build_cost_model(models.components, models.stateful, models.forecast, models.footprint, models.rates, config)
    parts = cost.breakdown(_cloud(models, "media-mongodb"))[0]
    cpu = models.forecast["media-mongodb"]["cpu_cores"]
    assert parts[0] == pytest.approx(np.ceil(cpu) * 730.0)
    assert parts[1] == pytest.approx(models.forecast["media-mongodb"]["disk_gib"] * 0.08)
    # egress: responses of media-frontend -> media-mongodb calls leave the cloud
    edge = models.footprint.edges.index(("media-frontend", "media-mongodb"))
    assert parts[2] == pytest.approx(cost.edge_response_bytes_per_s[edge] * 730 * 3600 / 1e9 * 0.09)
    assert parts[3] == 0.0


def test_cheapest_fitting_instance_is_chosen(models):
    config = AtlasConfig.load(overrides={"cost": {"headroom": 0.0, "instances": [
        {"name": "big", "vcpu": 64, "memory_gib": 256, "per_hour": 3.0},
        {"name": "tiny", "vcpu": 1, "memory_gib": 1, "per_hour": 0.01}]}})
    cost = build_cost_model(models.components, models.stateful, models.forecast, models.footprint, models.rates, config)
    everything = np.ones((1, len(models.components)), dtype=bool)
    need = max(models.demand("cpu_cores").sum(), models.demand("memory_gib").sum())
    assert cost.breakdown(everything)[0, 0] == pytest.approx(min(np.ceil(need - 1e-9) * 0.01, 3.0) * 730)


def test_disruption_of_stateful_moves(models):
    disrupted = models.availability.disrupted(_cloud(models, "media-mongodb"))[0]
    assert [api for api, d in zip(models.apis, disrupted) if d] == ["/get-media", "/upload-media"]
    assert not models.availability.disrupted(_cloud(models, "media-frontend", "user-service")).any()
    # home-timeline-redis is written by compose's background fan-out: compose is disrupted too
    hit = models.availability.disrupted(_cloud(models, "home-timeline-redis"))[0]
    assert {api for api, d in zip(models.apis, hit) if d} == {"/wrk2-api/home-timeline/read", "/wrk2-api/post/compose"}


def test_critical_apis_weigh_first(models):
    model = build_availability(models.graphs, models.components, models.stateful, {"/wrk2-api/user/login"}, 10.0)
    login_db = model.score(_cloud(models, "user-mongodb"))[0]          # login (critical) + register + compose
    media_db = model.score(_cloud(models, "media-mongodb"))[0]          # two ordinary APIs
    assert login_db == 12.0 and media_db == 2.0


def test_burstable_instances_are_sized_on_their_baseline():
    config = AtlasConfig.load(overrides={"cost": {"headroom": 0.0}})
    t3 = {inst["name"]: inst for inst in config.instances}
    assert config.sustained_vcpu(t3["t3.medium"]) == pytest.approx(0.4)
    assert config.sustained_vcpu(t3["t3.large"]) == pytest.approx(0.6)
    assert config.sustained_vcpu(t3["c6i.large"]) == 2.0
    # 1.5 sustained cores, 1 GiB: counted at 2 full vCPUs a t3.medium ($0.0416/h) would look cheapest
    empty = np.zeros(0)
    cost = CostModel(cpu=np.array([1.5]), memory_gib=np.array([1.0]), volume_gib=np.zeros(1),
                     edge_source=empty.astype(np.int64), edge_destination=empty.astype(np.int64),
                     edge_request_bytes_per_s=empty, edge_response_bytes_per_s=empty, config=config)
    assert cost.breakdown(np.ones((1, 1), dtype=bool))[0, 0] == pytest.approx(0.085 * 730)  # one c6i.large


def test_bad_baseline_share_is_named():
    with pytest.raises(AtlasInputError, match="tiny: baseline_cpu_share must be in"):
        AtlasConfig.load(overrides={"cost": {"instances": [
            {"name": "tiny", "vcpu": 2, "memory_gib": 1, "per_hour": 0.01, "baseline_cpu_share": 0}]}})
