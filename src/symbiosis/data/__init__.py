"""Data files shipped with Symbiosis (the corpus the tiny test tokenizers are trained on)."""
