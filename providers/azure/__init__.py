"""Azure Compute: the adapter and its pure request builders (SDK imported lazily)."""

from providers.azure.adapter import AzureProvider
from providers.azure.build import AzureNetwork

__all__ = ["AzureNetwork", "AzureProvider"]
