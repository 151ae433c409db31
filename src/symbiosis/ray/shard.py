"""A shard actor: one replica of one shard of a deployment, serving ``symbiosis serve --layers A:B``.

The actor runs the executor server in its own process, built by exactly the code ``symbiosis
serve`` runs (``cli.serve.parse_args`` and ``start_server``) from the deployment's serve options,
listening on its node's address. It reports itself to the registry as ``starting`` before it loads
the model and as ``ready`` (address, fingerprint) once it serves; Ray restarts a killed actor in its
placement-group bundle (on the same node, or on another that fits if the node died), and the new
incarnation reports its new address the same way.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..transport.ray_directory import registry


class ShardServer:
    """Replica ``replica`` of shard ``shard`` of the deployment ``spec`` describes (see ``deploy``)."""

    def __init__(self, spec: dict[str, Any], shard: int, replica: int) -> None:
        import ray

        self.spec, self.shard, self.replica = spec, shard, replica
        self._registry = registry()
        self._node_id = ray.get_runtime_context().get_node_id()
        self._address, self._fingerprint, self._metrics_port = None, None, None
        self._set_state("starting")
        self.server = self._start_server()
        self._set_state("ready")

    def _start_server(self) -> Any:
        import ray

        from ..cli.serve import parse_args, start_server
        from ..transport.fingerprint import fingerprint_of

        host = self.spec["host"] or ray.util.get_node_ip_address()
        start, end = self.spec["layers"][self.shard]
        layers = ["--layers", f"{start}:{end}"] if len(self.spec["layers"]) > 1 else []
        argv = [self.spec["model"], "--host", host, "--port", "0", *layers, *self.spec["serve_options"]]
        try:
            server = start_server(parse_args(argv))
        except SystemExit as exc:  # the command's own usage errors
            raise ValueError(str(exc.code)) from None
        advertised = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::") else host
        scheme = "symbiosis+tls" if server.tls else "symbiosis"
        self._address = f"{scheme}://{f'[{advertised}]' if ':' in advertised else advertised}:{server.port}"
        self._fingerprint = fingerprint_of(server.executor, server.executor.spec())
        self._metrics_port = server.metrics_port
        return server

    def describe(self) -> dict[str, Any]:
        """What this replica reports to the registry."""
        return dict(
            state=self._state,
            address=self._address,
            fingerprint=self._fingerprint,
            node_id=self._node_id,
            pid=os.getpid(),
            metrics_port=self._metrics_port,
            since=self._since,
        )

    def announce(self) -> None:
        """Report to the registry again (it asks after it was restarted)."""
        self._report(wait=False)

    def drain(self) -> None:
        """Stop taking new clients: the registry assigns this replica to nobody from now on."""
        self._set_state("draining")

    def stop(self, grace_s: float) -> None:
        """Stop the server gracefully: calls in flight finish (at most ``grace_s``), new ones are refused."""
        self.server.stop(grace_s)

    def _set_state(self, state: str) -> None:
        self._state, self._since = state, time.time()
        self._report(wait=True)

    def _report(self, *, wait: bool) -> None:
        import ray

        call = self._registry.report.remote(self.spec, self.shard, self.replica, self.describe())
        if wait:
            ray.get(call)
