"""The error table: every cloud's codes land on the right class of the one error tree."""

from __future__ import annotations

import pytest

from providers.errors import (
    RULES,
    AuthError,
    CapacityError,
    Cloud,
    InvalidRequestError,
    NotFoundError,
    ProviderError,
    QuotaError,
    TransientError,
    classify,
    make_error,
)

CASES: list[tuple[Cloud, str, str, int | None, type[ProviderError]]] = [
    ("aws", "InsufficientInstanceCapacity", "", 500, CapacityError),
    ("aws", "Unsupported", "not supported in your requested Availability Zone", 400, CapacityError),
    ("aws", "VcpuLimitExceeded", "", 400, QuotaError),
    ("aws", "InstanceLimitExceeded", "", 400, QuotaError),
    ("aws", "MaxSpotInstanceCountExceeded", "", 400, QuotaError),
    ("aws", "UnauthorizedOperation", "", 403, AuthError),
    ("aws", "AuthFailure", "", 401, AuthError),
    ("aws", "InvalidAMIID.NotFound", "", 400, InvalidRequestError),
    ("aws", "RequestLimitExceeded", "", 503, TransientError),
    ("aws", "SomethingNew", "", 503, TransientError),
    ("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED", "", 503, CapacityError),
    ("gcp", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "", 503, CapacityError),
    ("gcp", "QUOTA_EXCEEDED", "", 403, QuotaError),
    ("gcp", "quotaExceeded", "", 403, QuotaError),
    ("gcp", "rateLimitExceeded", "", 429, TransientError),
    ("gcp", "backendError", "", 503, TransientError),
    ("gcp", "insufficientPermissions", "", 403, AuthError),
    ("gcp", "invalid", "", 400, InvalidRequestError),
    ("gcp", "", "", 429, TransientError),
    ("gcp", "", "", 404, NotFoundError),
    ("azure", "AllocationFailed", "", None, CapacityError),
    ("azure", "ZonalAllocationFailed", "", None, CapacityError),
    ("azure", "SkuNotAvailable", "", 409, CapacityError),
    ("azure", "OverconstrainedAllocationRequest", "", None, CapacityError),
    (
        "azure",
        "OperationNotAllowed",
        "exceeding approved standardNDSH100v5Family Cores quota",
        409,
        QuotaError,
    ),
    ("azure", "OperationNotAllowed", "The VM is being deleted", 409, InvalidRequestError),
    ("azure", "QuotaExceeded", "", 409, QuotaError),
    ("azure", "AuthorizationFailed", "", 403, AuthError),
    ("azure", "InvalidAuthenticationToken", "", 401, AuthError),
    ("azure", "TooManyRequests", "", 429, TransientError),
    ("azure", "ImageNotFound", "", 404, InvalidRequestError),
    ("azure", "Mystery", "", None, ProviderError),
]


@pytest.mark.parametrize(("cloud", "code", "message", "status", "expected"), CASES)
def test_codes_map_to_the_error_tree(
    cloud: Cloud, code: str, message: str, status: int | None, expected: type[ProviderError]
) -> None:
    assert classify(cloud, code, message, status) is expected


def test_every_rule_in_the_table_is_reachable() -> None:
    for rule in RULES:
        message = rule.message_contains or "anything"
        got = classify(rule.cloud, rule.code, message)
        shadowing = [
            r for r in RULES if r.cloud == rule.cloud and r.code == rule.code and r is not rule
        ]
        assert got is rule.error or any(got is r.error for r in shadowing), rule


def test_flags_tell_the_workflow_what_to_do() -> None:
    assert CapacityError.try_next_offer and QuotaError.try_next_offer
    assert TransientError.retryable and not CapacityError.retryable
    assert not AuthError.try_next_offer and not InvalidRequestError.try_next_offer


def test_made_errors_keep_code_cloud_and_context() -> None:
    error = make_error("gcp", "QUOTA_EXCEEDED", "Quota 'GPUS' exceeded", 403, "insert in zone-a")
    assert isinstance(error, QuotaError)
    assert (error.cloud, error.code) == ("gcp", "QUOTA_EXCEEDED")
    assert str(error) == "gcp: insert in zone-a: QUOTA_EXCEEDED: Quota 'GPUS' exceeded"
