"""Readers for telemetry: Jaeger traces, Prometheus query_range JSON, CSV, and live HTTP APIs."""
