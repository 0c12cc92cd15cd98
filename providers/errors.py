"""The one error tree of the providers package, and the tables that map each cloud's codes onto it.

Callers decide from the class alone: :class:`CapacityError` and :class:`QuotaError` mean "try the
next offer", :class:`TransientError` means "retry the same call later", everything else is a
problem a person must fix. Every message names what was asked and, where it helps, what exists.

This module must not import any cloud SDK: adapters extract ``(code, message, http_status)`` from
their SDK's exceptions and call :func:`classify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Cloud = Literal["aws", "gcp", "azure", "local"]


class ProviderError(Exception):
    """Anything a provider could not do. ``code`` is the cloud's own error code, if any."""

    #: The workflow should move on to the next offer (another type, region or cloud).
    try_next_offer: bool = False
    #: Retrying the same call later may succeed.
    retryable: bool = False

    def __init__(self, message: str, *, cloud: str = "", code: str = "") -> None:
        super().__init__(message)
        self.cloud = cloud
        self.code = code


class CapacityError(ProviderError):
    """The cloud has no machines of this type where we asked (zone, region), right now."""

    try_next_offer = True


class QuotaError(ProviderError):
    """The account's quota (vCPUs, GPUs, spot instances) does not allow the launch."""

    try_next_offer = True


class AuthError(ProviderError):
    """Credentials are missing, invalid, expired or lack a permission."""


class InvalidRequestError(ProviderError):
    """The request itself is wrong (image, network, parameter); retrying it cannot help."""


class UnknownSkuError(InvalidRequestError):
    """A fungible SKU, GPU count or instance type the catalog does not know."""


class UnknownRegionError(InvalidRequestError):
    """A region (or zone) the catalog does not list for this cloud or instance type."""


class ResidencyError(ProviderError):
    """A launch would leave the regions the request is locked to. Never a fallback."""


class TransientError(ProviderError):
    """Throttling, timeouts, 5xx: the same call may succeed later."""

    retryable = True


class NotFoundError(ProviderError):
    """The resource does not exist (only raised where absence is an error)."""


class CannotStopError(ProviderError):
    """This machine cannot be stopped and started again (a one-time spot machine, a root
    volume that does not survive a stop); it can only be terminated."""


@dataclass(frozen=True)
class Rule:
    """One row of the mapping table: ``code`` (exact) and, optionally, a message fragment."""

    cloud: Cloud
    code: str
    error: type[ProviderError]
    message_contains: str = ""


# Rows with a message fragment are tried before rows without one.
RULES: tuple[Rule, ...] = (
    # AWS EC2 (botocore ClientError response["Error"]["Code"]).
    Rule("aws", "InsufficientInstanceCapacity", CapacityError),
    Rule("aws", "InsufficientHostCapacity", CapacityError),
    Rule("aws", "InsufficientReservedInstanceCapacity", CapacityError),
    Rule("aws", "InsufficientCapacityOnHost", CapacityError),
    Rule("aws", "Unsupported", CapacityError),  # type not offered in this zone
    Rule("aws", "SpotMaxPriceTooLow", CapacityError),
    Rule("aws", "InstanceLimitExceeded", QuotaError),
    Rule("aws", "VcpuLimitExceeded", QuotaError),
    Rule("aws", "MaxSpotInstanceCountExceeded", QuotaError),
    Rule("aws", "AuthFailure", AuthError),
    Rule("aws", "UnauthorizedOperation", AuthError),
    Rule("aws", "InvalidClientTokenId", AuthError),
    Rule("aws", "SignatureDoesNotMatch", AuthError),
    Rule("aws", "ExpiredToken", AuthError),
    Rule("aws", "OptInRequired", AuthError),
    Rule("aws", "InvalidAMIID.NotFound", InvalidRequestError),
    Rule("aws", "InvalidAMIID.Malformed", InvalidRequestError),
    Rule("aws", "InvalidParameterValue", InvalidRequestError),
    Rule("aws", "InvalidParameterCombination", InvalidRequestError),
    Rule("aws", "InvalidSubnetID.NotFound", InvalidRequestError),
    Rule("aws", "InvalidGroup.NotFound", InvalidRequestError),
    Rule("aws", "IdempotentParameterMismatch", InvalidRequestError),
    Rule("aws", "UnsupportedOperation", CannotStopError, "stop"),
    Rule("aws", "IncorrectInstanceState", TransientError),
    Rule("aws", "RequestLimitExceeded", TransientError),
    Rule("aws", "Throttling", TransientError),
    Rule("aws", "InternalError", TransientError),
    Rule("aws", "InternalFailure", TransientError),
    Rule("aws", "ServiceUnavailable", TransientError),
    Rule("aws", "Unavailable", TransientError),
    # GCP Compute Engine: operation error codes and HTTP error reasons.
    Rule("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED", CapacityError),
    Rule("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", CapacityError),
    Rule("gcp", "RESOURCE_POOL_EXHAUSTED", CapacityError),
    Rule("gcp", "resourcePoolExhausted", CapacityError),
    Rule("gcp", "UNSUPPORTED_OPERATION", CapacityError, "machine type"),
    Rule("gcp", "QUOTA_EXCEEDED", QuotaError),
    Rule("gcp", "quotaExceeded", QuotaError),
    Rule("gcp", "rateLimitExceeded", TransientError),
    Rule("gcp", "userRateLimitExceeded", TransientError),
    Rule("gcp", "backendError", TransientError),
    Rule("gcp", "internalError", TransientError),
    Rule("gcp", "forbidden", AuthError),
    Rule("gcp", "insufficientPermissions", AuthError),
    Rule("gcp", "authError", AuthError),
    Rule("gcp", "invalid", InvalidRequestError),
    Rule("gcp", "badRequest", InvalidRequestError),
    Rule("gcp", "RESOURCE_NOT_FOUND", InvalidRequestError),
    Rule("gcp", "notFound", InvalidRequestError),
    # Azure Resource Manager / Compute.
    Rule("azure", "AllocationFailed", CapacityError),
    Rule("azure", "ZonalAllocationFailed", CapacityError),
    Rule("azure", "OverconstrainedAllocationRequest", CapacityError),
    Rule("azure", "OverconstrainedZonalAllocationRequest", CapacityError),
    Rule("azure", "SkuNotAvailable", CapacityError),
    Rule("azure", "QuotaExceeded", QuotaError),
    Rule("azure", "OperationNotAllowed", QuotaError, "quota"),
    Rule("azure", "OperationNotAllowed", InvalidRequestError),
    Rule("azure", "AuthenticationFailed", AuthError),
    Rule("azure", "AuthorizationFailed", AuthError),
    Rule("azure", "InvalidAuthenticationToken", AuthError),
    Rule("azure", "ExpiredAuthenticationToken", AuthError),
    Rule("azure", "InvalidParameter", InvalidRequestError),
    Rule("azure", "InvalidTemplate", InvalidRequestError),
    Rule("azure", "ImageNotFound", InvalidRequestError),
    Rule("azure", "PlatformImageNotFound", InvalidRequestError),
    Rule("azure", "InvalidResourceReference", InvalidRequestError),
    Rule("azure", "BadRequest", InvalidRequestError),
    Rule("azure", "TooManyRequests", TransientError),
    Rule("azure", "RetryableError", TransientError),
    Rule("azure", "InternalExecutionError", TransientError),
    Rule("azure", "ServerTimeout", TransientError),
    Rule("azure", "ServiceUnavailable", TransientError),
)


def _by_status(http_status: int | None) -> type[ProviderError]:
    if http_status in (401, 403):
        return AuthError
    if http_status == 429 or (http_status is not None and http_status >= 500):
        return TransientError
    if http_status == 404:
        return NotFoundError
    if http_status == 400:
        return InvalidRequestError
    return ProviderError


def classify(
    cloud: Cloud, code: str, message: str = "", http_status: int | None = None
) -> type[ProviderError]:
    """The error class for a cloud's error ``code`` (falling back on the HTTP status)."""
    lowered = message.lower()
    plain: type[ProviderError] | None = None
    for rule in RULES:
        if rule.cloud != cloud or rule.code != code:
            continue
        if rule.message_contains:
            if rule.message_contains.lower() in lowered:
                return rule.error
        elif plain is None:
            plain = rule.error
    return plain if plain is not None else _by_status(http_status)


def make_error(
    cloud: Cloud, code: str, message: str, http_status: int | None = None, context: str = ""
) -> ProviderError:
    """An exception of the class :func:`classify` picks, with a message for people."""
    error = classify(cloud, code, message, http_status)
    prefix = f"{cloud}: {context}: " if context else f"{cloud}: "
    return error(f"{prefix}{code or http_status}: {message}", cloud=cloud, code=code)
