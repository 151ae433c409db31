"""The equivalence checks themselves: they must fail when the split client differs."""

from __future__ import annotations

import pytest
import torch

from .equivalence import assert_gradients_close

REFERENCE = {"a": torch.tensor([1.0, -2.0]), "b": torch.zeros(2)}


def test_matching_gradients_pass_zero_ones_included():
    assert assert_gradients_close({"a": torch.tensor([1.0, -2.0]), "b": torch.zeros(2)}, REFERENCE) == 0


def test_a_zero_reference_gradient_needs_a_zero_gradient():
    with pytest.raises(AssertionError, match="grad b"):
        assert_gradients_close({"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.0, 1e-3])}, REFERENCE)


@pytest.mark.parametrize("missing", ["a", "b"])
def test_a_missing_gradient_fails(missing):
    with pytest.raises(AssertionError, match=f"{missing}: no gradient"):
        assert_gradients_close({**REFERENCE, missing: None}, REFERENCE)


def test_all_zero_references_prove_nothing():
    with pytest.raises(AssertionError, match="every reference gradient is zero"):
        assert_gradients_close({"b": torch.zeros(2)}, {"b": torch.zeros(2)})
