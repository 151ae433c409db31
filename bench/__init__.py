"""Benchmarks. Symbiosis experiments run as ``python -m bench.<experiment>`` (see bench/README.md)."""
