"""The benchmark helpers that turn raw reports into numbers, and the vLLM adapters' writer."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from bench import common
from bench.multi_adapter_decode import save_lora_adapters
from bench.workers import common_window, tokens_in_window


def report(start: float, ends: list[float], tokens: int = 100) -> dict:
    return {"start": start, "step_ends": ends, "tokens_per_step": tokens}


def test_common_window_spans_from_the_last_start_to_the_first_last_step() -> None:
    reports = [report(0.0, [2.0, 4.0, 6.0]), report(0.5, [3.0, 5.0])]
    assert common_window(reports) == (0.5, 5.0)


def test_common_window_refuses_jobs_that_never_ran_together() -> None:
    with pytest.raises(ValueError, match="no interval in which every job was running"):
        common_window([report(0.0, [1.0]), report(2.0, [3.0])])


def test_tokens_in_window_interpolates_within_a_step() -> None:
    r = report(0.0, [2.0, 4.0])
    assert tokens_in_window(r, 1.0, 3.0) == pytest.approx(100.0)
    assert tokens_in_window(r, 0.0, 4.0) == pytest.approx(200.0)


def test_vllm_adapters_are_distinct_peft_lora_adapters(tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir = common.model_dir(argparse.Namespace(model_dir=None, smoke=True))
    dirs = save_lora_adapters(model_dir, 3, tmp_path)
    weights = [load_file(Path(d) / "adapter_model.safetensors") for d in dirs]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    a_keys = [k for k in weights[0] if "lora_A" in k]
    assert a_keys and all(not torch.equal(weights[i][k], weights[j][k]) for k in a_keys for i, j in ((0, 1), (1, 2), (0, 2)))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), dirs[2])
    state = {k: v for k, v in loaded.state_dict().items() if "lora_A" in k}
    assert len(state) == len(a_keys) and all(torch.equal(v, weights[2][k.replace(".default", "")]) for k, v in state.items())
