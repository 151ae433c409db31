"""``symbiosis serve`` end to end: two shard processes with tenants and TLS, one client of both."""

from __future__ import annotations

import requests
import torch
from transformers import AutoModelForCausalLM

from symbiosis import load_model

from ..equivalence import assert_close
from .servers import server_process
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
