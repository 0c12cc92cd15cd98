"""S3 and S3-compatible stores (MinIO, SeaweedFS, Ceph): list a prefix with boto3 and presign a
GET for each object, which the engine then reads with ``Range``.

The endpoint comes from ``SourceOptions.endpoint_url`` or boto3's own ``AWS_ENDPOINT_URL``;
with a custom endpoint, path-style addressing is used. A single-part ETag is the object's MD5
and is verified; multipart ETags are kept only to detect a changed object.

Every range is sent with ``If-Match: <the listed ETag>``: S3 (and MinIO, SeaweedFS) answer 412
once the object has been overwritten. S3 documents no ``If-Range`` on GET, and S3-compatible
stores ignore it, which is why this one is used. A presigned GET signs only the ``host``
header, so the precondition travels unsigned.
"""

from __future__ import annotations

import re
from datetime import datetime
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

_MD5 = re.compile(r"[0-9a-f]{32}")
_AUTH_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "403",
    "401",
}
_NOT_FOUND_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}


def _client(options: SourceOptions) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        require("boto3", "agent")
    config = Config(
        s3={"addressing_style": "path"} if options.endpoint_url else {},
        retries={"max_attempts": 5, "mode": "standard"},
        signature_version="s3v4",
    )
    # A session of its own: boto3's default session caches the credentials it first found.
    return boto3.session.Session().client("s3", endpoint_url=options.endpoint_url, config=config)


def _error(uri: str, exc: Exception) -> PrefetchError:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AuthError(f"{uri}: no AWS credentials found ({exc})")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        message = exc.response.get("Error", {}).get("Message") or code
        if code in _AUTH_CODES:
            return AuthError(f"{uri}: access denied: {code}: {message}")
        if code in _NOT_FOUND_CODES:
            return NotFoundError(f"{uri}: not found: {code}: {message}")
        return TransferError(f"{uri}: {code}: {message}")
    return TransferError(f"{uri}: {type(exc).__name__}: {exc}")


def _object(
    client: Any, bucket: str, key: str, path: str, item: dict[str, Any], expires: int
) -> RemoteObject:
    """``item``: a ``list_objects_v2`` entry (``Size``) or a ``head_object`` answer
    (``ContentLength``)."""
    etag = str(item.get("ETag", ""))
    bare = etag.strip('"').lower()
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
    )
    checksums = {"md5": bare} if _MD5.fullmatch(bare) else {}
    modified = item.get("LastModified")
    return RemoteObject(
        path=path,
        size=int(item["Size"] if "Size" in item else item["ContentLength"]),
        url=url,
        checksums=checksums,
        version=bare,
        etag=etag,
        last_modified=http_date(modified) if isinstance(modified, datetime) else "",
        precondition="if-match",
    )


def resolve_s3(uri: str, options: SourceOptions) -> Listing:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_bucket(uri)
    client = _client(options)
    objects: list[RemoteObject] = []
    try:
        if prefix and not prefix.endswith("/"):
            try:
                head = client.head_object(Bucket=bucket, Key=prefix)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in _NOT_FOUND_CODES:
                    raise
            else:
                path = safe_relpath(relative_key(prefix, prefix))
                obj = _object(client, bucket, prefix, path, head, options.expires_s)
                return Listing([obj], single=True)
            prefix += "/"
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = str(item["Key"])
                if key.endswith("/"):
                    continue  # a "directory marker" object
                path = safe_relpath(relative_key(key, prefix))
                objects.append(_object(client, bucket, key, path, item, options.expires_s))
    except (ClientError, BotoCoreError) as exc:
        raise _error(uri, exc) from exc
    if not objects:
        raise NotFoundError(f"{uri}: no objects under s3://{bucket}/{prefix}")
    if any(o.path == "" for o in objects):
        raise InvalidSourceError(f"{uri}: an object key maps to an empty path")
    return Listing(objects)
