"""Fixtures of the serving tests."""

from ..usermodels import chat_model_dir  # noqa: F401  (a fixture)
