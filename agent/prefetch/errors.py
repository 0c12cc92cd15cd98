"""The prefetch error tree. Every failure the engine reports is one of these, so that the CLI can
map it to an exit code and the Temporal activity can decide whether a retry could help.

This module must not import any storage SDK or HTTP client.
"""

from __future__ import annotations


class PrefetchError(Exception):
    """Base of every prefetch failure; the message is written for a person."""

    retryable = True


class InvalidSourceError(PrefetchError):
    """The source URI or the options cannot work (unknown scheme, missing SDK, bad file list)."""

    retryable = False


class NotFoundError(PrefetchError):
    """The bucket, prefix or object does not exist (HTTP 404)."""

    retryable = False


class AuthError(PrefetchError):
    """The origin refused the credentials or the signature (HTTP 401/403)."""

    retryable = False


class VerificationError(PrefetchError):
    """What was written does not match the store: size, checksum or safetensors header."""

    retryable = False


class DiskFullError(PrefetchError):
    """The destination has no room (ENOSPC or EDQUOT)."""

    retryable = False


class TransferError(PrefetchError):
    """A range kept failing after every retry (resets, 5xx, truncated bodies)."""

    retryable = True
