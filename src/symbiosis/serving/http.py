"""Running the API under uvicorn on a socket bound up front, so the port is known before serving
(port 0 picks a free one), in the foreground (the CLI) or on a background thread (tests, notebooks)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class HttpServer:
    """uvicorn serving ``app`` on ``host:port``; ``url`` is its base URL (``http://host:port``).

    Logs a warning when ``app``'s admin API has no token (``app.state.admin_open``, set by
    ``create_app``) and ``host`` is not a loopback address: anyone who reaches it could load adapters.
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        if getattr(app.state, "admin_open", False) and not _is_loopback(host):
            log.warning(
                "/admin is open to anyone who can reach %s (it loads and unloads adapters from server-side paths): "
                "give an admin token (--admin-token) or listen on a loopback address",
                self.url,
            )
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self, ready_file: Path | None = None) -> None:
        """Serve in the main thread until SIGINT or SIGTERM, then shut down gracefully and return.

        Announces ``{"url", "port"}`` in ``ready_file`` once serving.
        """
        if ready_file is not None:
            threading.Thread(target=self._announce, args=(ready_file,), daemon=True).start()
        # uvicorn shuts down gracefully on either signal, then re-raises it: both end as KeyboardInterrupt here
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            self._server.run(sockets=[self._socket])
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)

    def start(self, timeout: float = 30.0) -> HttpServer:
        """Serve on a background thread; return once it accepts connections."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, name="http-server", daemon=True)
        self._thread.start()
        self._wait_started(timeout)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the background thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or (self._thread is not None and not self._thread.is_alive()):
                raise RuntimeError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.01)

    def _announce(self, ready_file: Path) -> None:
        self._wait_started(timeout=600)
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"url": self.url, "port": self.port}), encoding="utf-8")
        os.replace(tmp, ready_file)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
