"""Quantized executors on a CUDA device (skipped without one, or without bitsandbytes).

The executor runs on the GPU; its products are the same dequantise-then-GEMM as on the CPU. The
reference is the CPU QLoRA model (bitsandbytes' CPU training products are that same computation;
its CUDA int8 path quantises activations too, which the executor does not), so the bound is
``GPU_REL_TOL`` of each tensor's scale, as for the other GPU tests, and greedy tokens are identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from symbiosis import BaseExecutor  # noqa: E402

from .equivalence import check_equivalence  # noqa: E402
from .test_equivalence_architectures import lora_all_linear  # noqa: E402
from .test_gpu import GPU_REL_TOL  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_quantized_executor_on_the_gpu(model_dir, model_type, quantization):
    path = model_dir(model_type)
    executor = BaseExecutor.from_pretrained(path, device="cuda", quantization=quantization)
    errors = check_equivalence(path, lora_all_linear(), executor=executor, quantization=quantization, rel_tol=GPU_REL_TOL)
    assert errors["grads"] <= GPU_REL_TOL


def test_nf4_bfloat16_products_on_the_gpu_with_the_client_there_too(model_dir):
    """QLoRA as published (NF4, bfloat16 products), client and reference on the GPU."""
    path = model_dir("llama")
    executor = BaseExecutor.from_pretrained(path, device="cuda", quantization="nf4", dtype="bfloat16")
    check_equivalence(path, lora_all_linear(), executor=executor, quantization="nf4", dtype="bfloat16", device="cuda",
                      reference_device="cuda", rel_tol=2e-2)
