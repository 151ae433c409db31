"""How clients reach an executor. A ``BaseExecutor`` in the same process is itself a transport."""

from .base import Transport
from .connect import connect, parse_address
from .metered import MeteredTransport
from .remote import RemoteTransport
from .sharded import ShardedTransport

__all__ = ["MeteredTransport", "RemoteTransport", "ShardedTransport", "Transport", "connect", "parse_address"]
