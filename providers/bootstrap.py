"""Cloud-init user data that installs and starts the Spillway agent on a machine we launch.

One source of truth for boot. ``terraform/modules/agent-bootstrap/templates/`` holds the
cloud-init template (``cloud-init.yaml.tftpl``) and the boot helper it embeds
(``spillway-boot.py``). The ``agent-bootstrap`` Terraform module renders them with
``templatefile()``; :func:`render_user_data` renders the very same files for the machines the
provision workflow launches, so a fix to boot lands in both. ``providers/bootstrap_templates`` is a
symbolic link to that directory, listed as package data in ``pyproject.toml``: in the source tree
it resolves to the Terraform module's files, and a built wheel contains copies of them (setuptools
copies a link's target), so an installed package reads the same bytes.

The renderer implements exactly the subset of Terraform's template language the template uses:
``${name}`` interpolation of a string (every value already encoded as Terraform's ``jsonencode()``
and ``filebase64()`` would encode it), ``%{ if name }`` ... ``%{ endif }`` on a bool, the strip
marker ``~}`` on those directives, and the escapes ``$${`` and ``%%{``. Anything else
(expressions, function calls, ``for``, ``else``, other strip markers) raises
:class:`TemplateError` naming the line, so a template that needs more has to extend this module,
and the tests that compare this output with real Terraform's catch any drift.

This module must not import the agent or any cloud SDK, and never takes the agent's token: only
a reference (file path, secret ARN or name, vault URL) that the machine resolves at boot.
"""

from __future__ import annotations

import base64
import gzip
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from typing import Literal

from providers.errors import InvalidRequestError, ProviderError, ResidencyError

TEMPLATE = "cloud-init.yaml.tftpl"
BOOT_SCRIPT = "spillway-boot.py"
TEMPLATES_PACKAGE_DIR = "bootstrap_templates"

# Where the machine keeps the token and the scheduler's CA (tmpfs, written by spillway-boot).
TOKEN_FILE = "/run/spillway/token"
CA_FILE = "/run/spillway/scheduler-ca.pem"
STATE_DIR = "/var/lib/spillway/state"
SERVICE_NAME = "spillway-agent.service"

# User data limits, before base64: Azure's custom_data takes 64 KiB, GCP's metadata more. AWS
# takes only 16 KiB, so AWS gets the user data gzipped (cloud-init unpacks it): gzip_user_data.
MAX_USER_DATA_BYTES = 64 * 1024
MAX_AWS_USER_DATA_BYTES = 16 * 1024

Cloud = Literal["onprem", "aws", "gcp", "azure", "local"]
TokenKind = Literal["file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault"]
GpuDiscovery = Literal["auto", "nvml", "static"]

_AGENT_ID = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
_CLOUDS = ("onprem", "aws", "gcp", "azure", "local")
_TOKEN_KINDS = ("file", "aws-secretsmanager", "gcp-secretmanager", "azure-keyvault")


class TemplateError(ProviderError):
    """The template uses syntax this renderer does not implement, or names an unknown value."""


@dataclass(frozen=True)
class TokenSource:
    """Where a secret (the agent's bearer token, a Temporal key) lives; fetched at boot."""

    kind: TokenKind
    ref: str


#: The same reference, for the Temporal client's certificate, key and API key.
SecretSource = TokenSource


@dataclass(frozen=True)
class StaticGpu:
    model: str
    memory_gib: float
    count: int = 1


@dataclass(frozen=True)
class BootstrapSpec:
    """The inputs of the ``agent-bootstrap`` module: same names, same defaults, same meaning.

    See ``terraform/modules/agent-bootstrap/variables.tf`` for what each field does.
    """

    agent_id: str
    cloud: Cloud
    pool: str
    region: str
    allowed_regions: tuple[str, ...]
    scheduler_address: str  # "" with scheduler_addresses
    token_source: TokenSource
    scheduler_addresses: tuple[str, ...] = ()
    append_instance_id: bool = False
    zone: str = ""
    residency_group: str = ""
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    temporal_address: str = ""
    temporal_namespace: str = "default"
    temporal_server_name: str = ""
    temporal_ca_pem: str = ""
    temporal_tls: bool = False
    temporal_client_cert_source: SecretSource | None = None
    temporal_client_key_source: SecretSource | None = None
    temporal_api_key_source: SecretSource | None = None
    scheduler_ca_pem: str = ""
    scheduler_server_name: str = ""
    identity_client_id: str = ""
    gpu_discovery: GpuDiscovery = "auto"
    static_gpus: tuple[StaticGpu, ...] = ()
    reconnect_initial_backoff_s: float = 0.5
    reconnect_max_backoff_s: float = 30
    wheel_url: str = ""
    package_index_url: str = ""
    package_version: str = ""
    install_sglang: bool = False
    system_packages: tuple[str, ...] = ("python3-venv",)


def check(spec: BootstrapSpec) -> None:
    """Refuse what the Terraform module's validations refuse, with the same advice.

    A region outside ``allowed_regions`` raises :class:`ResidencyError`; anything else
    :class:`InvalidRequestError`, naming every problem at once.
    """
    if spec.region not in spec.allowed_regions:
        raise ResidencyError(
            f"region {spec.region} is not in allowed_regions [{', '.join(spec.allowed_regions)}]:"
            " set region to one of them or extend allowed_regions",
            cloud=spec.cloud,
        )
    problems: list[str] = []
    if not _AGENT_ID.match(spec.agent_id):
        problems.append(f"agent_id {spec.agent_id!r}: 1-63 of a-z 0-9 . _ - expected")
    if spec.cloud not in _CLOUDS:
        problems.append(f"cloud {spec.cloud!r}: one of {', '.join(_CLOUDS)} expected")
    if not 0 < len(spec.pool) <= 63 or not 0 < len(spec.region) <= 63:
        problems.append("pool and region must be 1-63 characters")
    if len(spec.zone) > 63 or len(spec.residency_group) > 63:
        problems.append("zone and residency_group must be at most 63 characters")
    if spec.scheduler_address and not _HOST_PORT.match(spec.scheduler_address):
        problems.append("scheduler_address must be host:port, e.g. scheduler.internal:50051")
    addresses = spec.scheduler_addresses
    if not all(_HOST_PORT.match(address) for address in addresses):
        problems.append("scheduler_addresses must each be host:port")
    if len(set(addresses)) != len(addresses):
        problems.append("scheduler_addresses must name each scheduler once")
    if bool(spec.scheduler_address) == bool(addresses):
        problems.append(
            "set scheduler_address (one scheduler) or scheduler_addresses (several),"
            " exactly one of them"
        )
    if spec.temporal_address and not _HOST_PORT.match(spec.temporal_address):
        problems.append("temporal_address must be empty or host:port, e.g. temporal.internal:7233")
    if not spec.temporal_namespace:
        problems.append("temporal_namespace must not be empty")
    problems += _source_problems("token_source", spec.token_source, "the agent token")
    problems += _temporal_problems(spec)
    if spec.gpu_discovery not in ("auto", "nvml", "static"):
        problems.append("gpu_discovery must be auto, nvml or static")
    if spec.gpu_discovery == "static" and not spec.static_gpus:
        problems.append("gpu_discovery is static: set static_gpus to the GPUs of these machines")
    for gpu in spec.static_gpus:
        if not gpu.model or not 0 < gpu.memory_gib <= 1024 or not 1 <= gpu.count <= 64:
            problems.append(f"static_gpus entry {gpu}: model, memory_gib (0, 1024], count 1..64")
    initial, longest = spec.reconnect_initial_backoff_s, spec.reconnect_max_backoff_s
    if not 0 < initial <= 60 or not 0 < longest <= 600:
        problems.append("reconnect backoffs must be in (0, 60] and (0, 600] seconds")
    if spec.reconnect_max_backoff_s < spec.reconnect_initial_backoff_s:
        problems.append("reconnect_max_backoff_s must be at least reconnect_initial_backoff_s")
    if spec.wheel_url and not re.match(r"^https://[^ ]+\.whl$", spec.wheel_url):
        problems.append("wheel_url must be an https:// URL of a .whl file")
    if spec.package_index_url and not spec.package_index_url.startswith("https://"):
        problems.append("package_index_url must be an https:// URL")
    if spec.package_version and not re.match(r"^[0-9][0-9A-Za-z.+!-]*$", spec.package_version):
        problems.append("package_version must be empty or a version such as 0.1.0")
    if spec.wheel_url and spec.package_version:
        problems.append("set either wheel_url or package_version, not both")
    if problems:
        raise InvalidRequestError("; ".join(problems), cloud=spec.cloud)


def _source_problems(name: str, source: TokenSource | None, what: str = "the secret") -> list[str]:
    if source is None:
        return []
    problems: list[str] = []
    if source.kind not in _TOKEN_KINDS:
        problems.append(f"{name}.kind {source.kind!r}: one of {', '.join(_TOKEN_KINDS)}")
    if not source.ref.strip():
        problems.append(f"set {name}.ref to where {what} lives")
    elif source.kind == "file" and not source.ref.startswith("/"):
        problems.append(f"with {name}.kind file, {name}.ref must be an absolute path")
    return problems


def _temporal_problems(spec: BootstrapSpec) -> list[str]:
    cert, key = spec.temporal_client_cert_source, spec.temporal_client_key_source
    problems = _source_problems("temporal_client_cert_source", cert)
    problems += _source_problems("temporal_client_key_source", key)
    problems += _source_problems("temporal_api_key_source", spec.temporal_api_key_source)
    if not re.fullmatch(r"[A-Za-z0-9.-]{0,253}", spec.temporal_server_name):
        problems.append("temporal_server_name must be empty or a DNS name")
    if spec.temporal_ca_pem and "-----BEGIN CERTIFICATE-----" not in spec.temporal_ca_pem:
        problems.append("temporal_ca_pem must be empty or a PEM certificate")
    if (cert is None) != (key is None):
        problems.append(
            "set temporal_client_cert_source and temporal_client_key_source together"
            " (mutual TLS needs both)"
        )
    extras = (spec.temporal_server_name, spec.temporal_ca_pem, spec.temporal_tls, cert, key)
    if not spec.temporal_address and (any(extras) or spec.temporal_api_key_source):
        problems.append("the temporal_* connection settings need temporal_address")
    return problems


def _source_json(source: TokenSource | None) -> dict[str, str] | None:
    return None if source is None else {"kind": source.kind, "ref": source.ref}


def agent_config(spec: BootstrapSpec) -> dict[str, object]:
    """The agent config file as the module writes it to ``/etc/spillway/agent.yaml``."""
    tls: dict[str, object] | None = None
    if spec.scheduler_ca_pem:
        tls = {"ca_file": CA_FILE, "server_name": spec.scheduler_server_name or None}
    temporal: dict[str, object] | None = None
    if spec.temporal_address:
        temporal = {"address": spec.temporal_address, "namespace": spec.temporal_namespace}
    return {
        "agent_id": spec.agent_id,
        "scheduler": {
            "token_file": TOKEN_FILE,
            "tls": tls,
            **(
                {"addresses": list(spec.scheduler_addresses)}
                if spec.scheduler_addresses
                else {"address": spec.scheduler_address}
            ),
        },
        "labels": {
            "pool": spec.pool,
            "provider": spec.cloud,
            "region": spec.region,
            "zone": spec.zone,
            "residency_group": spec.residency_group,
            "instance_id": "",
            "extra": dict(spec.extra_labels),
        },
        "gpus": {
            "discovery": spec.gpu_discovery,
            "static": [
                {"model": gpu.model, "memory_gib": gpu.memory_gib, "count": gpu.count}
                for gpu in spec.static_gpus
            ],
        },
        "reconnect": {
            "initial_backoff_s": spec.reconnect_initial_backoff_s,
            "max_backoff_s": spec.reconnect_max_backoff_s,
        },
        "state_dir": STATE_DIR,
        "temporal": temporal,
    }


def bootstrap_settings(spec: BootstrapSpec) -> dict[str, object]:
    """What ``spillway-boot`` reads on the machine: references to the secrets, never a secret."""
    return {
        "append_instance_id": spec.append_instance_id,
        "identity_client_id": spec.identity_client_id,
        "package": {
            "wheel_url": spec.wheel_url,
            "index_url": spec.package_index_url,
            "version": spec.package_version,
        },
        "install_sglang": spec.install_sglang,
        "scheduler_ca_pem": spec.scheduler_ca_pem,
        "temporal_api_key_source": _source_json(spec.temporal_api_key_source),
        "temporal_ca_pem": spec.temporal_ca_pem,
        "temporal_client_cert_source": _source_json(spec.temporal_client_cert_source),
        "temporal_client_key_source": _source_json(spec.temporal_client_key_source),
        "temporal_server_name": spec.temporal_server_name,
        "temporal_tls": spec.temporal_tls,
        "token_source": _source_json(spec.token_source),
    }


def render_user_data(spec: BootstrapSpec) -> str:
    """The ``#cloud-config`` user data for ``spec``, identical to the module's ``user_data``."""
    check(spec)
    variables: dict[str, str | bool] = {
        "install_packages": bool(spec.system_packages),
        "agent_config": jsonencode(agent_config(spec)),
        "bootstrap_settings": jsonencode(bootstrap_settings(spec)),
        "boot_script": base64.b64encode(read_template_file(BOOT_SCRIPT)).decode("ascii"),
        "system_packages": jsonencode(list(spec.system_packages)),
    }
    text = render_template(read_template_file(TEMPLATE).decode("utf-8"), variables)
    if len(text.encode("utf-8")) > MAX_USER_DATA_BYTES:
        raise InvalidRequestError(
            f"user data is {len(text.encode('utf-8'))} bytes, over {MAX_USER_DATA_BYTES}",
            cloud=spec.cloud,
        )
    return text


def gzip_user_data(user_data: str) -> bytes:
    """``user_data`` gzipped, for AWS; what the ``aws-agent`` module's ``base64gzip`` holds."""
    data = gzip.compress(user_data.encode("utf-8"), compresslevel=9, mtime=0)
    if len(data) > MAX_AWS_USER_DATA_BYTES:
        raise InvalidRequestError(
            f"gzipped user data is {len(data)} bytes, over {MAX_AWS_USER_DATA_BYTES}", cloud="aws"
        )
    return data


def read_template_file(name: str) -> bytes:
    """Bytes of a file in the Terraform module's ``templates/`` directory."""
    return resources.files("providers").joinpath(TEMPLATES_PACKAGE_DIR, name).read_bytes()


# --- the template subset ---------------------------------------------------------------------

_TOKEN = re.compile(r"\$\$\{|%%\{|\$\{|%\{")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_WHITESPACE = " \t\r\n"


def render_template(template: str, variables: Mapping[str, str | bool]) -> str:
    """Render ``template`` like Terraform's ``templatefile`` for the supported subset.

    Supported: ``${name}`` where ``variables[name]`` is a string; ``%{ if name }`` and
    ``%{ endif }`` where ``variables[name]`` is a bool, each optionally closed with ``~}`` (which
    drops the whitespace that follows, newlines included); ``$${`` (a literal ``${``) and ``%%{``
    (a literal ``%{``). Everything else that Terraform treats as template syntax is refused.
    """
    out: list[str] = []
    shown = [True]  # one entry per open %{ if }: whether its body is rendered
    pos = 0
    strip = False

    def emit(text: str) -> None:
        if all(shown):
            out.append(text)

    for match in _TOKEN.finditer(template):
        if match.start() < pos:
            continue
        literal = template[pos : match.start()]
        emit(literal.lstrip(_WHITESPACE) if strip else literal)
        strip = False
        token = match.group()
        if token in ("$${", "%%{"):
            emit(token[1:])
            pos = match.end()
            continue
        line = template.count("\n", 0, match.start()) + 1
        close = template.find("}", match.end())
        if close < 0:
            raise TemplateError(f"template line {line}: unterminated {token}")
        body = template[match.end() : close]
        pos = close + 1
        if body.startswith("~"):
            raise TemplateError(f"template line {line}: a strip marker before the body ({token}~)")
        if token == "${":
            name = body.strip()
            value = _lookup(variables, name, line)
            if not isinstance(value, str):
                raise TemplateError(f"template line {line}: ${{{name}}} must be a string")
            emit(value)
            continue
        strip = body.endswith("~")
        words = body.removesuffix("~").split()
        if words == ["endif"]:
            if len(shown) == 1:
                raise TemplateError(f"template line {line}: endif without if")
            shown.pop()
        elif len(words) == 2 and words[0] == "if":
            value = _lookup(variables, words[1], line)
            if not isinstance(value, bool):
                raise TemplateError(f"template line {line}: %{{ if {words[1]} }} needs a bool")
            shown.append(value)
        else:
            raise TemplateError(
                f"template line {line}: only %{{ if name }} and %{{ endif }} are supported,"
                f" not %{{{body}}}"
            )
    tail = template[pos:]
    emit(tail.lstrip(_WHITESPACE) if strip else tail)
    if len(shown) > 1:
        raise TemplateError("template: %{ if } without %{ endif }")
    return "".join(out)


def _lookup(variables: Mapping[str, str | bool], name: str, line: int) -> str | bool:
    if not _NAME.fullmatch(name):
        raise TemplateError(f"template line {line}: only variable names are supported: {name!r}")
    if name not in variables:
        raise TemplateError(f"template line {line}: unknown variable {name!r}")
    return variables[name]


# --- Terraform's jsonencode ------------------------------------------------------------------

# Terraform 1.0 encodes strings with Go's encoding/json: HTML-sensitive characters and the line
# and paragraph separators are escaped, \b and \f are written as \u0008 and \u000c, and other
# non-ASCII characters are written as they are.
_JSON_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _encode_string(value: str) -> str:
    parts = ['"']
    for char in value:
        escaped = _JSON_ESCAPES.get(char)
        if escaped is not None:
            parts.append(escaped)
        elif ord(char) < 0x20:
            parts.append(f"\\u{ord(char):04x}")
        else:
            parts.append(char)
    parts.append('"')
    return "".join(parts)


def _encode_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise InvalidRequestError(f"{value} cannot be written as JSON")
    if value == int(value):
        return str(int(value))
    return format(Decimal(repr(value)), "f")


def jsonencode(value: object) -> str:
    """``value`` as Terraform's ``jsonencode`` writes it: compact, object keys sorted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _encode_number(value)
    if isinstance(value, str):
        return _encode_string(value)
    if isinstance(value, Mapping):
        items = sorted((str(key), item) for key, item in value.items())
        return "{" + ",".join(f"{_encode_string(k)}:{jsonencode(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(jsonencode(item) for item in value) + "]"
    raise InvalidRequestError(f"cannot encode {type(value).__name__} as JSON")
