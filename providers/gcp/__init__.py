"""Google Compute Engine: the adapter and its pure request builders (SDK imported lazily)."""

from providers.gcp.adapter import GcpProvider
from providers.gcp.build import GcpNetwork

__all__ = ["GcpNetwork", "GcpProvider"]
