"""Several plain LoRA groups on one module in one pair of products (``adapters/lora.py``): each
group's rows get exactly its own adapter's update, rows between the groups are left untouched."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from symbiosis.serving.adapters.lora import LoraStack, plain_lora


def _lora(rank: int, alpha: int, seed: int) -> LoraLinear:
    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"]), nn.ModuleDict({"proj": nn.Linear(24, 40, bias=False)}))
    layer = model["proj"]
    assert isinstance(layer, LoraLinear)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.5)  # PEFT starts B at zero: no update to see
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_with_rows_of_others_between_them(dtype):
    layers = [_lora(4, 8, 0), _lora(8, 32, 1), _lora(2, 2, 2)]
    weights = [plain_lora(layer) for layer in layers]
    # rows 0-1 adapter 0, 2 someone else's, 3-5 adapter 1, 6-7 someone else's, 8 adapter 2, 9 after the last group
    groups = [(weights[0], slice(0, 2)), (weights[1], slice(3, 6)), (weights[2], slice(8, 9))]
    x = torch.randn(1, 10, 24)
    y = torch.randn(1, 10, 40).to(dtype)
    expected = y.clone()
    for layer, (_, rows) in zip(layers, groups):
        with torch.no_grad():
            delta = layer.lora_B["default"](layer.lora_A["default"](x[0, rows])) * layer.scaling["default"]
        expected[0, rows] += delta.to(dtype)
    masks: dict = {}
    with torch.no_grad():
        LoraStack().add_to(y, x, groups, masks)
    assert len(masks) == 1
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2
    for _, rows in groups:
        torch.testing.assert_close(y[0, rows].float(), expected[0, rows].float(), rtol=tolerance, atol=tolerance)
    others = [2, 6, 7, 9]
    assert torch.equal(y[0, others], expected[0, others])


def test_one_mask_per_layout_serves_every_module_of_a_step():
    first, second = [plain_lora(_lora(4, 8, seed)) for seed in (0, 1)]
    groups = [(first, slice(0, 1)), (second, slice(1, 3))]
    masks: dict = {}
    for _ in range(3):  # three modules with the same adapters' ranks and scalings
        with torch.no_grad():
                LoraStack().add_to(torch.zeros(1, 3, 40), torch.randn(1, 3, 24), groups, masks)
    (mask,) = masks.values()
    assert mask.tolist() == [[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4, [0.0] * 4 + [2.0] * 4]
