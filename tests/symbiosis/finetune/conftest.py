"""Fixtures of the fine-tuning tests."""

from ..usermodels import chat_model_dir  # noqa: F401  (a fixture)
