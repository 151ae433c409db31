"""PEFT features that need the base weights fail loudly on a client, never silently wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from symbiosis import BaseExecutor, BaseWeightAccessError, load_model
from symbiosis.client import PhantomWeight

from ..equivalence import check_equivalence


@pytest.fixture(scope="module")
def executor(model_dir):
    return BaseExecutor.from_pretrained(model_dir("llama"))


def test_proxy_weight_reports_metadata_but_holds_no_data(executor):
    proj = load_model(executor).model.layers[0].mlp.down_proj
    assert isinstance(proj, torch.nn.Linear)
    assert isinstance(proj.weight, PhantomWeight)
    assert proj.weight.shape == (64, 128) and proj.weight.dtype == torch.float32 and proj.weight.device.type == "cpu"
    with pytest.raises(BaseWeightAccessError, match="lives only on the executor"):
        proj.weight.sum()


def test_dora_fails_with_the_reason(executor):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(BaseWeightAccessError, match="DoRA"):
        get_peft_model(load_model(executor), config)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_based_init_fails_with_the_reason(executor, init):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], init_lora_weights=init)
    with pytest.raises(BaseWeightAccessError, match="PiSSA, OLoRA"):
        get_peft_model(load_model(executor), config)


def test_merging_fails_with_the_reason(executor):
    model = get_peft_model(load_model(executor), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(BaseWeightAccessError, match="merge"):
        model.merge_and_unload()
    # the failed merge left the adapter intact and the model working
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_modules_to_save_on_an_executor_op_fails_with_the_reason(executor):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(BaseWeightAccessError, match="lm_head='client'"):
        get_peft_model(load_model(executor), config)


def test_modules_to_save_works_with_the_lm_head_on_the_client(model_dir):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    check_equivalence(model_dir("llama"), config, lm_head="client")


def test_deepcopy_of_a_client_model_fails_with_the_reason(executor):
    with pytest.raises(BaseWeightAccessError, match="lives on the executor"):
        copy.deepcopy(load_model(executor))


def test_saving_a_whole_client_fails_but_adapters_save(executor, tmp_path):
    client = load_model(executor)
    with pytest.raises(BaseWeightAccessError, match="save the adapter"):
        client.save_pretrained(tmp_path / "full")
    model = get_peft_model(client, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
