"""Error and warning types: every message names the input that caused it."""

from __future__ import annotations

import warnings
from pathlib import Path


class AtlasInputError(ValueError):
    """Raised for input that cannot be used; the message names the source and the problem."""

    def __init__(self, source: str | Path, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class AtlasDataWarning(UserWarning):
    """Partial or suspicious data that the pipeline degrades around."""


def warn_data(source: str | Path, problem: str) -> None:
    """Emit an AtlasDataWarning naming the source; never degrade silently."""
    warnings.warn(f"{source}: {problem}", AtlasDataWarning, stacklevel=2)
