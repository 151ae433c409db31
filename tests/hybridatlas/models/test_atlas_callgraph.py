from hybridatlas.config import AtlasConfig
from hybridatlas.models.callgraph import DatabaseMapper, build_call_graphs


def test_default_database_rules_are_the_readme_table(config: AtlasConfig):
    mapper = DatabaseMapper(config.database_rules)
    assert mapper.target("user-service", "MongoFindUser") == "user-mongodb"
    assert mapper.target("user-mention-service", "MongoFindUsers") == "user-mongodb"
    assert mapper.target("user-mention-service", "MmcGetUsers") == "user-memcached"
    assert mapper.target("media-frontend", "MongoGetMedia") == "media-mongodb"
    assert mapper.target("write-home-timeline-service", "RedisUpdate") == "home-timeline-redis"
    assert mapper.target("post-storage-service", "MmcGetPosts") == "post-storage-memcached"
    assert mapper.target("compose-post-service", "RabbitMQPublish") == "write-home-timeline-rabbitmq"
    assert mapper.target("compose-post-service", "ComposeAndUpload") is None


def test_rules_are_configurable():
    config = AtlasConfig.load(overrides={"database_rules": [
        {"caller": "*", "operation_prefix": "Mongo", "component": "shared-mongodb"}]})
    assert DatabaseMapper(config.database_rules).target("user-service", "MongoFindUser") == "shared-mongodb"


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
