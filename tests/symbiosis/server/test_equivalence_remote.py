"""Through the server, a client is exactly the in-process client: the core equivalence tests over every lane.

Each case runs the core harness with the client attached to a server on a loopback port: every
architecture the core suite requires over the same-host shared-memory channel and over the TCP data
channel (``shared_memory=False``), two of them (a linear and a Conv1D family) over the gRPC stream
fallback, and every PEFT method of the core suite.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from symbiosis import load_model
from symbiosis.transport import RemoteTransport

from ..equivalence import assert_close, check_equivalence, monolithic
from ..test_equivalence_architectures import REQUIRED
from ..test_equivalence_peft import METHODS
from .servers import LANES

#: Architectures also checked over the gRPC stream fallback (the lanes share everything but the transfer).
GRPC_ARCHITECTURES = ("llama", "gpt2")
CASES = [(model_type, lane) for model_type in REQUIRED for lane in ("shm", "tcp")] + [(m, "grpc") for m in GRPC_ARCHITECTURES]


def lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")


@pytest.mark.parametrize("model_type, lane", CASES)
def test_architectures_through_server(served, model_dir, model_type, lane):
    server = served(model_type)
    errors = check_equivalence(model_dir(model_type), lora(), executor=server.url, connect_options=LANES[lane])
    assert errors["grads"] <= 1e-5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_methods_through_server(served, model_dir, method):
    check_equivalence(model_dir("llama"), METHODS[method](), executor=served("llama").url)


@pytest.mark.parametrize("placement", [{"embeddings": "executor"}, {"lm_head": "client"}])
def test_placements_through_server(served, model_dir, placement):
    check_equivalence(model_dir("llama"), lora(), executor=served("llama").url, **placement)


def test_shared_memory_lane_is_used(served):
    client = load_model(served("llama").url, connect_options={"shared_memory": True})
    transport = client.symbiosis.transport
    assert isinstance(transport, RemoteTransport)
    client(input_ids=torch.tensor([[1, 2, 3]]))
    assert transport.uses_shared_memory


@pytest.mark.parametrize("lane", sorted(LANES))
def test_autocast_through_server(served, model_dir, lane):
    """The compute dtype of autocast travels with each request (every lane)."""
    check_equivalence(model_dir("qwen2"), lora(), executor=served("qwen2").url, connect_options=LANES[lane], autocast=torch.bfloat16)


@pytest.mark.parametrize("lane", sorted(LANES))
def test_weight_products_through_server(served, model_dir, lane):
    """Products with a base weight travel with their output features and weight rounding (OpCall
    fields 9 and 10) on every lane: a row slice, a bfloat16-rounded weight, a backward product."""
    path = model_dir("llama")
    client = load_model(served("llama").url, connect_options=LANES[lane])
    phantom, weight = client.get_output_embeddings().weight, monolithic(path).get_output_embeddings().weight
    x = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(0))
    rounded = weight.to(torch.bfloat16).float()
    assert_close(x @ phantom[10:40].t(), x @ weight[10:40].t(), "row slice")
    assert_close(x @ phantom.to(torch.bfloat16).float().t(), x @ rounded.t(), "bfloat16-rounded product")
    assert_close(x[:, :30] @ phantom[10:40].to(torch.bfloat16).float(), x[:, :30] @ rounded[10:40], "rounded backward product")
    assert client.symbiosis.transport.lane_kind == lane
