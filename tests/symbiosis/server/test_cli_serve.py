"""``symbiosis serve`` end to end: two shard processes with tenants and TLS, one client of both;
SIGTERM handling."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from symbiosis import load_model

from ..equivalence import assert_close
from .servers import server_process, start_server_process
from .test_tenancy import _self_signed


def test_sharded_tls_tenants_via_cli(model_dir, tmp_path):
    path = model_dir("llama", num_hidden_layers=3)
    cert, key = _self_signed()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "tenants.json").write_text('{"tenants": [{"name": "alice", "token": "alice-secret", "stats": true}]}')
    common = ["--host", "localhost", "--tenants", str(tmp_path / "tenants.json"), "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    with server_process(path, "--layers", "0:2", "--metrics-port", "0", "--threads", "1", *common) as first, server_process(path, "--layers", "2:3", *common) as second:
        assert first.address.startswith("symbiosis+tls://localhost:")
        client = load_model([first.address, second.address], token="alice-secret", connect_options={"tls_ca": tmp_path / "cert.pem"})
        ids = torch.tensor([[5, 9, 2, 7, 1]])
        with torch.no_grad():
            assert_close(client(input_ids=ids).logits, AutoModelForCausalLM.from_pretrained(path)(input_ids=ids).logits, "logits")
        shards = client.symbiosis.transport.shards
        assert [s.spec().layer_range for s in shards] == [(0, 2), (2, 3)]
        first_ops = {op["op"] for op in shards[0].stats()["ops"]}
        assert "lm_head" not in first_ops and "lm_head" in {op["op"] for op in shards[1].stats()["ops"]}
        metrics = requests.get(f"http://localhost:{first.metrics_port}/metrics", timeout=10).text
        assert 'tenant="alice"' in metrics


def _threads_taking(pid: int, sig: int) -> list[int]:
    """The threads of ``pid`` other than its main thread that do not block ``sig``."""
    tids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        blocked = next(int(line.split()[1], 16) for line in (task / "status").read_text().splitlines() if line.startswith("SigBlk:"))
        if int(task.name) != pid and not blocked & (1 << (sig - 1)):
            tids.append(int(task.name))
    return tids


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "tgkill"), reason="needs Linux's tgkill")
def test_sigterm_delivered_to_any_thread_drains_the_server(model_dir):
    """The kernel may hand a process's SIGTERM to any thread that does not block it (gRPC's, torch's),
    while Python runs handlers in the main thread only: the server must still notice, drain and exit."""
    server = start_server_process(model_dir("llama"))
    try:
        pid = server.process.pid
        (tid, *_) = _threads_taking(pid, signal.SIGTERM)
        assert ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
        assert server.process.wait(60) == 0
    finally:
        server.kill()
