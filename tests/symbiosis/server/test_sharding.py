"""A sharded base: executors serving layer ranges; the client routes each op to its owner."""

from __future__ import annotations

import shutil

import pytest
from peft import LoraConfig

from symbiosis import BaseExecutor, load_model
from symbiosis.executor.sharding import layer_index, owned_ops, parse_layer_range
from symbiosis.server import ExecutorServer
from symbiosis.tiny import save_random_model, tiny_config
from symbiosis.transport import ShardedTransport

from ..equivalence import check_equivalence

RANGES = [(0, 1), (1, 3)]


def lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")


@pytest.fixture(scope="module")
def shards(model_dir):
    path = model_dir("llama", num_hidden_layers=3)
    return path, [BaseExecutor.from_pretrained(path, layers=r) for r in RANGES]


def ops_seen(executor: BaseExecutor) -> set[str]:
    return {op for op, _ in executor.stats.per_op()}


def check_routing(executors: list[BaseExecutor]) -> None:
    for executor, (start, end) in zip(executors, RANGES):
        seen = ops_seen(executor)
        assert seen, "a shard served nothing"
        for op in seen:
            index = layer_index(op)
            assert (index is None and op == "lm_head" and end == 3) or start <= index < end, f"{op} ran on shard {start}:{end}"
    assert "lm_head" in ops_seen(executors[-1])


def test_sharded_in_process_equals_monolithic(shards):
    path, executors = shards
    for executor in executors:
        executor.stats.reset()
    check_equivalence(path, lora(), executor=ShardedTransport(executors))
    check_routing(executors)


@pytest.mark.parametrize("placement", [{}, {"embeddings": "executor", "lm_head": "client"}])
def test_sharded_servers_equal_monolithic(shards, placement):
    path, executors = shards
    servers = [ExecutorServer(executor).start() for executor in executors]
    try:
        for executor in executors:
            executor.stats.reset()
        # the addresses in any order: the client sorts the shards by their layer ranges
        check_equivalence(path, lora(), executor=[servers[1].url, servers[0].url], **placement)
        if not placement:
            check_routing(executors)
        else:
            assert "model.embed_tokens" in ops_seen(executors[0]) and "lm_head" not in ops_seen(executors[1])
    finally:
        for server in servers:
            server.stop(1.0)


def test_shards_must_tile_the_model(model_dir):
    path = model_dir("llama", num_hidden_layers=3)
    make = lambda *ranges: [BaseExecutor.from_pretrained(path, layers=r) for r in ranges]  # noqa: E731
    with pytest.raises(ValueError, match="gap or overlap"):
        ShardedTransport(make((0, 1), (2, 3)))
    with pytest.raises(ValueError, match="gap or overlap"):
        ShardedTransport(make((0, 2), (1, 3)))
    with pytest.raises(ValueError, match="stop at layer 2; the model has 3"):
        ShardedTransport(make((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="must serve a layer range"):
        ShardedTransport([BaseExecutor.from_pretrained(path), *make((0, 3))])


def test_shards_of_different_bases_are_refused(model_dir, tmp_path):
    """Same config, other weights (another seed): refused in process and through servers. A copy of
    the checkpoint in another directory (as on another host) is the same base."""
    path = model_dir("llama", num_hidden_layers=3)
    copy = shutil.copytree(path, tmp_path / "copy")
    ShardedTransport([BaseExecutor.from_pretrained(path, layers=(0, 1)), BaseExecutor.from_pretrained(copy, layers=(1, 3))])
    other = save_random_model(tiny_config("llama", num_hidden_layers=3), tmp_path / "other", seed=1)
    first, second = BaseExecutor.from_pretrained(path, layers=(0, 1)), BaseExecutor.from_pretrained(other, layers=(1, 3))
    with pytest.raises(ValueError, match="different base weights"):
        ShardedTransport([first, second])
    servers = [ExecutorServer(executor).start() for executor in (first, second)]
    try:
        with pytest.raises(ValueError, match="different base weights"):
            load_model([server.url for server in servers])
    finally:
        for server in servers:
            server.stop(1.0)


def test_ownership_rule():
    ops = ["transformer.wte_proj", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.experts.7.w", "lm_head"]
    assert owned_ops(ops, (0, 1)) == {"transformer.wte_proj", "transformer.h.0.attn.c_attn"}
    assert owned_ops(ops, (1, 2)) == {"transformer.h.1.mlp.c_fc"}
    assert owned_ops(ops, (2, 3)) == {"transformer.h.2.mlp.experts.7.w", "lm_head"}
    with pytest.raises(ValueError, match="not within the model's 3 layers"):
        owned_ops(ops, (2, 4))
    assert parse_layer_range("0:12") == (0, 12)
    for bad in ("12", "a:b", "3-4"):
        with pytest.raises(ValueError):
            parse_layer_range(bad)


def test_client_dtype_is_independent_of_the_shards(shards):
    """float32 shards, a bfloat16 client (its norms, attention and KV cache in bfloat16): it runs and
    stays within bfloat16 precision of the monolithic float32 model. (A GPU executor with a CPU client
    is the same routing with other devices; no GPU was available to run it.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from symbiosis import load_model

    from ..equivalence import assert_close

    path, executors = shards
    client = load_model(ShardedTransport(executors), dtype="bfloat16")
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.no_grad():
        logits = client(input_ids=ids).logits
        reference = AutoModelForCausalLM.from_pretrained(path)(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    assert_close(logits.float(), reference, "bfloat16 client logits", rel_tol=5e-2)
    tokens = client.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert tokens.shape == (1, 9)
