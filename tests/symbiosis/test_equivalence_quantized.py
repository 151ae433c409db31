"""A quantized executor equals the monolithic model quantized the same way with PEFT on top (QLoRA).

The reference loads the base with the executor's ``BitsAndBytesConfig`` and runs
``prepare_model_for_kbit_training`` (``equivalence.monolithic``), so both hold the same quantized bits
and float32 dense weights; logits, loss and adapter gradients must agree within ``REL_TOL`` when
products run in float32 (only the GEMMs' summation order differs) and greedy tokens must be identical.
"""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")

from peft import LoraConfig  # noqa: E402

from .equivalence import REL_TOL, check_equivalence  # noqa: E402
from .test_equivalence_architectures import REQUIRED, lora_all_linear  # noqa: E402
from .test_equivalence_peft import METHODS  # noqa: E402

#: bfloat16 products: both sides round inputs and weights alike, but GEMMs of other shapes (a fused
#: q/k/v against three products) may round a last bit differently; 1% of the tensor's scale.
BF16_REL_TOL = 1e-2


@pytest.mark.parametrize("model_type", REQUIRED)
def test_nf4_required_family_with_lora(model_dir, model_type):
    errors = check_equivalence(model_dir(model_type), lora_all_linear(), quantization="nf4")
    assert set(errors) == {"logits", "loss", "grads"} and errors["grads"] <= REL_TOL


#: PEFT methods that wrap bitsandbytes layers (PEFT has no quantized LoHa, LoKr or OFT layers), and a prompt-learning one.
@pytest.mark.parametrize("method", ["lora", "ia3", "adalora", "prefix_tuning"])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_peft_methods_on_quantized_llama(model_dir, method, quantization):
    check_equivalence(model_dir("llama"), METHODS[method](), quantization=quantization)


@pytest.mark.parametrize("model_type", ["gpt2", "phi"])
def test_int8_other_families(model_dir, model_type):
    """GPT-2's Conv1D layers (transposed by transformers before quantizing) and Phi's biased, partial-rotary layers in int8."""
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear")
    check_equivalence(model_dir(model_type), config, quantization="int8")


def test_fp4_llama(model_dir):
    check_equivalence(model_dir("llama"), lora_all_linear(), quantization="fp4")


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_nf4_with_bfloat16_products_is_the_qlora_recipe(model_dir, model_type):
    """NF4 weights, bfloat16 products (``bnb_4bit_compute_dtype``), float32 everything else: QLoRA as published."""
    errors = check_equivalence(model_dir(model_type), lora_all_linear(), quantization="nf4", dtype="bfloat16", rel_tol=BF16_REL_TOL)
    assert errors["grads"] <= BF16_REL_TOL
