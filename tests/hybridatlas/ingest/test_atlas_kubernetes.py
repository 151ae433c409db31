"""Components from `kubectl get deploy,sts,svc,pvc -o json`: kinds, stateful flags, replicas, requests,
volume sizes and Service names, so components.json is optional."""

import json
import shutil

import pytest

from hybridatlas.cli import main
from hybridatlas.config import AtlasConfig
from hybridatlas.errors import AtlasDataWarning, AtlasInputError
from hybridatlas.ingest.kubernetes import load_kubernetes, peer_component, quantity
from hybridatlas.synthetic import COMPONENTS, STATEFUL


def _deployment(name, image, replicas=1, cpu="250m", memory="256Mi", claim=None, kind="Deployment", templates=None):
    pod = {"containers": [{"name": name, "image": image, "resources": {"requests": {"cpu": cpu, "memory": memory}}},
                          {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22",
                           "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}
    if claim:
        pod["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    spec = {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name, "version": "v1"}}, "spec": pod}}
    if templates:
        spec["volumeClaimTemplates"] = templates
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def _service(name, app):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": app}, "ports": [{"port": 80}]}}


def _pvc(name, requested, bound=None):
    item = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"resources": {"requests": {"storage": requested}}}}
    if bound:
        item["status"] = {"phase": "Bound", "capacity": {"storage": bound}}
    return item


def kubectl_list(items):
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}


def test_workloads_services_and_volumes(tmp_path):
    path = tmp_path / "k8s.json"
    path.write_text(json.dumps(kubectl_list([
        _deployment("web-frontend", "nginx:1.27", replicas=2),
        _deployment("catalog-service", "ghcr.io/shop/catalog:3.1", replicas=3, cpu="1", memory="1Gi"),
        _deployment("catalog-mongodb", "mongo:7.0", claim="catalog-data"),
        _deployment("cart-redis", "redis:7.2-alpine", kind="StatefulSet", replicas=2, templates=[
            {"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "5Gi"}}}}]),
        _deployment("catalog-memcached", "memcached:1.6"),
        _service("catalog", "catalog-service"), _service("cart-redis-svc", "cart-redis"),
        _pvc("catalog-data", "10Gi", bound="20Gi")])))
    info, aliases = load_kubernetes(path, AtlasConfig.load().kind_of)
    assert {c: info[c]["kind"] for c in info} == {"web-frontend": "frontend", "catalog-service": "service",
                                                  "catalog-mongodb": "mongodb", "cart-redis": "redis",
                                                  "catalog-memcached": "memcached"}
    assert {c for c in info if info[c]["stateful"]} == {"catalog-mongodb", "cart-redis"}
    service = info["catalog-service"]
    assert service["replicas"] == 3 and service["cpu_cores"] == pytest.approx(3 * 1.1)
    assert service["memory_gib"] == pytest.approx(3 * (1 + 0.125))
    assert info["catalog-mongodb"]["volume_gib"] == 20 and info["cart-redis"]["volume_gib"] == 10
    assert aliases == {"catalog": "catalog-service", "cart-redis-svc": "cart-redis"}
    assert peer_component("catalog.shop.svc.cluster.local:8080", aliases) == "catalog-service"
    assert peer_component("cart-redis-svc", aliases) == "cart-redis"
    assert peer_component("10.0.0.7", aliases) == "10.0.0.7"


def test_quantities_and_bad_input(tmp_path):
    assert quantity("500m", "x") == 0.5 and quantity("2", "x") == 2 and quantity("1.5Gi", "x") == 1.5 * 2**30
    assert quantity("1G", "x") == 1e9
    with pytest.raises(AtlasInputError, match="not a Kubernetes quantity: '12 cores'"):
        quantity("12 cores", "x")
    path = tmp_path / "pods.json"
    path.write_text(json.dumps({"kind": "Pod", "metadata": {"name": "x"}}))
    with pytest.raises(AtlasInputError, match=r"pods\.json: expected the output of `kubectl get"):
        load_kubernetes(path)
    path.write_text(json.dumps(kubectl_list([_service("a", "a")])))
    with pytest.raises(AtlasInputError, match="holds no Deployment, StatefulSet or DaemonSet"):
        load_kubernetes(path)
    path.write_text(json.dumps(kubectl_list([_deployment("db-mongodb", "mongo:7", claim="gone")])))
    with pytest.warns(AtlasDataWarning, match=r"mounts PersistentVolumeClaims \['gone'\]"):
        info, _ = load_kubernetes(path)
    assert info["db-mongodb"]["stateful"] and info["db-mongodb"]["volume_gib"] == 0


def test_kubernetes_objects_replace_components_json(synthetic_dir, tmp_path, capsys):
    """The synthetic shop without components.json: the cluster's objects give the same stateful
    components (hence the same disrupted APIs), and requests stand in where resource series are absent."""
    data = tmp_path / "shop"
    shutil.copytree(synthetic_dir, data)
    (data / "components.json").unlink()
    images = {"frontend": "nginx:1.27", "service": "ghcr.io/shop/app:1", "mongodb": "mongo:7",
              "memcached": "memcached:1.6", "redis": "redis:7"}
    items = [_deployment(c, images[k], claim=f"{c}-data" if c in STATEFUL else None) for c, k in COMPONENTS.items()]
    items += [_pvc(f"{c}-data", "8Gi") for c in STATEFUL] + [_deployment("search-service", "ghcr.io/shop/search:1")]
    (tmp_path / "k8s.json").write_text(json.dumps(kubectl_list(items)))
    reference_args = ["evaluate", "--data", str(synthetic_dir), "--cloud", "cart-redis,catalog-service", "--json"]
    assert main(reference_args) == 0
    reference = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--data", str(data), "--kubernetes", str(tmp_path / "k8s.json"),
                 "--cloud", "cart-redis,catalog-service", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["disrupted_apis"] == reference["disrupted_apis"] != []
    assert main(["inspect", "--data", str(data), "--kubernetes", str(tmp_path / "k8s.json"), "--json"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)["components"]
    assert info["cart-redis"]["stateful"] and not info["cart-service"]["stateful"]
    assert info["cart-redis"]["forecast"]["disk_gib"] >= 0.5
