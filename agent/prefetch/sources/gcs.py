"""Google Cloud Storage: list a prefix with google-cloud-storage and read each object through
the JSON API's media endpoint (``alt=media``, pinned to the listed generation), which accepts
``Range``. With ``STORAGE_EMULATOR_HOST`` set, the emulator is used without credentials.

The listing's CRC32C (or, without one, its MD5) is verified. Bearer tokens are taken once
at listing time; they last about an hour, which bounds one prefetch without a refresh.

The URL itself is the precondition: it names the listed generation, so every range is of that
generation or answers 404 once it is gone (the engine then lists again and, finding a newer
generation, fetches that one from the start). No ETag is compared: the media endpoint's ETag
is not the listing's.
"""

from __future__ import annotations

import importlib
import os
from typing import Any
from urllib.parse import quote

from agent.prefetch.errors import AuthError, NotFoundError, PrefetchError, TransferError
from agent.prefetch.model import RemoteObject, safe_relpath
from agent.prefetch.sources.base import Listing, SourceOptions, relative_key, require, split_bucket
from agent.prefetch.verify import b64_to_hex

PUBLIC_ENDPOINT = "https://storage.googleapis.com"


def _client(options: SourceOptions) -> tuple[Any, str, dict[str, str]]:
    try:
        from google.auth.credentials import AnonymousCredentials

        storage: Any = importlib.import_module("google.cloud.storage")
    except ImportError:
        require("google-cloud-storage", "agent")
    emulator = options.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        if "://" not in emulator:
            emulator = "http://" + emulator
        client = storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "spillway"),
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": emulator},
        )
        return client, emulator.rstrip("/"), {}
    import google.auth.transport.requests

    client = storage.Client()
    credentials = client._credentials
    credentials.refresh(google.auth.transport.requests.Request())
    return client, PUBLIC_ENDPOINT, {"Authorization": f"Bearer {credentials.token}"}


def _error(uri: str, exc: Exception) -> PrefetchError:
    from google.api_core import exceptions as api

    if isinstance(exc, api.NotFound):
        return NotFoundError(f"{uri}: not found: {exc.message}")
    if isinstance(exc, api.Forbidden | api.Unauthorized):
        return AuthError(f"{uri}: access denied: {exc.message}")
    name = type(exc).__name__
    if name in ("DefaultCredentialsError", "RefreshError"):
        return AuthError(f"{uri}: no usable Google credentials ({exc})")
    return TransferError(f"{uri}: {name}: {exc}")


def _object(blob: Any, bucket: str, path: str, base: str, headers: dict[str, str]) -> RemoteObject:
    # CRC32C (every object has one) costs a fraction of the CPU of MD5 (which composite
    # objects lack), so it is the one verified.
    checksums: dict[str, str] = {}
    if blob.crc32c:
        checksums["crc32c"] = b64_to_hex(blob.crc32c)
    elif blob.md5_hash:
        checksums["md5"] = b64_to_hex(blob.md5_hash)
    url = (
        f"{base}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quote(blob.name, safe='')}"
        f"?alt=media&generation={blob.generation}"
    )
    return RemoteObject(
        path=path,
        size=int(blob.size),
        url=url,
        headers=dict(headers),
        checksums=checksums,
        version=str(blob.generation),
    )


def resolve_gcs(uri: str, options: SourceOptions) -> Listing:
    bucket, prefix = split_bucket(uri)
    try:
        client, base, headers = _client(options)
        if prefix and not prefix.endswith("/"):
            blob = client.bucket(bucket).get_blob(prefix)
            if blob is not None:
                path = safe_relpath(relative_key(prefix, prefix))
                return Listing([_object(blob, bucket, path, base, headers)], single=True)
            prefix += "/"
        objects = [
            _object(blob, bucket, safe_relpath(relative_key(blob.name, prefix)), base, headers)
            for blob in client.list_blobs(bucket, prefix=prefix)
            if not blob.name.endswith("/")
        ]
    except PrefetchError:
        raise
    except Exception as exc:
        raise _error(uri, exc) from exc
    if not objects:
        raise NotFoundError(f"{uri}: no objects under gs://{bucket}/{prefix}")
    return Listing(objects)
