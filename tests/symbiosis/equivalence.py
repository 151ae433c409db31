"""The correctness contract: a split client must equal the monolithic transformers + PEFT model.

Both models are loaded from the same directory; the client's adapters are initialised like the
monolithic model's and then both are given the same randomly perturbed adapter weights (so that
no adapter is an identity and every gradient is non-trivial).

Bound: for every compared tensor, ``max|split - mono| <= REL_TOL * max|mono|`` (relative to the
tensor's scale). Greedy generation must give identical tokens.

With ``quantization`` the executor holds the base quantized by bitsandbytes and the reference is a
QLoRA user's model: loaded with the same ``BitsAndBytesConfig``, then ``prepare_model_for_kbit_training``
(see ``monolithic``).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model
from transformers import AutoModelForCausalLM

from symbiosis import BaseExecutor, load_model

REL_TOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel_tol: float = REL_TOL, scale: float | None = None) -> float:
    """Assert ``max|actual - expected| <= rel_tol * scale``; return the relative error.

    ``scale`` defaults to ``max|expected|``, which must then be positive.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if scale is None:
        scale = expected.detach().abs().max().item()
    error = (actual.detach().to(expected.device) - expected.detach()).abs().max().item()
    assert scale > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    assert error <= rel_tol * scale, f"{what}: max error {error:.3g} > {rel_tol:g} x scale {scale:.3g}"
    return error / scale


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """The gradient of every trainable parameter, by name."""
    return {name: param.grad for name, param in model.named_parameters() if param.requires_grad}


def assert_gradients_close(
    actual: dict[str, torch.Tensor | None], expected: dict[str, torch.Tensor | None], rel_tol: float = REL_TOL
) -> float:
    """Assert every gradient of ``actual`` matches ``expected`` (by name); return the worst relative error.

    A tensor whose reference gradient is all zero must be zero in ``actual`` too, within ``REL_TOL``
    times the largest reference gradient of all.
    """
    assert actual.keys() == expected.keys(), f"trainable parameters differ: {sorted(actual.keys() ^ expected.keys())[:5]}"
    for name in expected:
        assert expected[name] is not None, f"{name}: no reference gradient"
        assert actual[name] is not None, f"{name}: no gradient"
    overall = max(grad.abs().max().item() for grad in expected.values())
    assert overall > 0, "every reference gradient is zero"
    worst = 0.0
    for name, grad in expected.items():
        own_scale = grad.abs().max().item()
        worst = max(worst, assert_close(actual[name], grad, f"grad {name}", rel_tol, scale=own_scale or overall))
    return worst


def perturb_adapters(model: torch.nn.Module, seed: int = 1234) -> None:
    """Add seeded noise to every trainable parameter (identity-initialised adapters become non-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(0.05 * noise.to(param.device, param.dtype))


def copy_trainable(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every trainable parameter of ``source`` to the same-named one of ``target``."""
    src = {n: p for n, p in source.named_parameters() if p.requires_grad}
    dst = {n: p for n, p in target.named_parameters() if p.requires_grad}
    assert src.keys() == dst.keys(), f"trainable parameters differ: {sorted(src.keys() ^ dst.keys())[:5]}"
    with torch.no_grad():
        for name, param in src.items():
            dst[name].copy_(param)


def monolithic(path: Path, device: str = "cpu", quantization: str | None = None, dtype: str = "float32") -> torch.nn.Module:
    """The reference model: transformers' own, or for ``quantization`` the QLoRA recipe on it.

    A quantized reference is loaded with the executor's ``BitsAndBytesConfig`` (same quantized bits)
    and prepared with ``prepare_model_for_kbit_training``; its products are bitsandbytes' training
    products (dequantise, then GEMM), also in eval mode: bitsandbytes' inference-only paths compute
    otherwise (the AVX512-BF16 CPU 4-bit kernel rounds activations to bfloat16; int8 inference
    quantises activations too) and the executor computes every product one way.
    """
    if quantization is None:
        return AutoModelForCausalLM.from_pretrained(path).to(device)
    from peft import prepare_model_for_kbit_training

    from symbiosis.executor.quantized import is_quantized_linear, quantization_config

    torch_dtype = getattr(torch, dtype)
    mono = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device,
                                                quantization_config=quantization_config(quantization, torch_dtype))
    for module in mono.modules():
        if is_quantized_linear(module) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(mono, use_gradient_checkpointing=False)


def eval_mode(model: torch.nn.Module) -> None:
    """``model.eval()``, with bitsandbytes int8 layers kept on their training product (see ``monolithic``)."""
    from symbiosis.executor.quantized import is_quantized_linear

    model.eval()
    for module in model.modules():
        if is_quantized_linear(module) and not hasattr(module.weight, "quant_state"):
            module.train()


def build_pair(
    path: Path,
    peft_config: PeftConfig | None,
    executor: BaseExecutor | None = None,
    reference_device: str = "cpu",
    quantization: str | None = None,
    dtype: str = "float32",
    **client_options,
):
    """(monolithic model on ``reference_device``, split client, executor), with identical adapters when ``peft_config`` is given.

    ``quantization`` / ``dtype``: how the executor (when not given) and the reference load the base.
    """
    executor = executor or BaseExecutor.from_pretrained(path, quantization=quantization, dtype=dtype)
    mono = monolithic(path, reference_device, quantization, dtype)
    client = load_model(executor, **client_options)
    if peft_config is not None:
        torch.manual_seed(0)
        mono = get_peft_model(mono, copy.deepcopy(peft_config))
        torch.manual_seed(0)
        client = get_peft_model(client, copy.deepcopy(peft_config))
        perturb_adapters(mono)
        copy_trainable(mono, client)
    return mono, client, executor


def check_equivalence(
    path: Path,
    peft_config: PeftConfig | None = None,
    *,
    generate: bool = True,
    vocab: int = 256,
    rel_tol: float = REL_TOL,
    reference_device: str = "cpu",
    autocast: torch.dtype | None = None,
    executor: object | None = None,
    quantization: str | None = None,
    dtype: str = "float32",
    **client_options,
) -> dict[str, float]:
    """Compare logits, loss, adapter gradients and greedy tokens; return the worst relative errors.

    The monolithic reference runs on ``reference_device``; the client on ``client_options["device"]``
    (both default to the CPU). With ``autocast``, both run every forward pass and generation under
    ``torch.autocast`` in that dtype (backward passes outside it, as recommended). ``quantization`` /
    ``dtype``: see ``build_pair``.
    """
    mono, client, _ = build_pair(
        path, peft_config, executor=executor, reference_device=reference_device, quantization=quantization, dtype=dtype, **client_options
    )
    device = client_options.get("device", "cpu")
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (2, 9), generator=generator).to(reference_device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row exercises the attention mask
    errors = {}
    for model in (mono, client):
        model.train()

    def autocasting(device_type: str):
        return torch.autocast(device_type, dtype=autocast) if autocast is not None else nullcontext()

    with autocasting(torch.device(reference_device).type):
        out_mono = mono(input_ids=ids, attention_mask=mask, labels=ids)
    with autocasting(torch.device(device).type):
        out_client = client(input_ids=ids.to(device), attention_mask=mask.to(device), labels=ids.to(device))
    if autocast is not None:
        assert out_client.logits.dtype == out_mono.logits.dtype == autocast, "autocast was not in effect"
    errors["logits"] = assert_close(out_client.logits, out_mono.logits, "logits", rel_tol)
    errors["loss"] = assert_close(out_client.loss, out_mono.loss, "loss", rel_tol)
    if peft_config is not None:
        out_mono.loss.backward()
        out_client.loss.backward()
        errors["grads"] = assert_gradients_close(trainable_grads(client), trainable_grads(mono), rel_tol)
    if generate:
        for model in (mono, client):
            eval_mode(model)
        prompt = ids[:, :4]
        with autocasting(torch.device(reference_device).type):
            tokens_mono = mono.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        with autocasting(torch.device(device).type):
            tokens_client = client.generate(
                input_ids=prompt.to(device), attention_mask=torch.ones_like(prompt).to(device), max_new_tokens=6, do_sample=False
            ).cpu()
        assert torch.equal(tokens_client, tokens_mono.cpu()), f"greedy tokens differ:\n{tokens_client}\n{tokens_mono}"
    return errors
