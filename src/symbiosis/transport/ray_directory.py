"""``symbiosis+ray://NAME``: a deployment on a Ray cluster, found through its registry actor.

The registry is a detached actor named ``REGISTRY_NAME`` in namespace ``NAMESPACE`` (started by
``symbiosis ray deploy``, see ``symbiosis.ray``); this module only asks it questions, by name, so
the transport layer needs nothing from the layers that deploy. Ray is an optional dependency
(``pip install "symbiosis-atlas[ray]"``), imported when a ``symbiosis+ray://`` address is used.

The Ray cluster is the one this process is connected to already (inside a Ray task or actor, or a
driver that called ``ray.init``), else the one at ``address`` (``symbiosis+ray://NAME?address=...``
or the ``ray_address`` connect option), else ``RAY_ADDRESS``, else a cluster started on this host.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import ExecutorUnavailableError, SymbiosisError
from .replicated import Endpoint

SCHEME = "symbiosis+ray"
#: The registry actor's name and namespace on the Ray cluster.
REGISTRY_NAME = "symbiosis-registry"
NAMESPACE = "symbiosis"
#: Deployment names: they appear in URLs and actor names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: Seconds to wait for the registry's answer (it may be restarting) before the call counts as failed.
CALL_TIMEOUT_S = 30.0


class DeploymentNotFoundError(SymbiosisError, LookupError):
    """No deployment of that name on the Ray cluster (or no registry at all)."""


def parse_ray_url(url: str) -> tuple[str, str | None]:
    """``"symbiosis+ray://chat?address=head:6379"`` -> ``("chat", "head:6379")``."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    unknown = set(query) - {"address"}
    if parts.scheme != SCHEME or not NAME_PATTERN.match(parts.netloc) or parts.path not in ("", "/") or unknown:
        raise ValueError(f"a Ray deployment's address looks like {SCHEME}://NAME or {SCHEME}://NAME?address=RAY_ADDRESS, got {url!r}")
    return parts.netloc, query.get("address", [None])[-1]


def check_name(name: str) -> str:
    """``name`` if it can name a deployment, else ``ValueError``."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"invalid deployment name {name!r}: letters, digits and . _ - (at most 63, starting with a letter or digit)")
    return name


def init_ray(address: str | None = None) -> None:
    """Connect this process to a Ray cluster unless it is connected already (see the module doc)."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=target, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise ExecutorUnavailableError(f"cannot reach a Ray cluster at {target!r} (give its address or set RAY_ADDRESS): {exc}") from exc


def registry() -> Any:
    """A handle to the registry actor; ``DeploymentNotFoundError`` if there is none."""
    import ray

    try:
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    except ValueError:
        raise DeploymentNotFoundError("no Symbiosis deployment on this Ray cluster (no registry actor): start one with `symbiosis ray deploy`") from None


def ask(call: Any, what: str) -> Any:
    """The result of the registry call ``call`` (an ObjectRef); ``ExecutorUnavailableError`` if it
    does not come within ``CALL_TIMEOUT_S`` or the registry is gone."""
    import ray

    try:
        return ray.get(call, timeout=CALL_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(call)
        raise ExecutorUnavailableError(f"the Symbiosis registry did not answer {what} within {CALL_TIMEOUT_S:.0f} s") from None
    except ray.exceptions.RayActorError as exc:
        raise ExecutorUnavailableError(f"the Symbiosis registry is unavailable: {exc}") from None


class RayDirectory:
    """The ``Directory`` of deployment ``name``: the registry actor assigns this client's replicas."""

    def __init__(self, name: str, *, address: str | None = None) -> None:
        import ray

        self.name = check_name(name)
        init_ray(address)
        self._registry = registry()
        self._node = ray.get_runtime_context().get_node_id()

    def assign(self, client: str, current: Sequence[Endpoint], avoid: Collection[str], lease_s: float) -> list[Endpoint]:
        import ray

        if not ray.is_initialized():  # a call would start a Ray instance of its own
            raise ExecutorUnavailableError("this process is no longer connected to the Ray cluster")
        answer = ask(
            self._registry.assign.remote(self.name, client, [e.replica for e in current], sorted(avoid), lease_s, self._node),
            f"which replicas {self.name} has",
        )
        if "unknown" in answer:
            raise DeploymentNotFoundError(answer["unknown"])
        if "unavailable" in answer:
            raise ExecutorUnavailableError(answer["unavailable"])
        return [Endpoint(**{**endpoint, "layers": tuple(endpoint["layers"]) if endpoint["layers"] else None}) for endpoint in answer["endpoints"]]

    def release(self, client: str) -> None:
        import ray

        if ray.is_initialized():
            self._registry.release.remote(self.name, client)

    def __repr__(self) -> str:
        return f"RayDirectory({self.name!r})"
