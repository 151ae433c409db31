"""Resolving what a client is given (an executor, an address, several addresses) to a ``Transport``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .base import Transport
from .ray_directory import SCHEME as RAY_SCHEME
from .ray_directory import RayDirectory, parse_ray_url
from .remote import RemoteTransport
from .replicated import ReplicatedTransport
from .sharded import ShardedTransport

#: Address schemes: ``symbiosis://host:port`` (plain) and ``symbiosis+tls://host:port`` (TLS).
SCHEMES = {"symbiosis": False, "symbiosis+tls": True}
#: Seconds a server of a Ray deployment is retried before the client asks the registry again.
FAILOVER_S = 1.0


def parse_address(url: str) -> tuple[str, bool]:
    """``"symbiosis+tls://h:7878"`` -> ``("h:7878", True)``; ``ValueError`` for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise ValueError(f"an executor address looks like symbiosis://host:port or symbiosis+tls://host:port, got {url!r}")
    return parts.netloc, SCHEMES[parts.scheme]


def connect(
    target: Any, *, token: str | None = None, tls_ca: str | Path | bytes | None = None, **options: Any
) -> Transport:
    """A ``Transport`` for ``target``: a ``Transport`` (e.g. a ``BaseExecutor``) as it is, an
    address string, or a list of them (a sharded base: each op goes to the shard that serves it).
    ``symbiosis+ray://NAME`` is a deployment on a Ray cluster (``symbiosis ray deploy``): its
    shards' replicas are found through the cluster's registry, then reached directly.

    ``token`` authenticates with the server; ``tls_ca`` is the CA certificate (PEM bytes or a path)
    that a ``symbiosis+tls://`` server's certificate must chain to; other options go to
    ``RemoteTransport``, except for a Ray deployment's ``ray_address`` (the cluster), ``refresh_s``
    and ``failover_s`` (see ``ReplicatedTransport``; ``retry_timeout_s`` bounds its failover).
    """
    if isinstance(target, (list, tuple)):
        shards = [connect(t, token=token, tls_ca=tls_ca, **options) for t in target]
        return shards[0] if len(shards) == 1 else ShardedTransport(shards)
    if isinstance(target, str) and target.startswith(f"{RAY_SCHEME}://"):
        return _connect_ray(target, token=token, tls_ca=tls_ca, **options)
    if isinstance(target, str):
        address, tls = parse_address(target)
        roots = Path(tls_ca).read_bytes() if isinstance(tls_ca, (str, Path)) else tls_ca
        return RemoteTransport(address, token=token, tls=tls, root_certificates=roots, **options)
    if isinstance(target, Transport):
        return target
    raise TypeError(f"cannot reach an executor through {type(target).__name__}: give a BaseExecutor, a Transport or an address")


def _connect_ray(
    url: str,
    *,
    ray_address: str | None = None,
    retry_timeout_s: float = 60.0,
    refresh_s: float = 5.0,
    failover_s: float = FAILOVER_S,
    **options: Any,
) -> ReplicatedTransport:
    name, address = parse_ray_url(url)
    directory = RayDirectory(name, address=ray_address or address)
    open_endpoint = functools.partial(connect, retry_timeout_s=failover_s, **options)
    return ReplicatedTransport(directory, open_endpoint, retry_timeout_s=retry_timeout_s, refresh_s=refresh_s)
