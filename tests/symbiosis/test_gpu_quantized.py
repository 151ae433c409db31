"""Quantized executors on a CUDA device (skipped without one, or without bitsandbytes).

The executor runs on the GPU; its products are the same dequantise-then-GEMM as on the CPU. The
reference is the CPU QLoRA model (bitsandbytes' CPU training products are that same computation;
its CUDA int8 path quantises activations too, which the executor does not). bitsandbytes' CUDA
dequantisation does not round exactly as its CPU kernel does: on an H200 (2026-12-04, bitsandbytes
0.50.2, torch 2.11+cu130) logits and gradients differed by up to 2.9e-4 of each tensor's scale (int8 on
Llama, GPT-2 and Qwen2; NF4 on Llama and GPT-2), above the 1e-4 (``GPU_REL_TOL``) of the unquantized
GPU tests; the bound here is ``QUANTIZED_GPU_REL_TOL`` (not yet re-run on a GPU). Greedy tokens must be
identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from symbiosis import BaseExecutor  # noqa: E402

from .equivalence import check_equivalence  # noqa: E402
from .test_equivalence_architectures import lora_all_linear  # noqa: E402

#: Measured up to 2.9e-4 (above); a wrong weight or a missed adapter is off by orders of magnitude more.
QUANTIZED_GPU_REL_TOL = 1e-3

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_quantized_executor_on_the_gpu(model_dir, model_type, quantization):
    path = model_dir(model_type)
    executor = BaseExecutor.from_pretrained(path, device="cuda", quantization=quantization)
    errors = check_equivalence(path, lora_all_linear(), executor=executor, quantization=quantization, rel_tol=QUANTIZED_GPU_REL_TOL)
    assert errors["grads"] <= QUANTIZED_GPU_REL_TOL


def test_nf4_bfloat16_products_on_the_gpu_with_the_client_there_too(model_dir):
    """QLoRA as published (NF4, bfloat16 products), client and reference on the GPU."""
    path = model_dir("llama")
    executor = BaseExecutor.from_pretrained(path, device="cuda", quantization="nf4", dtype="bfloat16")
    check_equivalence(path, lora_all_linear(), executor=executor, quantization="nf4", dtype="bfloat16", device="cuda",
                      reference_device="cuda", rel_tol=2e-2)
