"""Tests of the OpenAI-compatible multi-adapter server."""
