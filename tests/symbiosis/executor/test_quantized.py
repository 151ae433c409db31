"""Quantized executors: products through the quantized weights, one resident copy, memory as reported."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from symbiosis import BaseExecutor, load_model  # noqa: E402
from symbiosis.client import resident_bytes  # noqa: E402
from symbiosis.executor.quantized import QuantizedOp, QuantizedWeight, is_quantized_linear  # noqa: E402
from symbiosis.protocol import Direction, OpRequest  # noqa: E402

from ..equivalence import monolithic  # noqa: E402
from ..server.servers import start_server_process  # noqa: E402


@pytest.fixture(scope="module")
def llama(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module", params=["nf4", "int8"])
def quantized(request, llama):
    return BaseExecutor.from_pretrained(llama, quantization=request.param)


def _linear_ops(executor: BaseExecutor) -> dict:
    return {name: op for name, op in executor._ops.items() if isinstance(op, QuantizedOp)}


def test_linear_ops_are_held_quantized_and_the_lm_head_dense_in_float32(quantized):
    ops = _linear_ops(quantized)
    assert ops and all(op.parts[0].data.dtype in (torch.uint8, torch.int8) for op in ops.values())
    assert "lm_head" not in ops  # transformers keeps the output layer dense, as for a QLoRA user
    assert quantized.dtype == torch.float32 and quantized.spec().dtype == "float32"
    assert "quantization_config" not in quantized.spec().config
    assert quantized.quantization in ("nf4", "int8") and f"quantization={quantized.quantization}" in repr(quantized)


def test_fused_ops_hold_the_members_quantized_weights(quantized):
    """q/k/v and gate/up fuse into one GEMM without a second copy of any quantized weight."""
    fused = [op for op in _linear_ops(quantized).values() if op.info.members]
    assert len(fused) == 2 * 2  # two layers: attention and MLP
    for op in fused:
        members = [quantized._ops[m] for m in op.info.members]
        assert all(a is b for a, b in zip(op.parts, (m.parts[0] for m in members), strict=True))
        dense = op.dequantized(torch.float32)
        assert torch.equal(dense, torch.cat([m.dequantized(torch.float32) for m in members]))


@pytest.mark.parametrize("direction", list(Direction))
def test_products_go_through_the_dequantized_weight_in_the_input_dtype(quantized, direction):
    op = next(op for op in _linear_ops(quantized).values() if op.info.members)
    weight = op.dequantized(torch.float32)
    width = weight.shape[1] if direction is Direction.FORWARD else weight.shape[0]
    x = torch.randn(5, width, generator=torch.Generator().manual_seed(0))
    expected = x @ (weight.t() if direction is Direction.FORWARD else weight)
    y = quantized.run(OpRequest(op.info.name, direction, x))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    half = quantized.run(OpRequest(op.info.name, direction, x.bfloat16()))  # delivered in the caller's dtype
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("features", [(0, 64), (40, 100), (70, 128)])
def test_products_with_a_range_of_the_fused_weight(quantized, features):
    """``features``: only rows [start, end) of W, across the members' boundaries of a fused op."""
    op = next(op for op in _linear_ops(quantized).values() if op.info.members)
    x = torch.randn(3, op.info.in_features, generator=torch.Generator().manual_seed(2))
    expected = x @ op.dequantized(torch.float32)[features[0]:features[1]].t()
    assert torch.equal(op.apply(Direction.FORWARD, x, features=features), expected)
    grad = torch.randn(3, features[1] - features[0], generator=torch.Generator().manual_seed(3))
    assert torch.equal(op.apply(Direction.BACKWARD, grad, features=features), grad @ op.dequantized(torch.float32)[features[0]:features[1]])


def test_rows_never_mix_in_a_batch(quantized):
    """A client's rows give the same bits whoever shares its GEMM (no batch-wide activation quantization)."""
    op = next(iter(_linear_ops(quantized).values()))
    g = torch.Generator().manual_seed(1)
    mine = torch.randn(3, op.info.in_features, generator=g)
    quiet, loud = torch.randn(3, op.info.in_features, generator=g), 100 * torch.randn(3, op.info.in_features, generator=g)
    outs = [quantized._run_batch(op.info.name, Direction.FORWARD, [OpRequest(op.info.name, Direction.FORWARD, mine),
                                                                   OpRequest(op.info.name, Direction.FORWARD, other)])[0]
            for other in (quiet, loud)]
    assert torch.equal(outs[0], outs[1])


def test_4bit_products_run_in_the_compute_dtype(llama):
    executor = BaseExecutor.from_pretrained(llama, quantization="4bit", dtype="bfloat16")
    assert executor.quantization == "nf4" and executor.dtype == torch.float32  # dense weights: float32, as QLoRA's
    op = next(iter(_linear_ops(executor).values()))
    assert op.compute_dtype == torch.bfloat16
    x = torch.randn(4, op.info.in_features)
    y = executor.run(OpRequest(op.info.name, Direction.FORWARD, x))
    expected = (x.bfloat16() @ op.dequantized(torch.bfloat16).t()).float()
    assert y.dtype == torch.float32 and torch.equal(y, expected)


def test_resident_bytes_match_the_monolithic_qlora_model(llama, quantized):
    """The executor holds what one QLoRA process holds for its base; quantized ops far below float32."""
    mono = monolithic(llama, quantization=quantized.quantization)
    # get_memory_footprint counts parameters and buffers, not the quantization states (scales, codebooks)
    states = [t for m in mono.modules() if is_quantized_linear(m) for t in QuantizedWeight.of(m).tensors()]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*mono.parameters(), *mono.buffers(), *states]}
    assert quantized.parameter_bytes() == sum(held.values()) > mono.get_memory_footprint()
    dense = BaseExecutor.from_pretrained(llama)
    dense_ops = sum(op.weight.nbytes for name, op in dense._ops.items() if name in _linear_ops(quantized) and not op.info.members)
    quant_ops = sum(t.nbytes for name, op in _linear_ops(quantized).items() if not op.info.members for t in op.held_tensors())
    assert quant_ops < dense_ops * (0.3 if quantized.quantization == "int8" else 0.2)


def test_a_clients_memory_does_not_depend_on_the_base_quantization(llama, quantized):
    assert resident_bytes(load_model(quantized)) == resident_bytes(load_model(BaseExecutor.from_pretrained(llama)))


def test_unknown_quantization_is_refused(llama):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        BaseExecutor.from_pretrained(llama, quantization="int3")


def test_symbiosis_serve_quantize(llama):
    """``symbiosis serve --quantize 4bit``: a remote client trains against the NF4 base."""
    server = start_server_process(llama, "--quantize", "4bit", "--dtype", "bfloat16")
    try:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(load_model(server.address), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
        ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and g.isfinite().all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        assert server.terminate() == 0


def test_a_checkpoint_saved_quantized_loads_quantized(llama, tmp_path):
    """Pre-quantized checkpoints (as published for QLoRA) load with or without ``quantization``; another one is refused."""
    reference = BaseExecutor.from_pretrained(llama, quantization="nf4")
    monolithic(llama, quantization="nf4").save_pretrained(tmp_path)
    for quantization in (None, "nf4"):
        executor = BaseExecutor.from_pretrained(tmp_path, quantization=quantization)
        assert executor.quantization == "nf4" and executor.parameter_bytes() == reference.parameter_bytes()
        op = next(iter(_linear_ops(executor)))
        assert torch.equal(executor._ops[op].dequantized(torch.float32), reference._ops[op].dequantized(torch.float32))
    with pytest.raises(ValueError, match="saved quantized"):
        BaseExecutor.from_pretrained(tmp_path, quantization="int8")
