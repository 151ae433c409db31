"""``RowDispatch`` entries: a plain IA3 layer is applied as its vector's product, bit for bit what
PEFT's own layer computes, on either side; anything else goes through the layer."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, inject_adapter_in_model
from torch import nn

from symbiosis.serving.adapters.layer import RowDispatch, Side


def _adapted(config) -> tuple[nn.Linear, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = inject_adapter_in_model(config, nn.ModuleDict({"proj": base}))["proj"]
    for parameter in layer.parameters():
        nn.init.normal_(parameter)  # IA3 starts at ones: no scaling to see
    return base, layer


@pytest.mark.parametrize("feedforward", [False, True])
def test_plain_ia3_is_its_vector_product_on_its_side(feedforward):
    base, layer = _adapted(IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else []))
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = layer(x)
    dispatch = RowDispatch(base)
    side = dispatch.attach("a", layer)
    entry = dispatch.entries["a"]
    assert side is (Side.INPUT if feedforward else Side.OUTPUT) and entry.scale is not None
    with torch.no_grad():
        got = base(entry.capture(x)) if feedforward else entry.apply(x, base(x))
    assert torch.equal(got, expected)


def test_other_methods_keep_their_layer():
    base, layer = _adapted(LoraConfig(r=4, target_modules=["proj"]))
    dispatch = RowDispatch(base)
    dispatch.attach("a", layer)
    assert dispatch.entries["a"].scale is None
