"""One executor, six concurrent clients: four fine-tune with different PEFT methods, two generate.

Every fine-tuning loss falls; every client's result equals what it gets alone (within the
tolerance batching allows: the same rows in a bigger GEMM may round differently); AdaLoRA's rank
allocation runs as PEFT prescribes and ends at its target budget; and the batch statistics show
forward and backward GEMMs that served rows of several clients at once.

The solo runs use an executor that never waits; the concurrent runs use a second executor of the
same weights that waits up to 2 ms for a batch to fill. On a tiny model a GEMM takes microseconds,
so without that wait clients meet in a GEMM only by accident (about 0.1% of GEMMs here, and some
runs none at all); with it, 4-9% of them (6-9% on an idle machine, 4-7% with both cores busy).
"""

from __future__ import annotations

import threading

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model

from symbiosis import BaseExecutor, load_model
from symbiosis.cli.demo import adalora_optimizer
from symbiosis.workload import AffineTask, generate, train

from .equivalence import perturb_adapters

VOCAB = 256
STEPS = 25
ADALORA_MODULES = 4 * 3  # target modules per layer x layers
FINETUNE = {
    "lora": (lambda: LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"), AffineTask(VOCAB, 1, 1), 1e-2),
    "ia3": (lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), AffineTask(VOCAB, 1, 2), 0.3),
    "adalora": (
        lambda: AdaLoraConfig(task_type="CAUSAL_LM", init_r=8, target_r=4, total_step=STEPS, tinit=5, tfinal=5, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        AffineTask(VOCAB, 1, 3),
        1e-2,
    ),
    "prefix": (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8), AffineTask(VOCAB, 1, 4), 0.1),
}
GENERATE = {
    "gen_lora": (lambda: LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]), AffineTask(VOCAB, 1, 5)),
    "gen_ia3": (lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), AffineTask(VOCAB, 1, 6)),
}


def make_client(executor: BaseExecutor, peft_factory, name: str):
    torch.manual_seed(sum(map(ord, name)))
    model = get_peft_model(load_model(executor, client_id=name), peft_factory())
    if name.startswith("gen"):
        perturb_adapters(model, seed=len(name))
    return model


def make_clients(executor: BaseExecutor) -> dict:
    """Every client, built one after another (adapter init draws from the global RNG)."""
    return {name: make_client(executor, spec[0], name) for name, spec in {**FINETUNE, **GENERATE}.items()}


def run_job(model, name: str) -> object:
    if name in FINETUNE:
        _, task, lr = FINETUNE[name]
        optimizer = adalora_optimizer(model) if name == "adalora" else torch.optim.AdamW
        return train(model, task, steps=STEPS, lr=lr, seed=1, optimizer_factory=optimizer)
    _, task = GENERATE[name]
    return generate(model, task, requests=6, seed=2)


@pytest.fixture(scope="module")
def executor(model_dir):
    return BaseExecutor.from_pretrained(model_dir("llama", num_hidden_layers=3))


@pytest.fixture(scope="module")
def solo_results(executor):
    return {name: run_job(model, name) for name, model in make_clients(executor).items()}


@pytest.fixture(scope="module")
def batching_executor(model_dir):
    return BaseExecutor.from_pretrained(model_dir("llama", num_hidden_layers=3), max_wait_s=0.002)


@pytest.fixture(scope="module")
def concurrent_clients(batching_executor, solo_results):
    return make_clients(batching_executor)


@pytest.fixture(scope="module")
def concurrent_results(batching_executor, concurrent_clients):
    batching_executor.stats.reset()
    results, errors = {}, []
    clients = concurrent_clients
    barrier = threading.Barrier(len(clients))

    def worker(name: str) -> None:
        try:
            barrier.wait()
            results[name] = run_job(clients[name], name)
        except BaseException as exc:  # surfaced below, in the test thread
            errors.append((name, exc))

    threads = [threading.Thread(target=worker, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_each_finetuning_loss_falls(concurrent_results, name):
    losses = concurrent_results[name].losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.15, f"{name}: loss {first:.3f} -> {last:.3f} (nats)"


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetuning_equals_solo_run(solo_results, concurrent_results, name):
    solo, together = solo_results[name].losses, concurrent_results[name].losses
    worst = max(abs(a - b) / abs(b) for a, b in zip(together, solo, strict=True))
    assert worst <= 1e-4, f"{name}: losses differ by up to {worst:.2e} relative"


@pytest.mark.parametrize("name", sorted(GENERATE))
def test_generation_equals_solo_run(solo_results, concurrent_results, name):
    for together, solo in zip(concurrent_results[name], solo_results[name], strict=True):
        assert torch.equal(together, solo)


def test_adalora_allocated_its_target_rank_budget(concurrent_clients, concurrent_results):
    model = concurrent_clients["adalora"]
    rank_pattern = model.peft_config["default"].rank_pattern
    assert rank_pattern is not None and len(rank_pattern) == ADALORA_MODULES
    kept = sum(sum(mask) for mask in rank_pattern.values())
    assert kept == 4 * ADALORA_MODULES  # target_r per module on average, from init_r = 8
    singular_values = [p for n, p in model.named_parameters() if "lora_E" in n]
    assert sum(int(e.count_nonzero()) for e in singular_values) == kept  # the pruned ranks are masked


def test_gemms_were_shared_across_clients(batching_executor, concurrent_results):
    total = batching_executor.stats.total()
    assert total["shared_gemm_fraction"] > 0, total
    assert total["clients_per_gemm"] > 1.0, total
    shared = {d.name for (op, d), s in batching_executor.stats.by_family().items() if s["shared_gemm_fraction"] > 0}
    assert shared == {"FORWARD", "BACKWARD"}, f"only {shared} GEMMs batched rows from two clients"
