"""A multi-node Ray cluster on this host, loopback only: for tests, benchmarks and trying deployments.

Each node is its own raylet with the resources it declares (``ray.cluster_utils.Cluster``), so
placement groups, node affinity and restarts behave as on several machines. Ray otherwise
advertises a host's outward address even for ``127.0.0.1``; here every node, driver and worker
uses loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray resolve node addresses to it,
inherited by every process the cluster starts).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

#: Object store of each node: the deployments pass no tensors through it.
OBJECT_STORE_BYTES = 80 << 20


@contextmanager
def local_cluster(nodes: Sequence[dict[str, Any]], *, connect: bool = True) -> Iterator[Any]:
    """A cluster whose first node (the head) and further nodes take the ``ray start``-style options
    in ``nodes`` (``num_cpus``, ``num_gpus``, ``memory``, ``resources``, ...); this process is
    connected to it (with ``connect``) and ``RAY_ADDRESS`` names it while the context lasts. Every
    process of the cluster is stopped on exit."""
    previous = {key: os.environ.get(key) for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    loopback_before, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    defaults = {"object_store_memory": OBJECT_STORE_BYTES}
    head, *others = nodes
    cluster = Cluster(initialize_head=True, head_node_args={**defaults, "include_dashboard": False, **head})
    try:
        for node in others:
            cluster.add_node(**{**defaults, **node})
        os.environ["RAY_ADDRESS"] = cluster.address
        if connect:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = loopback_before
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
