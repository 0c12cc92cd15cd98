"""Azure Blob Storage: ``az://container/prefix`` listed with azure-storage-blob, each blob read
through a read-only SAS URL (``Range`` works on it).

Credentials come from a connection string (``SourceOptions.azure_connection_string`` or
``AZURE_STORAGE_CONNECTION_STRING``): with an account key a short-lived SAS is signed for each
blob; with a ``SharedAccessSignature`` it is appended as is. The blob's Content-MD5, when set,
is verified. Every range carries ``If-Match: <the listed ETag>`` (Blob storage answers 412 once
the blob is overwritten and, like Azurite, ignores ``If-Range``); a SAS does not sign request
headers, so the precondition needs nothing more.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.prefetch.errors import (
    AuthError,
    InvalidSourceError,
    NotFoundError,
    PrefetchError,
    TransferError,
)
from agent.prefetch.model import RemoteObject, http_date, safe_relpath
from agent.prefetch.sources.base import Listing, SourceOptions, relative_key, require, split_bucket


def _connection_string(options: SourceOptions) -> str:
    value = options.azure_connection_string or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if not value:
        raise AuthError(
            "Azure Blob needs a connection string: set AZURE_STORAGE_CONNECTION_STRING "
            "(account key or SharedAccessSignature)"
        )
    return value


def _fields(connection_string: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in connection_string.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def _error(uri: str, exc: Exception) -> PrefetchError:
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
    )

    if isinstance(exc, ResourceNotFoundError):
        return NotFoundError(f"{uri}: not found: {exc.reason or exc}")
    if isinstance(exc, ClientAuthenticationError) or (
        isinstance(exc, HttpResponseError) and exc.status_code in (401, 403)
    ):
        return AuthError(f"{uri}: access denied: {exc.reason or exc}")
    if isinstance(exc, ValueError):
        return InvalidSourceError(f"{uri}: bad Azure connection string: {exc}")
    return TransferError(f"{uri}: {type(exc).__name__}: {exc}")


def resolve_azure(uri: str, options: SourceOptions) -> Listing:
    try:
        from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas
    except ImportError:
        require("azure-storage-blob", "agent")
    container, prefix = split_bucket(uri)
    connection_string = _connection_string(options)
    fields = _fields(connection_string)
    account_key = fields.get("accountkey")
    shared_sas = fields.get("sharedaccesssignature", "").lstrip("?")
    expiry = datetime.now(UTC) + timedelta(seconds=options.expires_s)

    def sas_for(client: Any, name: str) -> str:
        if account_key:
            return str(
                generate_blob_sas(
                    account_name=client.account_name,
                    container_name=container,
                    blob_name=name,
                    account_key=account_key,
                    permission=BlobSasPermissions(read=True),
                    expiry=expiry,
                )
            )
        return shared_sas

    def make(client: Any, props: Any, path: str) -> RemoteObject:
        blob = client.get_blob_client(container, props.name)
        md5 = props.content_settings.content_md5 if props.content_settings else None
        etag = str(props.etag or "")
        modified = props.last_modified
        return RemoteObject(
            path=path,
            size=int(props.size),
            url=f"{blob.url}?{sas_for(client, props.name)}",
            checksums={"md5": bytes(md5).hex()} if md5 else {},
            version=etag.strip('"'),
            etag=etag if not etag or etag.startswith(('"', "W/")) else f'"{etag}"',
            last_modified=http_date(modified) if isinstance(modified, datetime) else "",
            precondition="if-match",
        )

    try:
        service = BlobServiceClient.from_connection_string(connection_string)
        box = service.get_container_client(container)
        if prefix and not prefix.endswith("/"):
            from azure.core.exceptions import ResourceNotFoundError

            try:
                props = box.get_blob_client(prefix).get_blob_properties()
            except ResourceNotFoundError as exc:
                if getattr(exc, "error_code", None) == "ContainerNotFound":
                    raise
            else:
                path = safe_relpath(relative_key(prefix, prefix))
                return Listing([make(service, props, path)], single=True)
            prefix += "/"
        objects = [
            make(service, props, safe_relpath(relative_key(props.name, prefix)))
            for props in box.list_blobs(name_starts_with=prefix)
            if not props.name.endswith("/")
        ]
    except PrefetchError:
        raise
    except Exception as exc:
        raise _error(uri, exc) from exc
    if not objects:
        raise NotFoundError(f"{uri}: no blobs under az://{container}/{prefix}")
    return Listing(objects)
