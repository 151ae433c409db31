"""Components from Kubernetes objects: the JSON of `kubectl get deploy,sts,svc,pvc -o json` (a List).

Each Deployment, StatefulSet or DaemonSet is a component: its kind from its container images (redis,
memcached, mongo, rabbitmq, postgres, mysql; nginx/openresty/envoy = frontend) or else the name rules
of the configuration, stateful when it mounts a PersistentVolumeClaim or has volumeClaimTemplates,
replicas, CPU and memory requests (summed over containers, times replicas) and volume sizes (bound
capacity, else the requested storage). Services map their DNS names to the workload they select, so
trace peers named by a Service (server.address) resolve to the component behind it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hybridatlas.errors import AtlasInputError, warn_data
from hybridatlas.ingest.files import read_json

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
IMAGE_KINDS = (("memcached", "memcached"), ("redis", "redis"), ("mongo", "mongodb"), ("rabbitmq", "rabbitmq"),
               ("postgres", "postgres"), ("mysql", "mysql"), ("mariadb", "mysql"), ("openresty", "frontend"),
               ("nginx", "frontend"), ("envoy", "frontend"), ("haproxy", "frontend"))
STATEFUL_KINDS = {"mongodb", "postgres", "mysql"}
_QUANTITY = re.compile(r"^([0-9.]+(?:e[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {"": 1.0, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "Ki": 2.0**10,
           "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}


def quantity(text: Any, source: str) -> float:
    """A Kubernetes resource quantity ('500m', '2', '512Mi', '1.5Gi', '1G') as a plain number."""
    match = _QUANTITY.match(str(text).strip())
    if not match or match.group(2) not in _SUFFIX:
        raise AtlasInputError(source, f"not a Kubernetes quantity: {text!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def _kind_from_images(images: list[str]) -> str | None:
    for image in images:
        name = image.rsplit("/", 1)[-1].split(":", 1)[0].lower()
        for needle, kind in IMAGE_KINDS:
            if needle in name:
                return kind
    return None


def _requests(pod_spec: dict[str, Any], source: str) -> tuple[float, float]:
    cpu = memory = 0.0
    for container in pod_spec.get("containers") or []:
        requests = (container.get("resources") or {}).get("requests") or {}
        if "cpu" in requests:
            cpu += quantity(requests["cpu"], source)
        if "memory" in requests:
            memory += quantity(requests["memory"], source) / 2.0**30
    return cpu, memory


def _pvc_gib(pvc: dict[str, Any], source: str) -> float:
    capacity = ((pvc.get("status") or {}).get("capacity") or {}).get("storage")
    requested = (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    value = capacity or requested
    return quantity(value, source) / 2.0**30 if value else 0.0


def load_kubernetes(path: str | Path, kind_of=None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({component: kind, stateful, replicas, cpu_cores, memory_gib, volume_gib}, {service name: component}).

    `kind_of(name)` gives the kind of a workload whose images name no known store (default 'service')."""
    document = read_json(path)
    source = str(path)
    if not isinstance(document, dict) or not isinstance(document.get("items"), list):
        raise AtlasInputError(source, "expected the output of `kubectl get deploy,sts,svc,pvc -o json` (a List with items)")
    pvcs = {item["metadata"]["name"]: item for item in document["items"]
            if item.get("kind") == "PersistentVolumeClaim" and "metadata" in item}
    info: dict[str, dict[str, Any]] = {}
    labels: dict[str, dict[str, str]] = {}
    for item in document["items"]:
        if item.get("kind") not in WORKLOADS:
            continue
        try:
            name = item["metadata"]["name"]
            spec = item.get("spec") or {}
            template = spec["template"]
        except (KeyError, TypeError) as exc:
            raise AtlasInputError(source, f"{item.get('kind')} lacks {exc}: {str(item)[:200]}") from exc
        pod_spec = template.get("spec") or {}
        replicas = int(spec.get("replicas", 1)) if item["kind"] != "DaemonSet" else 1
        images = [c.get("image", "") for c in pod_spec.get("containers") or []]
        kind = _kind_from_images(images) or (kind_of(name) if kind_of else "service")
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec.get("volumes") or []
                  if isinstance(v, dict) and v.get("persistentVolumeClaim")]
        volume = sum(_pvc_gib(pvcs[c], source) for c in claims if c in pvcs)
        missing = [c for c in claims if c not in pvcs]
        if missing:
            warn_data(source, f"{name} mounts PersistentVolumeClaims {missing} that the input does not hold; "
                      "their sizes count as 0 (add pvc to the kubectl get)")
        templates = spec.get("volumeClaimTemplates") or []
        volume += replicas * sum(_pvc_gib(t, source) for t in templates)
        cpu, memory = _requests(pod_spec, source)
        info[name] = {"kind": kind, "stateful": bool(claims or templates) or kind in STATEFUL_KINDS,
                      "replicas": replicas, "cpu_cores": cpu * replicas, "memory_gib": memory * replicas,
                      "volume_gib": volume}
        labels[name] = (template.get("metadata") or {}).get("labels") or {}
    if not info:
        raise AtlasInputError(source, "holds no Deployment, StatefulSet or DaemonSet")
    aliases: dict[str, str] = {}
    for item in document["items"]:
        if item.get("kind") != "Service":
            continue
        selector = (item.get("spec") or {}).get("selector") or {}
        matched = [w for w, l in labels.items() if selector and all(l.get(k) == v for k, v in selector.items())]
        if len(matched) == 1:
            aliases[item["metadata"]["name"]] = matched[0]
        elif len(matched) > 1:
            warn_data(source, f"Service {item['metadata']['name']} selects several workloads {matched}; not resolved")
    return info, aliases


def peer_component(peer: str, aliases: dict[str, str]) -> str:
    """The component a peer name stands for: a Service name or its DNS name ('redis.shop.svc.cluster.local',
    with or without a port) resolves through `aliases`; an IP address stays as it is."""
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 else peer
    if host in aliases or re.fullmatch(r"[0-9.]+|\[?[0-9a-fA-F:]+\]?", host):
        return aliases.get(host, host)
    name = host.split(".", 1)[0]
    return aliases.get(name, name)
