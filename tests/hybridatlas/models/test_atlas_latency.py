import numpy as np
import pytest

from hybridatlas.config import AtlasConfig
from hybridatlas.ingest.jaeger import parse_traces
from hybridatlas.models.latency import build_latency_model, split_stages

README_MEAN_P95 = {  # the data README's sanity table (ms)
    "/wrk2-api/post/compose": (18.80, 22.46), "/wrk2-api/home-timeline/read": (7.43, 14.19),
    "/wrk2-api/user-timeline/read": (4.81, 7.74), "/wrk2-api/user/register": (10.59, 12.04),
    "/wrk2-api/user/login": (2.52, 3.01), "/wrk2-api/user/follow": (3.14, 3.78),
    "/wrk2-api/user/unfollow": (3.19, 3.66), "/get-media": (4.96, 5.94), "/upload-media": (2.45, 3.37)}


def test_nothing_moved_reproduces_measured_latency_exactly(models, telemetry):
    nothing = np.zeros((1, len(models.components)), dtype=bool)
    mean, p95 = models.latency.mean_ms(nothing)[0], models.latency.p95_ms(nothing)[0]
    for a, api in enumerate(models.apis):
        measured = np.array([t.duration_ms for t in telemetry.traces if t.api == api])
        assert mean[a] == pytest.approx(measured.mean(), rel=1e-12, abs=1e-9)
        assert p95[a] == pytest.approx(np.percentile(measured, 95), rel=1e-12, abs=1e-9)
        assert mean[a] == pytest.approx(README_MEAN_P95[api][0], abs=0.006)
        assert p95[a] == pytest.approx(README_MEAN_P95[api][1], abs=0.006)


def _cloud(models, *names):
    row = np.zeros((1, len(models.components)), dtype=bool)
    row[0, [models.components.index(n) for n in names]] = True
    return row


def test_gridfs_read_costs_two_round_trips(models, config):
    a = models.apis.index("/get-media")
    added = models.latency.mean_ms(_cloud(models, "media-mongodb"))[0, a] - models.latency.baseline_mean_ms[a]
    transfer_ms = 44_000 / config.bandwidth_bytes_per_s * 1e3
    assert added == pytest.approx(2 * config.rtt_ms + transfer_ms, abs=0.05)


ONE_ROUND_TRIP = {"round_trips": [{"operation": "*", "base": 1}]}


def test_moving_the_frontend_costs_the_ingress_round_trip(telemetry, models):
    config = AtlasConfig.load(overrides=ONE_ROUND_TRIP)
    latency = build_latency_model(telemetry.traces, models.components, config, None, models.graphs)
    a = latency.apis.index("/wrk2-api/user/login")
    added = latency.mean_ms(_cloud(models, "nginx-thrift"))[0, a] - latency.baseline_mean_ms[a]
    # gateway -> nginx and nginx -> user-service both cross: two round trips
    assert added == pytest.approx(2 * config.rtt_ms, abs=0.1)
    both = latency.mean_ms(_cloud(models, "nginx-thrift", "user-service", "user-memcached", "user-mongodb"))
    assert both[0, a] - latency.baseline_mean_ms[a] == pytest.approx(config.rtt_ms, abs=0.1)
    # from the entry span on (as traces measure it), the gateway -> nginx hop is not counted
    entry = latency.mean_ms(_cloud(models, "nginx-thrift"), include_ingress=False)
    assert entry[0, a] - latency.baseline_mean_ms[a] == pytest.approx(config.rtt_ms, abs=0.1)


def test_default_round_trips_are_measured_curves(config):
    for kind in ("redis", "memcached", "service"):
        rule = config.round_trip_rule("AnyOperation", kind)
        assert rule.points and rule.warm_points, kind
        assert 1.0 <= rule.round_trips(100) < 1.2 and 1.0 <= rule.round_trips(100, warm=True) < 1.2
        assert rule.round_trips(200_000) > rule.round_trips(200_000, warm=True) >= 1.0  # slow start after idle
    assert config.round_trip_rule("MongoGetMedia", "mongodb").per_chunk_bytes == 261120


def test_background_rabbitmq_consumer_does_not_count(models):
    a = models.apis.index("/wrk2-api/post/compose")
    moved = models.latency.mean_ms(_cloud(models, "write-home-timeline-service", "home-timeline-redis"))
    assert moved[0, a] == pytest.approx(models.latency.baseline_mean_ms[a])


def test_latency_grows_with_rtt(telemetry, models):
    fast = AtlasConfig.load(overrides={"wan": {"rtt_ms": 5.0}})
    slow = AtlasConfig.load(overrides={"wan": {"rtt_ms": 50.0}})
    plan = _cloud(models, "user-service", "compose-post-service")
    lat = [build_latency_model(telemetry.traces, models.components, c, models.footprint, models.graphs).mean_ms(plan)
           for c in (fast, slow)]
    assert (lat[1] >= lat[0]).all() and (lat[1] > lat[0]).any()


def _synthetic(children):
    """Root (a, 100 ms) with children in component b given as (start ms, duration ms, operation)."""
    spans = [{"spanID": "r", "operationName": "/api", "startTime": 0, "duration": 100_000, "processID": "pa",
              "references": []}]
    for i, (start, duration, op) in enumerate(children):
        spans.append({"spanID": f"c{i}", "operationName": op, "startTime": start * 1000, "duration": duration * 1000,
                      "processID": "pb", "references": [{"refType": "CHILD_OF", "spanID": "r"}]})
    processes = {p: {"serviceName": p, "tags": [{"key": "container.name", "value": c}]}
                 for p, c in (("pa", "a-frontend"), ("pb", "b-service"))}
    return parse_traces("synthetic", {"data": [{"traceID": "t", "spans": spans, "processes": processes}]})


@pytest.mark.parametrize("children,expected_round_trips", [
    ([(10, 20, "X"), (15, 20, "Y")], 1),          # overlapping: one stage, parallel
    ([(10, 20, "X"), (40, 20, "Y")], 2),          # sequential: two stages
    ([(10, 20, "X"), (40, 20, "RabbitMQReceived")], 1),  # async consumer is background
    ([(10, 20, "X"), (90, 50, "Y")], 1),          # outlives its parent: background
])
def test_stage_semantics(children, expected_round_trips):
    config = AtlasConfig.load(overrides={"wan": {"rtt_ms": 10.0}, **ONE_ROUND_TRIP})
    traces = _synthetic(children)
    components = ["a-frontend", "b-service", config.gateway]
    from hybridatlas.models.callgraph import build_call_graphs
    model = build_latency_model(traces, components, config, None, build_call_graphs(traces, config))
    added = model.mean_ms(np.array([[False, True, False]]))[0, 0] - model.baseline_mean_ms[0]
    assert added == pytest.approx(10.0 * expected_round_trips, abs=1e-4)


def test_parallel_slack_absorbs_a_short_child():
    """X (a-frontend, same side) runs 10-40 ms; Y (moved) runs 12-32 ms in the same stage, 8 ms of
    slack: Y's 10 ms round trip only adds 2 ms."""
    config = AtlasConfig.load(overrides={"wan": {"rtt_ms": 10.0}, **ONE_ROUND_TRIP})
    traces = _synthetic([(10, 30, "X"), (12, 20, "Y")])
    traces[0].root.children[0].component = "a-frontend"
    assert [len(s) for s in split_stages(traces[0].root.children)] == [2]
    from hybridatlas.models.callgraph import build_call_graphs
    model = build_latency_model(traces, ["a-frontend", "b-service", config.gateway], config, None,
                                build_call_graphs(traces, config))
    added = model.mean_ms(np.array([[False, True, False]]))[0, 0] - model.baseline_mean_ms[0]
    assert added == pytest.approx(2.0, abs=1e-4)


def test_a_calls_recorded_size_sets_its_round_trips_and_transfer():
    """A call from a-frontend to b-service whose span records 200 KB on the wire pays the slow-start round
    trips of 200 KB on an idle connection and the transfer; without recorded sizes (and no byte series)
    the same call costs one round trip."""
    config = AtlasConfig.load(overrides={"wan": {"rtt_ms": 10.0, "bandwidth_gbps": 0.1}})
    from hybridatlas.models.callgraph import build_call_graphs

    def added(request_bytes):
        traces = _synthetic([(10, 20, "Y")])
        traces[0].root.children[0].request_bytes = request_bytes
        model = build_latency_model(traces, ["a-frontend", "b-service", config.gateway], config, None,
                                    build_call_graphs(traces, config))
        return model.mean_ms(np.array([[False, True, False]]))[0, 0] - model.baseline_mean_ms[0]

    rule = config.round_trip_rule("Y", "service")
    assert rule.round_trips(200_000) > 2.0
    assert added(None) == pytest.approx(10.0 * rule.round_trips(0.0), rel=1e-5)
    assert added(200_000) == pytest.approx(10.0 * rule.round_trips(200_000) + 200_000 / config.bandwidth_bytes_per_s * 1e3,
                                           rel=1e-5)


def test_a_call_larger_than_the_open_window_is_not_warm():
    """A 34-byte call, then two 64 KB calls on the same edge in quick succession (a GridFS read): the first
    64 KB call exceeds the initial window plus what the edge carried before, so it is not warm (slow
    start); the second is."""
    from hybridatlas.models.callgraph import DatabaseMapper, warm_calls

    config = AtlasConfig.load()
    (trace,) = _synthetic([(10, 5, "HGETALL"), (16, 5, "GET"), (22, 5, "GET")])
    for child, size in zip(trace.root.children, (34, 65_546, 65_546)):
        child.response_bytes = size
    warm = {span_id for span_id, _ in warm_calls(trace, config, DatabaseMapper(config.database_rules))}
    assert warm == {"c2"}
    for child in trace.root.children:
        child.response_bytes = None
    assert {span_id for span_id, _ in warm_calls(trace, config, DatabaseMapper(config.database_rules))} == {"c1", "c2"}
