"""Tests of fine-tuning jobs."""
