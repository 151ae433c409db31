"""Emulated on-prem/cloud deployments: network namespaces joined by a WAN with set delay and bandwidth."""
