"""A REAL Prometheus server (Debian package `prometheus`) for the live-path tests: data is backfilled
from an OpenMetrics file with `promtool tsdb create-blocks-from openmetrics`, and the server listens on
a loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def start_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Path], str]]:
    """Factory: backfill one OpenMetrics file and serve it; returns the base URL. Servers stop with the module."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prometheus or not promtool:
        pytest.fail("Debian package 'prometheus' is not installed (.ci/run installs it)")
    processes: list[subprocess.Popen] = []

    def start(openmetrics: Path) -> str:
        work = tmp_path_factory.mktemp("prometheus")
        tsdb = work / "tsdb"
        backfill = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(openmetrics), str(tsdb)],
                                  capture_output=True, text=True, timeout=300)
        if backfill.returncode:
            pytest.fail(f"promtool backfill of {openmetrics} failed: {backfill.stderr[-2000:]}")
        (work / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
        port = free_port()
        log = work / "prometheus.log"
        process = subprocess.Popen([prometheus, f"--config.file={work / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tsdb}", f"--web.listen-address=127.0.0.1:{port}",
                                    "--storage.tsdb.retention.time=100y"],
                                   stdout=subprocess.DEVNULL, stderr=log.open("w"))
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    return url
            except requests.RequestException:
                pass
            if process.poll() is not None:
                pytest.fail(f"prometheus exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        pytest.fail("prometheus did not become ready")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)
