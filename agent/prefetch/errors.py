"""The prefetch error tree. Every failure the engine reports is one of these, so that the CLI can
map it to an exit code and the Temporal activity can decide whether a retry could help.

This module must not import any storage SDK or HTTP client.
"""

from __future__ import annotations


class PrefetchError(Exception):
    """Base of every prefetch failure; the message is written for a person."""

    retryable = True


class InvalidInputError(PrefetchError):
    """The source, the destination or the options cannot work."""

    retryable = False


class InvalidSourceError(InvalidInputError):
    """The source URI or the options cannot work (unknown scheme, missing SDK, bad file list)."""


class InvalidDestinationError(InvalidInputError):
    """The destination cannot hold the download (a file where a directory must be)."""


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


class OriginChangedError(PrefetchError):
    """The object changed at the origin while it was being fetched (its ETag, Last-Modified or
    size no longer match the listing), and kept changing after it was fetched again.

    Retryable: a later attempt lists the object anew and may find it settled.
    """

    retryable = True
