"""Through the server, a client is exactly the in-process client: the core equivalence tests over gRPC.

Each case runs the core harness with the client attached to a server on a loopback port: every
architecture the core suite requires over the plain gRPC stream (``shared_memory=False``) and over
the same-host shared-memory channel, and every PEFT method of the core suite.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from symbiosis import load_model
from symbiosis.transport import RemoteTransport

from ..equivalence import check_equivalence
from ..test_equivalence_architectures import REQUIRED
from ..test_equivalence_peft import METHODS

PATHS = {"tcp": {"shared_memory": False}, "shm": {"shared_memory": True}}


def lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("model_type", REQUIRED)
def test_architectures_through_server(served, model_dir, model_type, path):
    server = served(model_type)
    errors = check_equivalence(model_dir(model_type), lora(), executor=server.url, connect_options=PATHS[path])
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


@pytest.mark.parametrize("path", sorted(PATHS))
def test_autocast_through_server(served, model_dir, path):
    """The compute dtype of autocast travels with each request (gRPC stream and shared memory)."""
    check_equivalence(model_dir("qwen2"), lora(), executor=served("qwen2").url, connect_options=PATHS[path], autocast=torch.bfloat16)
