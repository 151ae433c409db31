"""Symbiosis on a Ray cluster: sharded, replicated executors placed, found, restarted and scaled by Ray.

``deploy`` starts a deployment (one actor per shard and replica, each serving its layer range with
the executor server, placed by placement groups) and records it in the registry actor; clients
attach with ``load_model("symbiosis+ray://NAME")`` and then talk to the servers directly.
``finetune`` runs ``symbiosis finetune`` as a Ray task; ``serve_openai`` runs the OpenAI-compatible
server as a Ray Serve deployment. Needs the ``ray`` extra: ``pip install "symbiosis-atlas[ray]"``.
"""

from ..transport.ray_directory import DeploymentNotFoundError
from .deploy import DeployError, PlacementError, deploy, scale, shutdown, shutdown_all, status
from .jobs import TaskResult, finetune

__all__ = [
    "DeployError",
    "DeploymentNotFoundError",
    "PlacementError",
    "TaskResult",
    "delete_openai",
    "deploy",
    "finetune",
    "scale",
    "serve_openai",
    "shutdown",
    "shutdown_all",
    "status",
]


def __getattr__(name: str):
    """``serve_openai`` and ``delete_openai`` import Ray Serve, only when used."""
    if name in ("serve_openai", "delete_openai"):
        from . import serving as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
