"""Atlas: a hybrid-cloud migration advisor for microservices.

Learns per-API call graphs, network footprints and resource demand from traces and metrics,
then searches placements of components between on-prem and cloud for Pareto-optimal plans.
"""

__version__ = "0.1.0"
