"""The client model: placement options, dtypes, fusion, memory, training with Trainer and plain loops."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, OFTConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments

from symbiosis import BaseExecutor, load_model
from symbiosis.client import resident_bytes
from symbiosis.client.proxies import EmbeddingProxy, LinearProxy
from symbiosis.protocol import Direction
from symbiosis.tiny import save_random_model, tiny_config
from symbiosis.workload import AffineTask, train

from ..equivalence import assert_close, assert_gradients_close, build_pair, check_equivalence, trainable_grads

LORA = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear")


@pytest.fixture(scope="module")
def executor(model_dir):
    return BaseExecutor.from_pretrained(model_dir("llama"))


def test_client_is_a_genuine_transformers_causal_lm(executor):
    model = load_model(executor)
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(model, PreTrainedModel)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    proxies = [m for m in model.modules() if isinstance(m, LinearProxy)]
    assert len(proxies) == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert not isinstance(model.get_input_embeddings(), EmbeddingProxy)


def test_state_dict_holds_no_base_op_weights(executor):
    keys = load_model(executor).state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "lm_head.weight" not in keys
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gpt2"])
def test_embeddings_on_the_executor(model_dir, model_type):
    check_equivalence(model_dir(model_type), LORA, embeddings="executor")


def test_prompt_tuning_with_embeddings_on_the_executor(model_dir):
    check_equivalence(model_dir("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), embeddings="executor")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma"])
def test_lm_head_on_the_client(model_dir, model_type):
    """Tied (gpt2, gemma) and untied (llama) LM heads; tied ones share the local embedding table."""
    check_equivalence(model_dir(model_type), LORA, lm_head="client")
    model = load_model(BaseExecutor.from_pretrained(model_dir(model_type)), lm_head="client")
    assert not isinstance(model.get_output_embeddings(), LinearProxy)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_client_never_shares_storage_with_the_executor(executor):
    model = load_model(executor)
    norm = model.model.norm.weight
    original = executor.tensors(["model.norm.weight"])["model.norm.weight"].clone()
    with torch.no_grad():
        norm.mul_(3.0)
    assert torch.equal(executor.tensors(["model.norm.weight"])["model.norm.weight"], original)


def test_bfloat16_executor_serves_a_float32_client(model_dir):
    path = model_dir("llama")
    executor = BaseExecutor.from_pretrained(path, dtype="bfloat16")
    assert executor.dtype == torch.bfloat16
    client = load_model(executor, dtype="float32")
    mono = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    assert client.model.norm.weight.dtype == torch.float32
    # the executor rounds weights and inputs to bfloat16 (8 bits of mantissa): ~1e-2 relative
    assert_close(client(ids).logits, mono(ids).logits, "logits", rel_tol=5e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_split_matches_half_precision_monolithic(model_dir, dtype):
    path = model_dir("llama")
    client = load_model(BaseExecutor.from_pretrained(path, dtype=dtype))
    mono = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    out_client, out_mono = client(ids).logits, mono(ids).logits
    assert out_client.dtype == out_mono.dtype == getattr(torch, dtype)
    assert_close(out_client.float(), out_mono.float(), "logits", rel_tol=2e-2)


def test_model_to_another_dtype_keeps_working(executor):
    model = load_model(executor).to(torch.bfloat16)
    proj = model.model.layers[0].self_attn.q_proj
    assert proj.weight.dtype == torch.bfloat16
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


def test_fusion_switches_itself_off_when_members_get_different_inputs(model_dir):
    """OFT rotates each targeted layer's input: q/k/v no longer share one tensor, so fusion must stop."""
    path = model_dir("llama")
    check_equivalence(path, OFTConfig(task_type="CAUSAL_LM", r=0, oft_block_size=8, target_modules=["k_proj"]))
    executor = BaseExecutor.from_pretrained(path)
    model = get_peft_model(load_model(executor), OFTConfig(task_type="CAUSAL_LM", r=0, oft_block_size=8, target_modules=["k_proj"]))
    model(torch.tensor([[1, 2, 3]]))
    attention_groups = [g for g in _groups(model) if "q_proj" in g.fused.info.name]
    mlp_groups = [g for g in _groups(model) if "gate_proj" in g.fused.info.name]
    assert attention_groups and not any(g.enabled for g in attention_groups)
    assert mlp_groups and all(g.enabled for g in mlp_groups)


def _groups(model):
    return {m._group for m in model.modules() if isinstance(m, LinearProxy) and m._group is not None}


def test_fused_ops_halve_the_requests_of_a_forward_pass(model_dir):
    path = model_dir("llama")
    ids = torch.tensor([[1, 2, 3]])
    counts = {}
    for fuse in (True, False):
        executor = BaseExecutor.from_pretrained(path, fuse=fuse)
        load_model(executor)(ids)
        counts[fuse] = executor.stats.total()["requests"]
    assert counts[False] == 2 * 7 + 1
    assert counts[True] == 2 * 4 + 1  # qkv, o, gate+up, down per layer, and the LM head


def test_client_memory_excludes_the_base(tmp_path):
    """>= 8 layers: client-side frozen bytes, the token-embedding table aside, are <= 5% of the base."""
    config = tiny_config("llama", hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)
    path = save_random_model(config, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(path)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    client = load_model(BaseExecutor.from_pretrained(path))
    client_bytes = resident_bytes(client, exclude=(client.get_input_embeddings().weight,))
    assert client_bytes <= 0.05 * base_bytes, f"client holds {client_bytes} B of a {base_bytes} B base"
    assert client.num_parameters() == base.num_parameters()  # the phantoms report the real model
    assert resident_bytes(client) - client_bytes == client.get_input_embeddings().weight.nbytes


def test_transformers_trainer_fine_tunes_a_client(executor, tmp_path):
    model = get_peft_model(load_model(executor), LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
    sequences = AffineTask(256, 1, 1).sequences(64, 16, seed=0)
    dataset = [{"input_ids": s, "labels": s} for s in sequences]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_plain_loop_with_any_optimizer(executor):
    model = get_peft_model(load_model(executor), LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
    result = train(model, AffineTask(256, 1, 3), steps=20, lr=0.5, optimizer_factory=torch.optim.SGD)
    assert result.losses[-1] < result.losses[0]


def test_gradient_checkpointing_gives_the_monolithic_gradients(model_dir):
    """Recomputing the forward pass during backward changes no gradient (mono runs without checkpointing)."""
    mono, client, executor = build_pair(model_dir("llama"), LORA)
    client.gradient_checkpointing_enable()
    client.enable_input_require_grads()
    ids = torch.tensor([[4, 5, 6, 7], [9, 8, 7, 6]])
    mono.train()
    client.train()
    mono(input_ids=ids, labels=ids).loss.backward()
    loss = client(input_ids=ids, labels=ids).loss
    forward_requests = _forward_requests(executor)
    loss.backward()
    assert _forward_requests(executor) > forward_requests, "backward recomputed no forward pass"
    assert_gradients_close(trainable_grads(client), trainable_grads(mono))


def _forward_requests(executor: BaseExecutor) -> int:
    return sum(s.requests for (_, direction), s in executor.stats.per_op().items() if direction is Direction.FORWARD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("executor_device, client_device", [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")])
def test_executor_and_client_devices_are_independent(model_dir, executor_device, client_device):
    path = model_dir("llama")
    client = load_model(BaseExecutor.from_pretrained(path, device=executor_device), device=client_device)
    mono = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 9, 13, 2, 7, 11]])
    logits = client(ids.to(client_device)).logits
    assert logits.device.type == client_device
    assert_close(logits.cpu(), mono(ids).logits, "logits", rel_tol=1e-4)
