"""Adapters of several PEFT methods saved in standard PEFT directories, and reference generations."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ..equivalence import perturb_adapters

#: One adapter per PEFT family the server must serve side by side.
ADAPTER_CONFIGS: dict[str, PeftConfig] = {
    "lora": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


def save_adapter(model_dir: Path, config: PeftConfig, path: Path, seed: int) -> Path:
    """A randomly perturbed (so non-identity) adapter of ``config`` on the monolithic model, saved to ``path``."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    perturb_adapters(model, seed=seed)
    model.save_pretrained(path)
    return path


def monolithic(model_dir: Path, adapter: Path | None) -> torch.nn.Module:
    """The plain transformers model, with the adapter loaded by PEFT when one is given."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return (PeftModel.from_pretrained(model, adapter) if adapter is not None else model).eval()


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: list[int], max_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy tokens recomputed from scratch (no KV cache) at every step: the ground truth."""
    sequence = list(prompt)
    for _ in range(max_tokens):
        ids = torch.tensor([sequence])
        token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
        sequence.append(token)
        if token in eos_ids:
            break
    return sequence[len(prompt) :]
