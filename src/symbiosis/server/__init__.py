"""The executor as a network service: gRPC, shared-memory channels, tenants, metrics."""

from .app import ExecutorServer
from .tenancy import Limits, Tenant, TenantRegistry

__all__ = ["ExecutorServer", "Limits", "Tenant", "TenantRegistry"]
