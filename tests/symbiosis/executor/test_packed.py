"""Prepacked weights (``pack_weights``): forward and backward products on oneDNN's blocked copies
equal the plain GEMM's within float rounding; everything else keeps using the plain weight."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from symbiosis import BaseExecutor
from symbiosis.executor.ops import FrozenOp
from symbiosis.protocol import Direction, OpInfo, OpKind, OpRequest

from ..equivalence import check_equivalence

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")

FUSED = "model.layers.0.self_attn.(q_proj+k_proj+v_proj)"
MEMBER = "model.layers.0.self_attn.q_proj"


def _op(dtype: torch.dtype, out_features: int = 96, in_features: int = 64, directions=(Direction.FORWARD,)) -> FrozenOp:
    op = FrozenOp(OpInfo("w", OpKind.LINEAR, in_features, out_features), torch.randn(out_features, in_features, dtype=dtype))
    assert op.pack(directions)
    assert set(op.packed) == set(directions)
    return op


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("direction", [Direction.FORWARD, Direction.BACKWARD])
def test_a_packed_product_equals_the_plain_one(dtype, tolerance, rows, direction):
    op = _op(dtype, directions=(Direction.FORWARD, Direction.BACKWARD))
    forward = direction is Direction.FORWARD
    x = torch.randn(rows, 64 if forward else 96, dtype=dtype)
    expected = torch.mm(x.float(), op.weight.float().t() if forward else op.weight.float())
    width = 96 if forward else 64
    for out in (None, torch.empty(rows, width, dtype=dtype)):
        assert op.uses_packed(direction, dtype, None, None)
        y = op.apply(direction, x, out=out)
        assert y.dtype == dtype and y.shape == (rows, width)
        assert out is None or y is out
        torch.testing.assert_close(y.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_backward_casts_and_slices_use_the_plain_weight_unless_backward_is_packed():
    op = _op(torch.float32)
    assert not op.uses_packed(Direction.BACKWARD, torch.float32, None, None)
    grad = torch.randn(5, 96)
    assert torch.equal(op.apply(Direction.BACKWARD, grad), torch.mm(grad, op.weight))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(op.apply(Direction.FORWARD, x), torch.mm(x, op.weight.to(torch.bfloat16).t()))
    x = torch.randn(5, 64)
    assert torch.equal(op.apply(Direction.FORWARD, x, features=(8, 24)), torch.mm(x, op.weight[8:24].t()))


def test_only_linear_cpu_weights_of_packable_dtypes_are_packed():
    assert not FrozenOp(OpInfo("e", OpKind.EMBEDDING, 1, 8), torch.randn(10, 8)).pack()
    assert not FrozenOp(OpInfo("w", OpKind.LINEAR, 8, 8), torch.randn(8, 8, dtype=torch.float64)).pack()


@pytest.mark.parametrize("packing, copies", [(True, 1), ("forward", 1), ("both", 2)])
def test_an_executor_packs_each_weight_once_per_direction_and_counts_the_copies(model_dir, packing, copies):
    plain = BaseExecutor.from_pretrained(model_dir("llama"))
    packed = BaseExecutor.from_pretrained(model_dir("llama"), pack_weights=packing)
    ops = packed._ops
    assert len(ops[FUSED].packed) == copies
    assert not ops[MEMBER].packed  # members are row views of the fused weight: served plain
    linear = sum(op.weight.numel() * op.weight.element_size() for name, op in ops.items() if op.info.kind is OpKind.LINEAR and not _is_member(ops, name))
    assert packed.parameter_bytes() == plain.parameter_bytes() + copies * linear
    for name in (FUSED, MEMBER):
        for direction, width in ((Direction.FORWARD, ops[name].info.in_features), (Direction.BACKWARD, ops[name].info.out_features)):
            x = torch.randn(3, width)
            torch.testing.assert_close(packed.run(OpRequest(name, direction, x)), plain.run(OpRequest(name, direction, x)))


@pytest.mark.parametrize("packing", ["backward", 1.0])
def test_an_unknown_packing_is_refused(model_dir, packing):
    with pytest.raises(ValueError, match="pack_weights must be"):
        BaseExecutor.from_pretrained(model_dir("llama"), pack_weights=packing)


def _is_member(ops: dict[str, FrozenOp], name: str) -> bool:
    return any(name in op.info.members for op in ops.values())


@pytest.mark.parametrize("packing", ["forward", "both"])
def test_split_training_and_generation_over_packed_weights_equal_the_monolithic_model(model_dir, packing):
    """Products on the packed copies (forward only, or both directions): logits, loss, adapter
    gradients and greedy tokens still equal transformers + PEFT's."""
    path = model_dir("llama")
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
    errors = check_equivalence(path, config, executor=BaseExecutor.from_pretrained(path, pack_weights=packing))
    assert set(errors) == {"logits", "loss", "grads"}
