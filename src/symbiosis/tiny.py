"""Tiny random-weight models built from transformers configs, for tests, demos and benchmarks.

Nothing is downloaded: a config is built locally, the model is initialised from a seed and saved
with ``save_pretrained`` so that every consumer goes through transformers' real loading path.
``save_tiny_model_with_tokenizer`` also trains a real byte-level BPE tokenizer (with a chat
template) on a small corpus shipped with the package and saves it beside the model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

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


#: Special tokens of the tiny tokenizer, in id order (``<|pad|>`` is id 0).
TINY_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")

#: A ChatML-style template; every rendering of a conversation prefix is a prefix of the full rendering.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_corpus() -> str:
    """The small English corpus shipped with the package (text written for this project)."""
    return resources.files("symbiosis.data").joinpath("corpus.txt").read_text(encoding="utf-8")


def train_tiny_tokenizer(*, vocab_size: int = 512, corpus: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` (default: ``tiny_corpus()``); deterministic.

    It adds ``<|bos|>`` in front of every text like Llama's tokenizer, ends texts with ``<|eos|>``
    and carries ``TINY_CHAT_TEMPLATE``; any byte string can be encoded (byte fallback).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((corpus if corpus is not None else tiny_corpus()).splitlines(), trainer)
    bos = "<|bos|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=TINY_CHAT_TEMPLATE,
    )


def save_tiny_model_with_tokenizer(
    path: str | Path, model_type: str = "llama", *, seed: int = 0, vocab_size: int = 512, **overrides: Any
) -> Path:
    """A tiny random ``model_type`` model saved to ``path`` with a trained tokenizer and chat template.

    The model's vocabulary matches the tokenizer; its generation config stops at ``<|eos|>`` and at
    the end-of-turn token ``<|im_end|>``. Context length defaults to 512 tokens.
    """
    tokenizer = train_tiny_tokenizer(vocab_size=vocab_size)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("pad", "<|pad|>"), ("bos", "<|bos|>"), ("eos", "<|eos|>"))}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = tiny_config(
        model_type,
        **{
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 512,
            "pad_token_id": ids["pad"],
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            **overrides,
        },
    )
    path = save_random_model(config, path, seed=seed)
    GenerationConfig(bos_token_id=ids["bos"], eos_token_id=[ids["eos"], end_of_turn], pad_token_id=ids["pad"]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
