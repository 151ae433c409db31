"""Placement search: vectorised plan scoring, NSGA-II with local refinement, baselines."""
