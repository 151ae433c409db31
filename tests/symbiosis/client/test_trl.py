"""TRL's trainers on a client equal them on the monolithic model: loss curve and saved adapter.

Each trainer runs with TRL's defaults for a CPU user (bfloat16 autocast, gradient checkpointing,
AdamW, the fused chunked LM head that multiplies slices of ``lm_head.weight`` itself) on a tiny Llama
with a real tokenizer; only the model differs: ``load_model(executor)`` (LM head on the executor,
the default) or ``AutoModelForCausalLM.from_pretrained``. The PEFT config goes to the trainer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from symbiosis import BaseExecutor, load_model
from symbiosis.tiny import save_tiny_model_with_tokenizer

from ..equivalence import assert_close

trl = pytest.importorskip("trl")

STEPS = 3
COMMON = dict(
    max_steps=STEPS, learning_rate=5e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("trl") / "llama")


@pytest.fixture(scope="module")
def executor(base) -> BaseExecutor:
    return BaseExecutor.from_pretrained(base)


def lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")


def run(make_trainer, model, out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train; return the logged losses and the adapter as saved (standard PEFT format)."""
    torch.manual_seed(0)
    trainer = make_trainer(model, out)
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_training(make_trainer, base: Path, executor: BaseExecutor, tmp_path: Path) -> None:
    mono_losses, mono_adapter = run(make_trainer, AutoModelForCausalLM.from_pretrained(base), tmp_path / "mono")
    split_losses, split_adapter = run(make_trainer, load_model(executor), tmp_path / "split")
    assert len(mono_losses) == STEPS
    assert_close(torch.tensor(split_losses), torch.tensor(mono_losses), "loss curve")
    assert split_adapter.keys() == mono_adapter.keys()
    for name, tensor in mono_adapter.items():
        assert_close(split_adapter[name], tensor, name)
    assert all(tensor.abs().sum() > 0 for name, tensor in mono_adapter.items() if "lora_B" in name)  # trained (B starts at 0)


OFFLINE = {
    "sft": ("SFTConfig", "SFTTrainer", lambda: [{"text": f"The number {i} follows {i - 1} and comes before {i + 1}."} for i in range(12)]),
    "dpo": ("DPOConfig", "DPOTrainer", lambda: [
        {"prompt": f"Count on from {i}:", "chosen": f" {i + 1} {i + 2} {i + 3}", "rejected": f" {i - 1} {i}"} for i in range(8)
    ]),
    "kto": ("KTOConfig", "KTOTrainer", lambda: [
        {"prompt": f"Count on from {i}:", "completion": f" {i + 1} {i + 2}" if i % 2 else f" {i - 1}", "label": bool(i % 2)} for i in range(8)
    ]),
}


@pytest.mark.parametrize("kind", sorted(OFFLINE))
def test_offline_trainers(base, executor, tmp_path, kind):
    """SFT; DPO and KTO (their reference model is the client with its adapter disabled, as TRL does for PEFT models)."""
    config_class, trainer_class, rows = OFFLINE[kind]
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = Dataset.from_list(rows())

    def make(model, out):
        args = getattr(trl, config_class)(output_dir=str(out), per_device_train_batch_size=4, max_length=64, **COMMON)
        return getattr(trl, trainer_class)(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora())

    assert_same_training(make, base, executor, tmp_path)


@pytest.mark.parametrize("kind", ["GRPO", "RLOO"])
def test_online_rl_generates_and_learns_from_a_reward(base, executor, tmp_path, kind):
    """Online RL: completions sampled with ``generate()`` on the client, scored by a reward function."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = Dataset.from_list([{"prompt": f"Say a word about {topic}:"} for topic in ("cats", "rain", "maps", "tea")])

    def shortness(completions: list[str], **_) -> list[float]:
        return [-float(len(text)) for text in completions]

    def make(model, out):
        args = getattr(trl, f"{kind}Config")(
            output_dir=str(out), per_device_train_batch_size=4, num_generations=4, max_completion_length=8, beta=0.04, **COMMON
        )
        return getattr(trl, f"{kind}Trainer")(
            model=model, reward_funcs=shortness, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora()
        )

    assert_same_training(make, base, executor, tmp_path)


def test_example_script_trains_on_chat_data(base, tmp_path):
    """``examples/symbiosis/trl_sft.py`` as README shows it: TRL reads the chat JSONL itself."""
    import importlib.util

    from peft import PeftModel

    script = Path(__file__).resolve().parents[3] / "examples" / "symbiosis" / "trl_sft.py"
    spec = importlib.util.spec_from_file_location("trl_sft_example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = script.parent / "data" / "chat.jsonl"
    out = example.main(["--model", str(base), "--data", str(data), "--output", str(tmp_path / "adapter"), "--steps", "2"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)  # standard PEFT on the monolithic model
    assert model.peft_config["default"].peft_type.value == "LORA"
