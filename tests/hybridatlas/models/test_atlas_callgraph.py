from hybridatlas.config import AtlasConfig
from hybridatlas.ingest.traces import Span
from hybridatlas.models.callgraph import DatabaseMapper, build_call_graphs


def _span(component, operation, kind=None, peer=None, children=()):
    return Span("1", None, operation, 0, 10, component, kind, peer, list(children))


def test_default_database_rules_are_the_readme_table(config: AtlasConfig):
    mapper = DatabaseMapper(config.database_rules)
    assert mapper.target(_span("user-service", "MongoFindUser")) == "user-mongodb"
    assert mapper.target(_span("user-mention-service", "MongoFindUsers")) == "user-mongodb"
    assert mapper.target(_span("user-mention-service", "MmcGetUsers")) == "user-memcached"
    assert mapper.target(_span("media-frontend", "MongoGetMedia")) == "media-mongodb"
    assert mapper.target(_span("write-home-timeline-service", "RedisUpdate")) == "home-timeline-redis"
    assert mapper.target(_span("post-storage-service", "MmcGetPosts")) == "post-storage-memcached"
    assert mapper.target(_span("compose-post-service", "RabbitMQPublish")) == "write-home-timeline-rabbitmq"
    assert mapper.target(_span("compose-post-service", "ComposeAndUpload")) is None


def test_client_span_naming_an_untraced_peer_calls_it(config: AtlasConfig):
    mapper = DatabaseMapper(config.database_rules)
    assert mapper.target(_span("cart", "GET", "client", "cart-redis")) == "cart-redis"
    served = _span("cart", "GET /items", "client", "catalog", [_span("catalog", "GET /items", "server")])
    assert mapper.target(served) is None  # the callee's server span stands for the call
    assert mapper.target(_span("cart", "GET", "internal", "cart-redis")) is None


def test_rules_are_configurable():
    config = AtlasConfig.load(overrides={"database_rules": [
        {"caller": "*", "operation_prefix": "Mongo", "component": "shared-mongodb"}]})
    assert DatabaseMapper(config.database_rules).target(_span("user-service", "MongoFindUser")) == "shared-mongodb"


def test_call_graph_edges_are_the_istio_edges(models, telemetry):
    trace_edges = {edge for graph in models.graphs.values() for edge in graph.calls}
    istio = set(telemetry.request_bytes.names)
    assert trace_edges <= istio
    assert len(istio - trace_edges) == 0


def test_async_consumer_is_background(models):
    compose = models.graphs["/wrk2-api/post/compose"]
    assert ("write-home-timeline-service", "write-home-timeline-rabbitmq") in compose.background
    assert ("write-home-timeline-service", "home-timeline-redis") in compose.background
    assert ("compose-post-service", "write-home-timeline-rabbitmq") not in compose.background
    assert compose.calls[("compose-post-service", "compose-post-redis")] == 7.0


def test_login_mostly_hits_memcached(telemetry, config):
    login = build_call_graphs(telemetry.traces, config)["/wrk2-api/user/login"]
    assert login.calls[("user-service", "user-memcached")] >= 1.0
    assert login.calls[("user-service", "user-mongodb")] == 0.01
