"""Adapters of every PEFT method the server serves, saved in standard PEFT directories, and the
monolithic transformers + PEFT references their answers must equal."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from ..equivalence import perturb_adapters

#: One adapter per PEFT family the server must serve side by side (two LoRA: other rank, targets and scaling).
ADAPTER_CONFIGS: dict[str, PeftConfig] = {
    "lora": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora_wide": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, use_rslora=True, target_modules="all-linear"),
    "ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": LoHaConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lokr": LoKrConfig(task_type="CAUSAL_LM", r=4, alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"]),
    "oft": OFTConfig(task_type="CAUSAL_LM", r=0, oft_block_size=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "adalora": AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=3, total_step=10, target_modules=["q_proj", "v_proj"]),
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=32),
}


def save_adapter(model_dir: Path, config: PeftConfig, path: Path, seed: int) -> Path:
    """A randomly perturbed (so non-identity) adapter of ``config`` on the monolithic model, saved to ``path``."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    perturb_adapters(model, seed=seed)
    model.save_pretrained(path)
    return path


def save_adapters(model_dir: Path, root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """``save_adapter`` for each of ``names`` (default: every method), adapter i seeded with i."""
    return {name: save_adapter(model_dir, ADAPTER_CONFIGS[name], root / name, seed=i) for i, name in enumerate(names or ADAPTER_CONFIGS)}


def monolithic(model_dir: Path, adapter: Path | None) -> torch.nn.Module:
    """The plain transformers model, with the adapter loaded by PEFT when one is given."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return (PeftModel.from_pretrained(model, adapter) if adapter is not None else model).eval()


@torch.no_grad()
def logits_from_scratch(model: torch.nn.Module, sequence: list[int]) -> torch.Tensor:
    """The logits at every position of ``sequence``, one forward without a cache (``[len, vocab]``);
    prompt-learning positions are dropped, so row ``i`` predicts ``sequence[i + 1]``."""
    ids = torch.tensor([sequence])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(sequence) :]


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: list[int], max_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy tokens recomputed from scratch (no KV cache) at every step: the ground truth."""
    return greedy_with_logprobs(model, prompt, max_tokens, eos_ids)[0]


@torch.no_grad()
def greedy_with_logprobs(model: torch.nn.Module, prompt: list[int], max_tokens: int, eos_ids: set[int] = frozenset()) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens recomputed from scratch, and the log-softmax row each was chosen from."""
    sequence, rows = list(prompt), []
    for _ in range(max_tokens):
        row = torch.log_softmax(logits_from_scratch(model, sequence)[-1].float(), dim=-1)
        token = int(row.argmax())
        sequence.append(token)
        rows.append(row)
        if token in eos_ids:
            break
    return sequence[len(prompt) :], rows
