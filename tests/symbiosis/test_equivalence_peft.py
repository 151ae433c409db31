"""Every supported PEFT method gives the same logits, loss, gradients and tokens split as monolithic."""

from __future__ import annotations

import pytest
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)

from .equivalence import check_equivalence

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

METHODS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "adalora": lambda: AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=3, total_step=10, target_modules=["q_proj", "v_proj", "up_proj"]),
    "loha": lambda: LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lokr": lambda: LoKrConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"]),
    "oft": lambda: OFTConfig(task_type="CAUSAL_LM", r=0, oft_block_size=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "p_tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_method_on_llama(model_dir, method):
    errors = check_equivalence(model_dir("llama"), METHODS[method]())
    assert set(errors) == {"logits", "loss", "grads"}


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora", "prefix_tuning"])
def test_peft_method_on_gpt2_conv1d(model_dir, method):
    configs = {
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
        "adalora": lambda: AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    check_equivalence(model_dir("gpt2"), configs[method]())


def test_lora_bias_on_op_with_bias(model_dir):
    """Qwen2's q/k/v have biases: they stay on the client and LoRA's own bias trains beside them."""
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], lora_bias=True)
    check_equivalence(model_dir("qwen2"), config)
