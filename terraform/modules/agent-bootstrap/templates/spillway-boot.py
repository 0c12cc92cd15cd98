#!/usr/bin/env python3
"""Boot helper for a Spillway machine (an agent's or the control plane's), run by systemd.

``install`` (systemd, as root, before every start of ``spillway-agent.service``; does nothing
once the agent is installed): create ``/opt/spillway/venv`` and install ``spillway[agent]`` (or
the extras ``bootstrap.json`` names) from the wheel URL or the package index named in
``/etc/spillway/bootstrap.json``.

``install`` also installs SGLang (the ``sglang`` extra) when ``bootstrap.json`` sets
``install_sglang`` and the venv's interpreter cannot ``import sglang``: images that ship SGLang
are left alone.

``prepare`` (systemd, as root, after ``install`` before every start): copy the
agent's bearer token from the file or cloud secret store named in ``bootstrap.json`` to
``/run/spillway/token`` (tmpfs, mode 0400, owned by the agent's user), and write
``/run/spillway/agent.yaml``: ``/etc/spillway/agent.yaml`` completed with this machine's
identity (agent id, instance id, zone) from the cloud's metadata service. When the agent has a
Temporal frontend, its client certificate, client key and API key are fetched the same way
(``/run/spillway/temporal-*``, mode 0400) and the config's ``temporal:`` section is completed:
``tls`` (CA, certificate, key, server name), ``api_key_file`` and ``identity`` (the agent id).

``fetch --part P`` (systemd, as root, before every start of the scheduler or the gateway of a
control-plane machine): write the files ``bootstrap.json``'s ``files.P`` lists into the unit's
runtime directory, each secret fetched by reference the way the agent's token is.

This file is embedded in the cloud-init user data that the ``agent-bootstrap`` and
``control-plane`` Terraform modules and ``providers.bootstrap`` render, so it uses the standard
library only (it runs before Spillway is installed). It must never print, log or persist a
secret (a token, a key, an API key) outside ``/run``, and it must not accept a secret's value
from its settings: only a reference to where the secret lives.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import pwd
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SETTINGS = Path("/etc/spillway/bootstrap.json")
CONFIG = Path("/etc/spillway/agent.yaml")
RUN_DIR = Path("/run/spillway")
VENV = Path("/opt/spillway/venv")
USER = "spillway"
AGENT_ID = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
ATTEMPTS = 6


class BootError(Exception):
    """Something this machine needs is missing; the message says what, never a secret."""


def _http(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> bytes:
    """One HTTP request with retries: metadata and IAM are often not ready at first boot."""
    delay = 1.0
    for attempt in range(ATTEMPTS):
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as exc:
            retryable = exc.code in (403, 404, 429) or exc.code >= 500
            if not retryable or attempt == ATTEMPTS - 1:
                raise BootError(f"{method} {url}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            if attempt == ATTEMPTS - 1:
                raise BootError(f"{method} {url}: {exc}") from exc
        time.sleep(delay)
        delay = min(delay * 2, 15.0)
    raise BootError(f"{method} {url}: no answer")  # pragma: no cover - loop always returns


def _json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


# --- AWS: IMDSv2, and Secrets Manager signed with Signature Version 4 -----------------------

AWS_IMDS = "http://169.254.169.254/latest"


def _aws_imds(path: str) -> str:
    token = _http(
        f"{AWS_IMDS}/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
    ).decode()
    return _http(f"{AWS_IMDS}/{path}", headers={"X-aws-ec2-metadata-token": token}).decode()


def sigv4_headers(
    *,
    host: str,
    region: str,
    service: str,
    target: str,
    body: bytes,
    access_key: str,
    secret_key: str,
    session_token: str | None,
    now: datetime.datetime,
) -> dict[str, str]:
    """Headers for a signed AWS JSON-1.1 POST to ``https://host/`` (Signature Version 4)."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    headers = {
        "content-type": "application/x-amz-json-1.1",
        "host": host,
        "x-amz-date": amz_date,
        "x-amz-target": target,
    }
    if session_token:
        headers["x-amz-security-token"] = session_token
    names = sorted(headers)
    canonical = "\n".join(
        [
            "POST",
            "/",
            "",
            "".join(f"{name}:{headers[name].strip()}\n" for name in names),
            ";".join(names),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return headers


def _aws_secret(arn: str, field: str) -> str:
    parts = arn.split(":")
    if len(parts) < 7 or parts[2] != "secretsmanager":
        raise BootError(f"{field}.ref {arn!r} is not a Secrets Manager secret ARN")
    region = parts[3]
    role = _aws_imds("meta-data/iam/security-credentials/").split()[0]
    creds = json.loads(_aws_imds(f"meta-data/iam/security-credentials/{role}"))
    host = f"secretsmanager.{region}.amazonaws.com"
    body = json.dumps({"SecretId": arn}).encode()
    headers = sigv4_headers(
        host=host,
        region=region,
        service="secretsmanager",
        target="secretsmanager.GetSecretValue",
        body=body,
        access_key=creds["AccessKeyId"],
        secret_key=creds["SecretAccessKey"],
        session_token=creds.get("Token"),
        now=datetime.datetime.now(datetime.UTC),
    )
    answer = _json(_http(f"https://{host}/", method="POST", headers=headers, body=body))
    secret = answer.get("SecretString")
    if not isinstance(secret, str):
        raise BootError(f"secret {arn} has no SecretString")
    return secret


def _aws_identity() -> dict[str, str]:
    return {
        "instance_id": _aws_imds("meta-data/instance-id"),
        "zone": _aws_imds("meta-data/placement/availability-zone"),
    }


# --- GCP: the metadata server and Secret Manager ---------------------------------------------

GCP_METADATA = "http://metadata.google.internal/computeMetadata/v1"


def _gcp_metadata(path: str) -> str:
    return _http(f"{GCP_METADATA}/{path}", headers={"Metadata-Flavor": "Google"}).decode()


def _gcp_secret(name: str, field: str) -> str:
    if not re.match(r"^projects/[^/]+/secrets/[^/]+(/versions/[^/]+)?$", name):
        raise BootError(f"{field}.ref {name!r} is not projects/P/secrets/S[/versions/V]")
    if "/versions/" not in name:
        name += "/versions/latest"
    token = json.loads(_gcp_metadata("instance/service-accounts/default/token"))["access_token"]
    answer = _json(
        _http(
            f"https://secretmanager.googleapis.com/v1/{name}:access",
            headers={"Authorization": f"Bearer {token}"},
        )
    )
    return base64.b64decode(answer["payload"]["data"]).decode("utf-8")


def _gcp_identity() -> dict[str, str]:
    return {
        "instance_id": _gcp_metadata("instance/name"),
        "zone": _gcp_metadata("instance/zone").rsplit("/", 1)[-1],
    }


# --- Azure: IMDS, a managed identity, and Key Vault ------------------------------------------

AZURE_IMDS = "http://169.254.169.254/metadata"


def _azure_secret(url: str, client_id: str, field: str) -> str:
    if not re.match(r"^https://[a-z0-9-]+\.vault\.azure\.net/secrets/[^/?#]+(/[^/?#]+)?$", url):
        raise BootError(f"{field}.ref {url!r} is not https://VAULT.vault.azure.net/secrets/N")
    query = {"api-version": "2018-02-01", "resource": "https://vault.azure.net"}
    if client_id:
        query["client_id"] = client_id
    token = _json(
        _http(
            f"{AZURE_IMDS}/identity/oauth2/token?{urllib.parse.urlencode(query)}",
            headers={"Metadata": "true"},
        )
    )["access_token"]
    answer = _json(_http(f"{url}?api-version=7.4", headers={"Authorization": f"Bearer {token}"}))
    return str(answer["value"])


def _azure_identity() -> dict[str, str]:
    compute = _json(
        _http(
            f"{AZURE_IMDS}/instance/compute?api-version=2021-02-01",
            headers={"Metadata": "true"},
        )
    )
    zone = str(compute.get("zone") or "")
    return {
        "instance_id": str(compute["name"]),
        "zone": f"{compute['location']}-{zone}" if zone else "",
    }


# --- the two commands ------------------------------------------------------------------------


def fetch_secret(settings: dict[str, Any], field: str, what: str) -> str:
    """The secret ``settings[field]`` refers to (a file or a cloud secret store), stripped.

    ``what`` names it in errors ("the agent token"); no error ever contains the value.
    """
    source = settings[field]
    kind, ref = source["kind"], source["ref"]
    if kind == "file":
        try:
            value = Path(ref).read_text(encoding="utf-8")
        except OSError as exc:
            raise BootError(f"cannot read {what} file {ref}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise BootError(f"{what} file {ref} is not UTF-8 text") from exc
    elif kind == "aws-secretsmanager":
        value = _aws_secret(ref, field)
    elif kind == "gcp-secretmanager":
        value = _gcp_secret(ref, field)
    elif kind == "azure-keyvault":
        value = _azure_secret(ref, settings.get("identity_client_id") or "", field)
    else:
        raise BootError(f"{field}.kind {kind!r} is not supported")
    return value.strip()


def read_word(settings: dict[str, Any], field: str, what: str) -> str:
    """A one-word secret (a bearer token, an API key)."""
    value = fetch_secret(settings, field, what)
    if not value or any(ch.isspace() for ch in value):
        source = settings[field]
        raise BootError(f"{what} in {source['kind']} {source['ref']} is empty or not a single word")
    return value


def read_pem(settings: dict[str, Any], field: str, what: str) -> str:
    """A PEM document (a certificate, a private key)."""
    value = fetch_secret(settings, field, what)
    if not value.startswith("-----BEGIN ") or "-----END " not in value:
        source = settings[field]
        raise BootError(f"{what} in {source['kind']} {source['ref']} is not PEM (-----BEGIN ...)")
    return value + "\n"


def read_token(settings: dict[str, Any]) -> str:
    """The agent token from wherever ``settings['token_source']`` says it lives."""
    return read_word(settings, "token_source", "the agent token")


def machine_identity(cloud: str) -> dict[str, str]:
    """This machine's instance id and zone, from the cloud's metadata service."""
    if cloud == "aws":
        return _aws_identity()
    if cloud == "gcp":
        return _gcp_identity()
    if cloud == "azure":
        return _azure_identity()
    return {}


def agent_id_for(base: str, instance_id: str) -> str:
    """``base-instance`` in the agent id alphabet, at most 63 characters."""
    suffix = re.sub(r"[^a-z0-9._-]+", "-", instance_id.lower()).strip("._-")
    agent_id = f"{base}-{suffix}"[:63].rstrip("._-") if suffix else base
    if not AGENT_ID.match(agent_id):
        raise BootError(f"cannot make an agent id from {base!r} and {instance_id!r}")
    return agent_id


def complete_config(
    config: dict[str, Any], settings: dict[str, Any], identity: dict[str, str], token_file: Path
) -> dict[str, Any]:
    """The agent config with this machine's identity and the runtime token file filled in."""
    config = json.loads(json.dumps(config))
    labels = config["labels"]
    if identity.get("instance_id"):
        labels["instance_id"] = identity["instance_id"]
        if settings.get("append_instance_id"):
            config["agent_id"] = agent_id_for(config["agent_id"], identity["instance_id"])
    if identity.get("zone") and not labels.get("zone"):
        labels["zone"] = identity["zone"]
    config["scheduler"]["token_file"] = str(token_file)
    return config


def _write_private(path: Path, text: str, mode: int, uid: int, gid: int) -> None:
    """Write ``path`` atomically; it is never readable by anyone but root and ``uid``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# The Temporal client files fetched by reference: (settings key, file in the run dir, what).
TEMPORAL_FILES = (
    ("temporal_client_cert_source", "temporal-client.pem", "the Temporal client certificate"),
    ("temporal_client_key_source", "temporal-client.key", "the Temporal client key"),
    ("temporal_api_key_source", "temporal-api-key", "the Temporal API key"),
)


def fetch_temporal_files(settings: dict[str, Any]) -> dict[str, str]:
    """File name in the run directory -> content, for the Temporal settings that are set."""
    files: dict[str, str] = {}
    if settings.get("temporal_ca_pem"):
        files["temporal-ca.pem"] = settings["temporal_ca_pem"]
    for key, name, what in TEMPORAL_FILES:
        if not settings.get(key):
            continue
        if key == "temporal_api_key_source":
            files[name] = read_word(settings, key, what) + "\n"
        else:
            files[name] = read_pem(settings, key, what)
    return files


def temporal_section(
    temporal: dict[str, Any], settings: dict[str, Any], run_dir: Path, agent_id: str
) -> dict[str, Any]:
    """The agent config's ``temporal:`` section pointing at the files in ``run_dir``."""
    section = dict(temporal)
    tls: dict[str, str] = {}
    if settings.get("temporal_ca_pem"):
        tls["ca_file"] = str(run_dir / "temporal-ca.pem")
    if settings.get("temporal_client_cert_source"):
        tls["cert_file"] = str(run_dir / "temporal-client.pem")
        tls["key_file"] = str(run_dir / "temporal-client.key")
    if settings.get("temporal_server_name"):
        tls["server_name"] = settings["temporal_server_name"]
    if tls or settings.get("temporal_tls"):
        section["tls"] = tls
    if settings.get("temporal_api_key_source"):
        section["api_key_file"] = str(run_dir / "temporal-api-key")
    section["identity"] = agent_id
    return section


def prepare(settings_path: Path, config_path: Path, run_dir: Path, user: str) -> None:
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    config = json.loads(config_path.read_text(encoding="utf-8"))
    entry = pwd.getpwnam(user)
    uid, gid = entry.pw_uid, entry.pw_gid
    run_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    # Every secret is fetched before anything is written: a missing one leaves no config.
    token = read_token(settings)
    temporal_files = fetch_temporal_files(settings) if config.get("temporal") else {}
    token_file = run_dir / "token"
    _write_private(token_file, token + "\n", 0o400, uid, gid)
    if settings.get("scheduler_ca_pem"):
        ca_file = run_dir / "scheduler-ca.pem"
        _write_private(ca_file, settings["scheduler_ca_pem"], 0o444, uid, gid)
    for name, content in temporal_files.items():
        mode = 0o444 if name == "temporal-ca.pem" else 0o400
        _write_private(run_dir / name, content, mode, uid, gid)
    identity = machine_identity(config["labels"]["provider"])
    complete = complete_config(config, settings, identity, token_file)
    if complete.get("temporal"):
        complete["temporal"] = temporal_section(
            complete["temporal"], settings, run_dir, complete["agent_id"]
        )
    text = json.dumps(complete, indent=2, sort_keys=True) + "\n"
    _write_private(run_dir / "agent.yaml", text, 0o440, uid, gid)


# --- the control plane's secrets ------------------------------------------------------------

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


_ENV_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def check_environment(text: str, where: str) -> None:
    """Refuse an environment file systemd would misread: NAME=value lines and # comments."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#") and not _ENV_LINE.match(line):
            raise BootError(f"{where}: line {number} is not NAME=value")


def fetch_files(settings: dict[str, Any], part: str, run_dir: Path, user: str) -> list[Path]:
    """Write the files ``settings['files'][part]`` lists into ``run_dir`` (the unit's tmpfs).

    Each entry is ``{name, content}`` for public text (a CA certificate; mode 0444) or
    ``{name, field, what, format, source}`` for a secret fetched by reference like the agent's
    token (mode 0400; ``format``: ``word``, ``pem``, ``text`` or ``env``, an environment file).
    Every secret is fetched before any file is written.
    """
    entries = settings["files"][part]
    entry = pwd.getpwnam(user)
    contents: list[tuple[str, str, int]] = []
    for item in entries:
        name = item["name"]
        if not _FILE_NAME.match(name):
            raise BootError(f"files.{part}: {name!r} is not a plain file name")
        if "content" in item:
            contents.append((name, item["content"], 0o444))
            continue
        field, what, form = item["field"], item["what"], item["format"]
        source = item["source"]
        where = f"{what} in {source['kind']} {source['ref']}"
        reference = {field: source, "identity_client_id": settings.get("identity_client_id")}
        if form == "word":
            value = read_word(reference, field, what) + "\n"
        elif form == "pem":
            value = read_pem(reference, field, what)
        elif form in ("text", "env"):
            value = fetch_secret(reference, field, what)
            if not value:
                raise BootError(f"{where} is empty")
            if form == "env":
                check_environment(value, where)
            value += "\n"
        else:
            raise BootError(f"files.{part}: format {form!r} is not word, pem, text or env")
        contents.append((name, value, 0o400))
    run_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    written: list[Path] = []
    for name, value, mode in contents:
        _write_private(run_dir / name, value, mode, entry.pw_uid, entry.pw_gid)
        written.append(run_dir / name)
    return written


def pip_command(package: dict[str, str], venv: Path, extras: str = "agent") -> list[str]:
    """The pip command line that installs ``spillway[extras]`` as ``package`` says."""
    requirement = f"spillway[{extras}]"
    if package.get("wheel_url"):
        requirement = f"spillway[{extras}] @ {package['wheel_url']}"
    elif package.get("version"):
        requirement = f"spillway[{extras}]=={package['version']}"
    command = [str(venv / "bin" / "pip"), "install", "--no-input", "--upgrade"]
    if package.get("index_url"):
        command += ["--index-url", package["index_url"]]
    return [*command, requirement]


def importable(venv: Path, module: str) -> bool:
    """Whether the venv's interpreter finds ``module`` (found, not imported: SGLang is slow)."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], check=False)
    return done.returncode == 0


def install(settings_path: Path, venv: Path) -> None:
    """Install the agent once; with ``install_sglang``, SGLang too unless the venv finds it.

    With ``install_sglang`` the venv sees the system's site-packages, so an image that ships
    SGLang keeps its own build (its CUDA wheels) and nothing is downloaded.
    """
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    want_sglang = bool(settings.get("install_sglang"))
    if (venv / "bin" / "spillway").exists() and not want_sglang:
        return
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Units that share the venv (the scheduler's and the gateway's) install one at a time.
    with open(venv.parent / ".spillway-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _install_locked(settings, venv, want_sglang)


def _install_locked(settings: dict[str, Any], venv: Path, want_sglang: bool) -> None:
    installed = (venv / "bin" / "spillway").exists()
    if installed and not want_sglang:
        return
    if not (venv / "bin" / "python").exists():
        create = [sys.executable, "-m", "venv", str(venv)]
        if want_sglang:
            create.insert(3, "--system-site-packages")
        subprocess.run(create, check=True)
    base = settings.get("extras") or "agent"
    extras = base
    if want_sglang and not importable(venv, "sglang"):
        extras = f"{base},sglang"
    if installed and extras == base:
        return
    command = pip_command(settings["package"], venv, extras)
    delay = 5.0
    for attempt in range(ATTEMPTS):
        if subprocess.run(command, check=False).returncode == 0:
            return
        if attempt < ATTEMPTS - 1:
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
    raise BootError(f"pip could not install {command[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spillway-boot", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["install", "prepare", "fetch"])
    parser.add_argument("--part", default="", help="fetch: which list of files (scheduler, ...)")
    parser.add_argument("--settings", type=Path, default=SETTINGS)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--user", default=USER)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install(args.settings, args.venv)
        elif args.command == "fetch":
            settings = json.loads(args.settings.read_text(encoding="utf-8"))
            fetch_files(settings, args.part, args.run_dir, args.user)
        else:
            prepare(args.settings, args.config, args.run_dir, args.user)
    except (BootError, OSError, KeyError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"spillway-boot {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
