"""How clients reach an executor. A ``BaseExecutor`` in the same process is itself a transport."""

from .base import Transport

__all__ = ["Transport"]
