"""Models learned from telemetry: call graphs, footprint, resources, latency, cost, availability."""
