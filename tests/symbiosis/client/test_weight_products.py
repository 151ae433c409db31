"""Code that multiplies by a base weight itself gets the monolithic model's answer, computed by the
executor, with gradients; code that needs the weight's values gets a clear error naming the operation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from symbiosis import BaseExecutor, BaseWeightAccessError, load_model

from ..equivalence import assert_close


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, model_dir):
    """(client, monolithic model) of one tiny model; Llama's ops are nn.Linear, GPT-2's are Conv1D."""
    path = model_dir(request.param)
    executor = BaseExecutor.from_pretrained(path)
    return load_model(executor), AutoModelForCausalLM.from_pretrained(path), executor


def weights(pair, name):
    """The client's phantom weight and the monolithic model's real one, for module ``name``."""
    client, mono, _ = pair
    return client.get_submodule(name).weight, mono.get_submodule(name).weight


def test_lm_head_products_equal_the_monolithic_ones(pair):
    client, mono, executor = pair
    phantom, weight = client.get_output_embeddings().weight, mono.get_output_embeddings().weight
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0))
    before = executor.stats.total()["requests"]
    products = {
        "F.linear": (F.linear(x, phantom), F.linear(x, weight)),
        "x @ W.T": (x @ phantom.T, x @ weight.T),
        "matmul 3-D": (torch.matmul(x.view(1, 5, -1), phantom.t()), torch.matmul(x.view(1, 5, -1), weight.t())),
        "W @ x.T": (phantom @ x.T, weight @ x.T),
        "row slice": (x @ phantom[10:40].t(), x @ weight[10:40].t()),
        "split": (x @ phantom.split(64)[1].t(), x @ weight.split(64)[1].t()),
        "addmm": (torch.addmm(torch.ones(30), x, phantom[10:40].t(), beta=0.5, alpha=2), torch.addmm(torch.ones(30), x, weight[10:40].t(), beta=0.5, alpha=2)),
        "backward product": (x[:, :30] @ phantom[10:40], x[:, :30] @ weight[10:40]),
    }
    for what, (split, reference) in products.items():
        assert_close(split, reference, what)
    assert executor.stats.total()["requests"] - before == len(products)  # each product is one executor request


def test_out_and_in_place_products_like_trl_chunked_lm_head(pair):
    """TRL's chunked log-prob kernel: ``torch.mm(h, W[a:b].to(dtype).t(), out=tile)`` into a strided
    view of a buffer, and ``acc.addmm_(g, W[a:b].float())`` for the hidden states' gradient."""
    client, mono, _ = pair
    phantom, weight = client.get_output_embeddings().weight, mono.get_output_embeddings().weight
    h = torch.randn(6, weight.shape[1])
    buffer = torch.full((6, 48), 7.0)
    torch.mm(h, phantom[16:48].to(torch.float32).t(), out=buffer[:, :32])
    assert_close(buffer[:, :32], h @ weight[16:48].t(), "mm out=")
    assert (buffer[:, 32:] == 7).all()  # nothing outside the output view was written
    grad = torch.randn(6, 32)
    acc, expected = torch.ones(6, weight.shape[1]), torch.ones(6, weight.shape[1])
    acc.addmm_(grad, phantom[16:48].float())
    expected.addmm_(grad, weight[16:48])
    assert_close(acc, expected, "addmm_")


def test_gradients_flow_through_products_with_the_weight(pair):
    """Autograd differentiates a product with the phantom like any product: the gradient with
    respect to the other operand is again a product with the weight (an executor request)."""
    client, mono, _ = pair
    name = "model.layers.0.self_attn.q_proj" if hasattr(client, "model") else "transformer.h.0.attn.c_attn"
    phantom, weight = weights(pair, name)
    linear = hasattr(client.get_submodule(name), "in_features")  # Conv1D stores W as [in, out]
    x = torch.randn(2, 3, weight.shape[1] if linear else weight.shape[0])
    results = []
    for w in (phantom, weight):
        xi = x.clone().requires_grad_(True)
        y = F.linear(xi, w) if linear else xi @ w
        (y * torch.arange(y.shape[-1])).sum().backward()
        results.append((y, xi.grad))
    assert_close(results[0][0], results[1][0], "output")
    assert_close(results[0][1], results[1][1], "input gradient")


def test_a_weight_cast_down_and_up_keeps_its_rounding(pair):
    """``W.to(bfloat16).float()`` holds W's values rounded to bfloat16 (TRL's chunked LM head on a CPU
    multiplies by exactly that in its backward)."""
    client, mono, _ = pair
    phantom, weight = client.get_output_embeddings().weight, mono.get_output_embeddings().weight
    x = torch.randn(4, weight.shape[1])
    rounded = weight.to(torch.bfloat16).float()
    assert not torch.equal(x @ rounded.t(), x @ weight.t())
    assert_close(x @ phantom.to(torch.bfloat16).float().t(), x @ rounded.t(), "bfloat16-rounded product")
    assert_close(x[:, :30] @ phantom[10:40].to(torch.bfloat16).float(), x[:, :30] @ rounded[10:40], "rounded backward product")


def test_products_in_another_dtype_compute_in_it(pair):
    """A product with the weight cast to bfloat16 (as autocast casts it) is computed in bfloat16."""
    client, mono, _ = pair
    phantom, weight = client.get_output_embeddings().weight, mono.get_output_embeddings().weight
    x = torch.randn(4, weight.shape[1]).to(torch.bfloat16)
    split, reference = x @ phantom.to(torch.bfloat16).t(), x @ weight.to(torch.bfloat16).t()
    assert split.dtype == torch.bfloat16
    assert torch.equal(split, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(F.linear(x.float(), phantom), F.linear(x.float(), weight))


@pytest.mark.parametrize(
    "operation, named",
    [
        (lambda w: w.add_(1.0), "aten.add_"),  # merging an adapter writes into W
        (lambda w: torch.linalg.norm(w, dim=1), "linalg_vector_norm"),  # DoRA's weight norm
        (lambda w: w.sum(), "aten.sum"),
        (lambda w: w.view(-1), "reshaping"),  # flattening into a collective's buffer
        (lambda w: torch.randn(3, w.shape[0]) @ w[:, :4], "input dimension"),
        (lambda w: w @ w.t(), "product of two base weights"),
        (lambda w: w.data_ptr(), "reading its memory"),  # a Triton / CUDA kernel handed the weight itself
    ],
)
def test_reading_the_values_fails_naming_the_operation(pair, operation, named):
    client, _, _ = pair
    phantom = client.get_output_embeddings().weight
    with pytest.raises(BaseWeightAccessError, match=named) as failure:
        operation(phantom)
    assert "lm_head" in str(failure.value) or "wte" in str(failure.value)


def test_mismatched_operands_fail_as_torch_fails(pair):
    client, _, _ = pair
    phantom = client.get_output_embeddings().weight
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        torch.randn(2, 3) @ phantom.t()
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.randn(2, phantom.shape[1], dtype=torch.bfloat16) @ phantom.t()
