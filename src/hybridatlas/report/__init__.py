"""Human- and machine-readable outputs: rich tables, JSON, Pareto chart (PNG), HTML report."""
