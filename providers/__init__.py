"""Where GPUs come from: the fungible SKU catalog, the Provider interface and the cloud adapters.

Importing this package imports no cloud SDK; each adapter imports its SDK when it is created.
"""

from providers.base import (
    SHARED_MEMORY,
    CapacityMemory,
    Instance,
    LaunchRequest,
    Provider,
)
from providers.catalog import Catalog, Offer, OfferRequest, default_catalog, load_catalog
from providers.errors import (
    AuthError,
    CapacityError,
    InvalidRequestError,
    NotFoundError,
    ProviderError,
    QuotaError,
    ResidencyError,
    TransientError,
    UnknownRegionError,
    UnknownSkuError,
)

__all__ = [
    "SHARED_MEMORY",
    "AuthError",
    "CapacityError",
    "CapacityMemory",
    "Catalog",
    "Instance",
    "InvalidRequestError",
    "LaunchRequest",
    "NotFoundError",
    "Offer",
    "OfferRequest",
    "Provider",
    "ProviderError",
    "QuotaError",
    "ResidencyError",
    "TransientError",
    "UnknownRegionError",
    "UnknownSkuError",
    "default_catalog",
    "load_catalog",
]
