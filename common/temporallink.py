"""How the scheduler's control plane and the agents' node workers reach Temporal.

One config section, ``temporal: {address, namespace, identity, tls, api_key_file |
api_key_env}`` (:class:`TemporalLink`; the scheduler adds its ``task_queue``), read the same way
on both sides: TLS with the server's CA (system roots when ``ca_file`` is absent), mutual TLS
with ``cert_file`` and ``key_file``, a server name to verify, and an API key (Temporal Cloud)
read from a file or from an environment variable named here. An API key implies TLS. Secrets
are referenced, never written in the config: an ``api_key:`` field or PEM text where a path
belongs is refused, naming the field to use instead.

:func:`connect_temporal` reads the files (bounded, one-line errors naming the setting) and
connects. A frontend that answers but refuses this client (its certificate is not trusted,
the client certificate is missing or rejected, the name does not match, the API key is
refused) raises :class:`TemporalRefused`, one line naming the setting most likely at fault;
an outage (nothing listening, a timeout) raises what the SDK raised, so that callers keep
their retry or fail-static behaviour for it. This module imports ``temporalio`` (both the
``agent`` and the ``scheduler`` extras install it), pydantic and nothing of the project's
above ``common``.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from common.configfile import CredentialError, InputError, read_secret, read_secret_line
from common.configfile import resolve_path as _resolve
from common.schedulerlink import check_host_port

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_PATH_FIELDS = ("ca_file", "cert_file", "key_file")

#: A CA bundle, a certificate chain or a key is kilobytes (a system bundle about 200 KiB).
MAX_PEM_BYTES = 1 << 20
MAX_API_KEY_BYTES = 64 << 10

#: How long one connection attempt may take before it counts as an outage.
CONNECT_TIMEOUT = timedelta(seconds=10)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _inline_pem(value: object) -> bool:
    return isinstance(value, str) and ("-----BEGIN" in value or "\n" in value.strip())


class TemporalTls(_Strict):
    """TLS to the Temporal frontend; with ``cert_file`` and ``key_file`` it is mutual TLS."""

    ca_file: Path | None = Field(
        default=None,
        description="CA bundle that signed the frontend's certificate; "
        "absent: the system's trusted roots.",
    )
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    server_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9.-]+$",
        description="Name to verify the frontend's certificate against (and send as SNI).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_pem(cls, data: Any) -> Any:
        # Checked before the fields so that the error never echoes a key back.
        if isinstance(data, dict):
            for name in _PATH_FIELDS:
                if _inline_pem(data.get(name)):
                    raise ValueError(
                        f"{name} holds PEM text; write it to a file and give that file's path "
                        "here (secrets are never written in the config)"
                    )
        return data

    @model_validator(mode="after")
    def _pair(self) -> TemporalTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together (mutual TLS)")
        return self


class TemporalLink(_Strict):
    """Where a Temporal frontend is and how to prove who we are to it."""

    address: str = Field(description="host:port of the Temporal frontend.")
    namespace: str = Field(default="default", min_length=1, max_length=255)
    identity: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="The worker's identity in Temporal; default: the SDK's (pid@host).",
    )
    tls: TemporalTls | None = None
    api_key_file: Path | None = Field(
        default=None, description="File holding the API key (Temporal Cloud)."
    )
    api_key_env: str | None = Field(
        default=None, description="NAME of an environment variable holding the API key."
    )

    _check_address = field_validator("address")(check_host_port)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        # Before the fields, so that a key pasted in the wrong place is never echoed back.
        if not isinstance(data, dict):
            return data
        if "api_key" in data:
            raise ValueError(
                "api_key: an API key is never written in the config; put it in a file and "
                "name it with api_key_file, or in an environment variable named by api_key_env"
            )
        env = data.get("api_key_env")
        if env is not None and not (isinstance(env, str) and _ENV_NAME.match(env)):
            raise ValueError(
                "api_key_env: expected the NAME of an environment variable (letters, digits, "
                "'_', e.g. TEMPORAL_API_KEY), not the key itself"
            )
        if _inline_pem(data.get("api_key_file")):
            raise ValueError("api_key_file: expected the path of a file holding the key")
        return data

    @model_validator(mode="after")
    def _one_key_source(self) -> TemporalLink:
        if self.api_key_file is not None and self.api_key_env is not None:
            raise ValueError("give api_key_file or api_key_env, not both")
        return self

    @property
    def api_key_setting(self) -> str | None:
        """The setting that names the API key, for messages."""
        if self.api_key_file is not None:
            return "temporal.api_key_file"
        if self.api_key_env is not None:
            return "temporal.api_key_env"
        return None


def resolve_paths(link: TemporalLink, base: Path) -> None:
    """Make the files ``link`` names relative to ``base`` (the config file's directory)."""
    link.api_key_file = _resolve(base, link.api_key_file)
    if link.tls is not None:
        link.tls.ca_file = _resolve(base, link.tls.ca_file)
        link.tls.cert_file = _resolve(base, link.tls.cert_file)
        link.tls.key_file = _resolve(base, link.tls.key_file)


def _read_bounded(path: Path, setting: str, what: str, limit: int) -> bytes:
    try:
        info = path.stat()
    except OSError as exc:
        raise CredentialError(f"{setting}: {path}: cannot read {what}: {exc.strerror}") from None
    if not path.is_file():
        raise CredentialError(f"{setting}: {path}: not a regular file (expected {what})")
    if info.st_size > limit:
        raise CredentialError(f"{setting}: {path}: larger than {limit // 1024} KiB; not {what}")
    try:
        return read_secret(path, what)
    except CredentialError as exc:
        raise CredentialError(f"{setting}: {exc}") from None


def _read_pem(path: Path, setting: str, what: str, *, key: bool) -> bytes:
    data = _read_bounded(path, setting, what, MAX_PEM_BYTES)
    if b"\x00" in data or not data.isascii():
        raise CredentialError(
            f"{setting}: {path}: a binary file; expected {what} in PEM form (-----BEGIN ...)"
        )
    has_key = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", data) is not None
    has_cert = b"-----BEGIN CERTIFICATE-----" in data
    if key and not has_key:
        hint = "; it holds a certificate: are cert_file and key_file swapped?" if has_cert else ""
        raise CredentialError(f"{setting}: {path}: no PEM private key in it{hint}")
    if not key and not has_cert:
        hint = "; it holds a private key: are cert_file and key_file swapped?" if has_key else ""
        raise CredentialError(f"{setting}: {path}: no PEM certificate in it{hint}")
    return data


def read_api_key(link: TemporalLink, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key the config names, or None; errors name the setting."""
    if link.api_key_file is not None:
        path = link.api_key_file
        _read_bounded(path, "temporal.api_key_file", "an API key", MAX_API_KEY_BYTES)
        try:
            return read_secret_line(path, "API key")
        except CredentialError as exc:
            raise CredentialError(f"temporal.api_key_file: {exc}") from None
    if link.api_key_env is not None:
        env = os.environ if environ is None else environ
        value = env.get(link.api_key_env, "").strip()
        if not value:
            raise CredentialError(
                f"temporal.api_key_env: names {link.api_key_env}, which is not set (or empty) "
                "in this process's environment"
            )
        if any(ch.isspace() for ch in value) or len(value) > MAX_API_KEY_BYTES:
            raise CredentialError(
                f"temporal.api_key_env: {link.api_key_env} must hold one line without spaces"
            )
        return value
    return None


@dataclass(frozen=True)
class ConnectOptions:
    """What :meth:`temporalio.client.Client.connect` is given, the files already read (the
    key and the TLS material are left out of ``repr``, so that no log or traceback shows them)."""

    address: str
    namespace: str
    tls: TLSConfig | bool = field(repr=False)
    api_key: str | None = field(repr=False)
    identity: str | None

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "namespace": self.namespace,
            "tls": self.tls,
            "api_key": self.api_key,
            "connect_timeout": CONNECT_TIMEOUT,
        }
        if self.identity is not None:
            kwargs["identity"] = self.identity
        return kwargs


def connect_options(link: TemporalLink, *, identity: str | None = None) -> ConnectOptions:
    """Read every file ``link`` names; ``identity`` is the default when the config has none.

    Raises :class:`~common.configfile.CredentialError` naming the setting of a missing,
    unreadable, oversized or binary file.
    """
    api_key = read_api_key(link)
    tls: TLSConfig | bool = api_key is not None  # an API key implies TLS (system roots)
    if link.tls is not None:
        t = link.tls
        tls = TLSConfig(
            server_root_ca_cert=(
                _read_pem(t.ca_file, "temporal.tls.ca_file", "a CA certificate", key=False)
                if t.ca_file is not None
                else None
            ),
            client_cert=(
                _read_pem(t.cert_file, "temporal.tls.cert_file", "a certificate", key=False)
                if t.cert_file is not None
                else None
            ),
            client_private_key=(
                _read_pem(t.key_file, "temporal.tls.key_file", "a private key", key=True)
                if t.key_file is not None
                else None
            ),
            domain=t.server_name,
        )
    return ConnectOptions(
        address=link.address,
        namespace=link.namespace,
        tls=tls,
        api_key=api_key,
        identity=link.identity or identity,
    )


class TemporalRefused(InputError):
    """The frontend answered and refused this client: a config problem, not an outage.

    ``setting`` is the setting most likely at fault; ``str()`` is one line for people.
    """

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(message)


#: TLS alerts a server sends when it rejects the client's certificate.
_CLIENT_CERT_ALERTS = (
    "BadCertificate",
    "UnsupportedCertificate",
    "CertificateRevoked",
    "CertificateExpired",
    "CertificateUnknown",
    "UnknownCA",
    "AccessDenied",
    "DecryptError",
)
_NOT_TLS = ("InvalidContentType", "CorruptMessage", "InvalidMessage(")
_AUTH_STATUS = re.compile(r"code: (Unauthenticated|PermissionDenied), message: \"([^\"]*)\"")


def _reason(text: str) -> str:
    for pattern in (r"InvalidCertificate\((\w+)", r"received fatal alert: (\w+)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return text[:200]


def refusal(exc: BaseException, link: TemporalLink, *, what: str) -> TemporalRefused | None:
    """The one-line config error ``exc`` means, or None when it is an outage (or unknown)."""
    text = str(exc)
    at = f"the frontend at {link.address}"
    tls = link.tls
    has_cert = tls is not None and tls.cert_file is not None
    if isinstance(exc, RPCError) and exc.status in (
        RPCStatusCode.UNAUTHENTICATED,
        RPCStatusCode.PERMISSION_DENIED,
    ):
        text = f'code: {exc.status.name.title().replace("_", "")}, message: "{exc.message}"'
    if "NotValidForName" in text:
        expected = re.search(r'expected: \w+\("([^"]+)"\)', text)
        presented = re.findall(r'\w+Name\(\\"([^\\]+)\\"\)|IpAddress\(([^)]+)\)', text)
        names = ", ".join(a or b for a, b in presented) or "other names"
        name = expected.group(1) if expected else "the name dialled"
        return TemporalRefused(
            "temporal.tls.server_name",
            f"temporal.tls.server_name: {at} presented a certificate that is not valid for "
            f"{name} (it names {names}) to {what}; set temporal.tls.server_name to one of "
            "those names, or check temporal.address",
        )
    if "InvalidCertificate(" in text:
        trusted = str(tls.ca_file) if tls is not None and tls.ca_file else "the system's roots"
        return TemporalRefused(
            "temporal.tls.ca_file",
            f"temporal.tls.ca_file: {at} presented a certificate that {what} does not trust "
            f"({_reason(text)}; trusted: {trusted}); check temporal.tls.ca_file",
        )
    if "CertificateRequired" in text:
        return TemporalRefused(
            "temporal.tls.cert_file",
            f"temporal.tls: {at} refused the TLS handshake of {what}: it requires a client "
            "certificate and none is configured; set temporal.tls.cert_file and key_file"
            if not has_cert
            else f"temporal.tls: {at} refused the TLS handshake of {what}: it did not accept "
            "the client certificate (CertificateRequired); check temporal.tls.cert_file/key_file",
        )
    if any(f"fatal alert: {alert}" in text for alert in _CLIENT_CERT_ALERTS) or (
        "HandshakeFailure" in text
    ):
        setting = "temporal.tls.cert_file" if has_cert else "temporal.tls"
        return TemporalRefused(
            setting,
            f"temporal.tls: {at} refused the TLS handshake of {what}: {_reason(text)}; check "
            "temporal.tls.cert_file/key_file (a client certificate its CA signed)",
        )
    if any(marker in text for marker in _NOT_TLS):
        return TemporalRefused(
            "temporal.tls",
            f"temporal.tls: {at} does not answer TLS ({_reason(text)}); remove temporal.tls "
            "(and the API key, which needs TLS) or check temporal.address",
        )
    auth = _AUTH_STATUS.search(text)
    if auth is not None:
        why = f"{auth.group(1)}: {auth.group(2)}"
        setting = link.api_key_setting or ""
        if setting:
            message = f"{setting}: {at} refused the API key of {what} ({why}); check {setting}"
        elif has_cert:
            setting = "temporal.tls.cert_file"
            message = (
                f"{setting}: {at} refused {what}, identified by its client certificate ({why}); "
                "check temporal.tls.cert_file and what the frontend authorizes it for"
            )
        else:
            setting = "temporal.api_key_file"
            message = (
                f"temporal: {at} refused {what}, which sent no credentials ({why}); set "
                "temporal.api_key_file or api_key_env, or a client certificate in temporal.tls"
            )
        return TemporalRefused(setting, message)
    return None


#: What the SDK reports when the frontend closed the line right after the TLS handshake: a
#: refused client certificate (TLS 1.3 refuses it only after the handshake, and the SDK's first
#: write may race the server's alert) or a proxy with nothing behind it. :func:`_probe_alert`
#: tells them apart.
_CLOSED_AFTER_HANDSHAKE = ("BrokenPipe", "connection closed", "ConnectionReset")

#: OpenSSL's names of TLS alerts, as the SDK (rustls) writes them.
_ALERTS = {
    "CERTIFICATE_REQUIRED": "CertificateRequired",
    "UNKNOWN_CA": "UnknownCA",
    "BAD_CERTIFICATE": "BadCertificate",
    "UNSUPPORTED_CERTIFICATE": "UnsupportedCertificate",
    "CERTIFICATE_REVOKED": "CertificateRevoked",
    "CERTIFICATE_EXPIRED": "CertificateExpired",
    "CERTIFICATE_UNKNOWN": "CertificateUnknown",
    "ACCESS_DENIED": "AccessDenied",
    "DECRYPT_ERROR": "DecryptError",
    "HANDSHAKE_FAILURE": "HandshakeFailure",
}


def _probe_alert(link: TemporalLink, timeout_s: float = 3.0) -> str | None:
    """Shake hands with the frontend as the SDK does, then wait for its first bytes without
    sending any: the TLS alert it sends instead (``"UnknownCA"``), or None when it speaks,
    closes without one or stays silent."""
    tls = link.tls
    host, _, port = link.address.rpartition(":")
    host = host.strip("[]")
    try:
        if tls is not None and tls.ca_file is not None:
            context = ssl.create_default_context(cadata=tls.ca_file.read_text("ascii"))
        else:
            context = ssl.create_default_context()
        if tls is not None and tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        context.set_alpn_protocols(["h2"])
        name = tls.server_name if tls is not None and tls.server_name else host
        with (
            socket.create_connection((host, int(port)), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=name) as conn,
        ):
            conn.settimeout(1.0)  # a refusal follows the handshake at once
            conn.recv(1)
    except ssl.SSLError as exc:
        reason = str(exc.reason or "")
        for suffix, alert in _ALERTS.items():
            if "ALERT" in reason and reason.endswith(suffix):
                return alert
    except (OSError, ValueError, UnicodeError):
        pass
    return None


async def explain(exc: BaseException, link: TemporalLink, *, what: str) -> TemporalRefused | None:
    """:func:`refusal`, and when the frontend closed the line right after a TLS handshake, a
    probe of that handshake to tell a refused certificate from an outage behind a proxy."""
    found = refusal(exc, link, what=what)
    tls_used = link.tls is not None or link.api_key_setting is not None
    if found is None and tls_used and any(m in str(exc) for m in _CLOSED_AFTER_HANDSHAKE):
        alert = await asyncio.to_thread(_probe_alert, link)
        if alert is not None:
            found = refusal(RuntimeError(f"received fatal alert: {alert}"), link, what=what)
    return found


def describe_outage(exc: BaseException, link: TemporalLink) -> str:
    """One line for an outage; hints at TLS when a plaintext client saw the line drop."""
    text = str(exc).removeprefix("Failed client connect: ")
    line = f"{type(exc).__name__}: {text[:300]}"
    if (
        link.tls is None
        and link.api_key_setting is None
        and ("BrokenPipe" in text or "connection closed" in text)
    ):
        line += " (if the frontend serves TLS, add a temporal.tls section)"
    return line


async def connect_temporal(link: TemporalLink, *, what: str, identity: str | None = None) -> Client:
    """Read the files ``link`` names and connect.

    Raises :class:`~common.configfile.CredentialError` for a bad file,
    :class:`TemporalRefused` when the frontend refuses this client, and what the SDK raised
    for an outage. ``what`` names the caller in messages (``"the node worker"``).
    """
    options = connect_options(link, identity=identity)
    try:
        return await Client.connect(options.address, **options.kwargs())
    except (RuntimeError, RPCError) as exc:
        refused = await explain(exc, link, what=what)
        if refused is not None:
            raise refused from None
        raise
