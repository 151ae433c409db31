"""Tiny random-weight models built from transformers configs, for tests, demos and benchmarks.

Nothing is downloaded: a config is built locally, the model is initialised from a seed and saved
with ``save_pretrained`` so that every consumer goes through transformers' real loading path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig

#: Sizes shared by every tiny config; dropout off so that split and monolithic runs are comparable.
TINY_SIZES: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    ffn_dim=128,
)


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A small config of ``model_type`` (a transformers model type such as ``"llama"``, ``"gpt2"``)."""
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model type {model_type!r}")
    config_class = CONFIG_MAPPING[model_type]
    known = set(vars(config_class())) | set(config_class.attribute_map)
    sizes = {key: value for key, value in TINY_SIZES.items() if key in known}
    config = config_class(**{**sizes, **overrides})
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= config.vocab_size:
            setattr(config, name, config.vocab_size - 1)
    for name, value in config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    return config


def llama_config(*, hidden_size: int, num_hidden_layers: int, vocab_size: int = 32000, **overrides: Any) -> PretrainedConfig:
    """A Llama-style config with the usual proportions (head dim 64, MLP ~2.7x, GQA 4:1)."""
    heads = max(hidden_size // 64, 1)
    return tiny_config(
        "llama",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 8 / 3) // 64 * 64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        head_dim=hidden_size // heads,
        max_position_embeddings=4096,
        **overrides,
    )


def save_random_model(config: PretrainedConfig, path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Initialise a causal LM from ``config`` with ``seed`` and ``save_pretrained`` it to ``path``."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    return path
