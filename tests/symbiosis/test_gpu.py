"""GPU placements: the executor and the clients on a CUDA device, in-process, through servers, sharded.

Skipped without CUDA. The monolithic reference runs on the CPU in float32; float32 GEMMs on the GPU
round differently (and differently per batch shape), so comparisons allow ``GPU_REL_TOL`` = 1e-4 of
each tensor's scale instead of the CPU suite's 1e-5. Greedy tokens must still be identical.
"""

from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from symbiosis import BaseExecutor, load_model
from symbiosis.protocol import Direction
from symbiosis.server import ExecutorServer

from .equivalence import assert_close, check_equivalence, perturb_adapters
from .test_equivalence_architectures import REQUIRED
from .test_equivalence_peft import METHODS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_REL_TOL = 1e-4


def lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")


@pytest.mark.parametrize("model_type", REQUIRED)
def test_architectures_with_the_executor_on_the_gpu(model_dir, model_type):
    path = model_dir(model_type)
    executor = BaseExecutor.from_pretrained(path, device="cuda")
    errors = check_equivalence(path, lora(), executor=executor, rel_tol=GPU_REL_TOL)
    assert errors["grads"] <= GPU_REL_TOL


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_methods_with_client_and_executor_on_the_gpu(model_dir, method):
    """The reference is on the GPU too: PEFT moves adapters to the base layer's device, and that move
    makes AdaLoRA's ``ranknum`` a trainable parameter (PEFT 0.21) — on both models alike."""
    path = model_dir("llama")
    executor = BaseExecutor.from_pretrained(path, device="cuda")
    check_equivalence(path, METHODS[method](), executor=executor, device="cuda", reference_device="cuda", rel_tol=GPU_REL_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast(model_dir, dtype):
    """Under CUDA autocast the executor computes every op in the autocast dtype, as the monolithic model
    does: client, executor and reference on the GPU, within the GPU bound."""
    path = model_dir("qwen2")
    executor = BaseExecutor.from_pretrained(path, device="cuda")
    check_equivalence(path, lora(), executor=executor, device="cuda", reference_device="cuda", rel_tol=GPU_REL_TOL, autocast=dtype)


def test_bfloat16_split_is_as_accurate_as_bfloat16_monolithic(model_dir):
    """Against a float32 reference, the bf16 split model errs no more than the bf16 monolithic model (x2)."""
    path = model_dir("llama")
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    reference = AutoModelForCausalLM.from_pretrained(path)(ids).logits
    mono = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    split = load_model(BaseExecutor.from_pretrained(path, device="cuda", dtype="bfloat16"), device="cuda", dtype="bfloat16")
    with torch.no_grad():
        mono_logits = mono(ids.cuda()).logits.float().cpu()
        split_logits = split(ids.cuda()).logits
    assert split_logits.dtype == torch.bfloat16 and split_logits.device.type == "cuda"
    scale = reference.abs().max().item()
    mono_error = (mono_logits - reference).abs().max().item() / scale
    split_error = (split_logits.float().cpu() - reference).abs().max().item() / scale
    assert 0 < mono_error < 0.05, f"bf16 monolithic error {mono_error:.3g}: the comparison is meaningless"
    assert split_error <= 2 * mono_error, f"bf16 split error {split_error:.3g} > 2 x monolithic {mono_error:.3g}"


@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc", "shm"])
def test_server_on_the_gpu_client_on_the_cpu(model_dir, shared_memory):
    path = model_dir("llama")
    server = ExecutorServer(BaseExecutor.from_pretrained(path, device="cuda")).start()
    try:
        errors = check_equivalence(
            path, lora(), executor=server.url, connect_options={"shared_memory": shared_memory}, rel_tol=GPU_REL_TOL
        )
        assert errors["grads"] <= GPU_REL_TOL
    finally:
        server.stop(1.0)


def test_sharded_servers_on_the_gpu(model_dir):
    path = model_dir("llama", num_hidden_layers=3)
    executors = [BaseExecutor.from_pretrained(path, device="cuda", layers=r) for r in [(0, 1), (1, 3)]]
    servers = [ExecutorServer(executor).start() for executor in executors]
    try:
        check_equivalence(path, lora(), executor=[s.url for s in servers], rel_tol=GPU_REL_TOL)
        assert all(executor.stats.per_op() for executor in executors), "a shard served nothing"
    finally:
        for server in servers:
            server.stop(1.0)


def test_long_context_kv_cache_on_the_cpu_executor_on_the_gpu(model_dir):
    """The heterogeneous placement of the mission: base GEMMs on the GPU, a 2048-token KV cache in CPU memory."""
    path = model_dir("llama")
    executor = BaseExecutor.from_pretrained(path, device="cuda")
    client = load_model(executor, device="cpu").eval()
    mono = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = torch.randint(3, 256, (1, 2048), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt), return_dict_in_generate=True)
    with torch.no_grad():
        out_mono = mono.generate(prompt, **kwargs)
        out_split = client.generate(prompt, **kwargs)
    assert torch.equal(out_split.sequences, out_mono.sequences)
    keys = out_split.past_key_values.layers[0].keys
    assert keys.device.type == "cpu" and keys.shape[-2] >= 2048, "the KV cache is not the client's, on the CPU"
    rows = sum(s.rows for (_, d), s in executor.stats.per_op().items() if d is Direction.FORWARD)
    assert rows >= 2048, "the prompt's GEMMs did not run on the executor"


def test_concurrent_clients_batch_on_the_gpu(model_dir):
    """Fine-tuning and generating threads share one GPU executor; their GEMMs meet; each result is its own."""
    path = model_dir("llama")
    executor = BaseExecutor.from_pretrained(path, device="cuda")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(9))

    def trainer() -> torch.nn.Module:
        torch.manual_seed(0)
        model = get_peft_model(load_model(executor, device="cuda"), lora())
        perturb_adapters(model)
        return model

    solo = trainer()
    solo(input_ids=ids.cuda(), labels=ids.cuda()).loss.backward()
    expected = {n: p.grad.cpu() for n, p in solo.named_parameters() if p.requires_grad}
    executor.stats.reset()

    models = [trainer() for _ in range(4)]
    generator = load_model(executor, device="cuda").eval()
    barrier = threading.Barrier(len(models) + 1)
    errors: list[BaseException] = []

    def train(model: torch.nn.Module) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                model.zero_grad()
                model(input_ids=ids.cuda(), labels=ids.cuda()).loss.backward()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def generate() -> None:
        try:
            barrier.wait()
            generator.generate(ids[:1, :4].cuda(), max_new_tokens=16, do_sample=False)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=train, args=(m,)) for m in models] + [threading.Thread(target=generate)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for model in models:
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert_close(param.grad.cpu(), expected[name], f"grad {name}", GPU_REL_TOL, scale=expected[name].abs().max().item() or 1.0)
    assert sum(s.shared_gemms for s in executor.stats.per_op().values()) > 0, "no GEMM served several clients"
