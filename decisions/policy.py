"""The policy file: what runs where, what may spill to which clouds, and at what cost.

An operator writes one YAML file (``examples/policy.yaml`` documents every field). This module
holds its pydantic models (``extra="forbid"``: a misspelt field is an error, never ignored), the
checks across fields and against the GPU catalog, and :func:`check_policy`, which reports every
problem of a file at once as ``FILE:LINE: FIELD: message``.

Two stages find the problems: the schema (types, ranges, one model at a time) and then the
checks that need several fields or the catalog (unknown SKU, a residency group where nothing
sells the SKU, a spillover provider without credentials). The second stage runs on every part
that passed the first, so one typo does not hide the other mistakes.

Secrets never belong here: credentials are referenced by environment variable name, file path or
profile name, and anything that looks like a key or password is refused. This module does no I/O
beyond reading the policy file itself and must not call any cloud API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.configfile import ConfigError, describe_error, line_of, read_yaml_mapping
from providers.catalog import CLOUDS, Catalog, OfferRequest, default_catalog
from providers.errors import ProviderError

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WEIGHTS = re.compile(r"^(s3|gs|az|https?|file)://\S+$|^/\S*$")

Signal = Literal["queued_per_replica", "running_per_replica", "kv_cache_usage"]
ProviderName = Literal["aws", "gcp", "azure"]

#: Values that are secrets, whatever field they sit in.
_SECRET_VALUES = (
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\"private_key\"\s*:"), "a service-account key"),
    (re.compile(r"\b(ghp|gho|github_pat|xox[abp]|sk)[-_][A-Za-z0-9_-]{16,}"), "an API token"),
    (re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|sig)=[A-Za-z0-9%+/=]{16,}"), "a key"),
)
#: Field names under ``credentials`` that would hold a secret itself.
_SECRET_KEYS = re.compile(
    r"(?i)(secret|password|passwd|token|private_key|access_key|account_key|api_key|^key$)"
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def looks_like_secret(value: str) -> str | None:
    """What kind of secret ``value`` looks like, or None."""
    for pattern, what in _SECRET_VALUES:
        if pattern.search(value):
            return what
    return None


class CredentialRef(Strict):
    """Where a provider's credentials are found. Never the secret itself."""

    profile: str | None = Field(
        default=None, description="Named profile (AWS shared config, Azure CLI profile)."
    )
    file: Path | None = Field(
        default=None, description="Path to a credentials file (GCP service-account JSON, ...)."
    )
    env: list[str] = Field(
        default_factory=list,
        description="Names of environment variables that hold the credentials.",
    )
    project: str | None = Field(default=None, description="GCP project id (not a secret).")
    subscription_id: str | None = Field(
        default=None, description="Azure subscription id (not a secret)."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            inline = sorted(str(k) for k in data if _SECRET_KEYS.search(str(k)))
            if inline:
                raise ValueError(
                    f"{', '.join(inline)}: secrets may not be written in the policy file; "
                    "reference them instead with env: [VARIABLE_NAME], file: PATH or "
                    "profile: NAME"
                )
        return data

    @field_validator("env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _ENV_NAME.match(name):
                raise ValueError(
                    "expected names of environment variables (letters, digits, '_'), not "
                    "their values; a secret must never be written in the policy file"
                )
        return names

    @model_validator(mode="after")
    def _something(self) -> CredentialRef:
        if self.profile is None and self.file is None and not self.env:
            raise ValueError("say where the credentials are: profile, file or env")
        return self


class Credentials(Strict):
    aws: CredentialRef | None = None
    gcp: CredentialRef | None = None
    azure: CredentialRef | None = None

    def configured(self) -> list[str]:
        return [c for c in CLOUDS if getattr(self, c) is not None]


class ResidencyGroup(Strict):
    """A named set of regions per cloud. Reserved agents belong when their label says so."""

    aws: list[str] = Field(default_factory=list)
    gcp: list[str] = Field(default_factory=list)
    azure: list[str] = Field(default_factory=list)
    agent_labels: list[str] | None = Field(
        default=None,
        description="residency_group labels of reserved agents inside this group "
        "(default: the group's own name).",
    )

    def regions(self) -> dict[str, list[str]]:
        return {"aws": self.aws, "gcp": self.gcp, "azure": self.azure}


class Autoscaling(Strict):
    signal: Signal = Field(
        default="queued_per_replica",
        description="Load per replica that drives scaling: queued or running requests per "
        "healthy replica, or KV-cache use (0..1).",
    )
    target: float = Field(gt=0, description="Scale up when the signal stays above this.")
    scale_down_below: float | None = Field(
        default=None,
        ge=0,
        description="Scale down only when the signal stays below this (default: half the "
        "target). The gap between the two is the hysteresis band.",
    )
    max_step_up: int = Field(default=2, ge=1, description="Replicas added per decision, at most.")
    max_step_down: int = Field(
        default=1, ge=1, description="Replicas removed per decision, at most."
    )

    @property
    def low_water(self) -> float:
        return self.target / 2 if self.scale_down_below is None else self.scale_down_below

    @model_validator(mode="after")
    def _band(self) -> Autoscaling:
        if self.scale_down_below is not None and self.scale_down_below >= self.target:
            raise ValueError(
                f"scale_down_below ({self.scale_down_below:g}) must be below target "
                f"({self.target:g}), or replicas would flap"
            )
        if self.signal == "kv_cache_usage" and self.target > 1:
            raise ValueError(f"kv_cache_usage is a share from 0 to 1; target {self.target:g}")
        return self


class Spillover(Strict):
    enabled: bool = Field(default=False, description="May this deployment rent cloud GPUs?")
    providers: list[ProviderName] = Field(
        default_factory=list,
        description="Clouds it may rent from (default: every cloud under credentials).",
    )
    residency: str | None = Field(
        default=None,
        description="Residency group the replicas are locked to (a group of this file or of "
        "the catalog: eu, us, uk, ...). Unset: no lock.",
    )
    max_spilled_replicas: int = Field(default=0, ge=0)
    max_usd_per_hour: float | None = Field(
        default=None, gt=0, description="Cap on the hourly list price of all rented machines."
    )
    scale_up_window_s: float = Field(
        default=60, gt=0, description="The signal must stay over target this long to scale up."
    )
    cool_down_s: float = Field(
        default=600, gt=0, description="The signal must stay low this long to scale down."
    )


class Deployment(Strict):
    model: str = Field(min_length=1, description="Served model name.")
    weights: str = Field(description="s3://, gs://, az://, https:// URI or absolute path.")
    runtime: Literal["sglang", "simulated"] = "sglang"
    runtime_args: list[str] = Field(default_factory=list)
    sku: str = Field(description="Fungible GPU SKU from the catalog, e.g. H100-80GB.")
    gpus: int = Field(ge=1, le=64, description="GPUs per replica, all on one machine.")
    pools: list[str] = Field(default_factory=list, description="Reserved pools that serve it.")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(ge=1)
    autoscaling: Autoscaling
    spillover: Spillover = Field(default_factory=Spillover)

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if not _WEIGHTS.match(value):
            raise ValueError("expected s3://, gs://, az://, http(s)://, file:// or /absolute/path")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> Deployment:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


class Policy(Strict):
    residency_groups: dict[str, ResidencyGroup] = Field(default_factory=dict)
    credentials: Credentials = Field(default_factory=Credentials)
    deployments: dict[str, Deployment]

    @field_validator("deployments", "residency_groups")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(
                    f"name {name!r}: lower case letters, digits, '.', '_', '-' (at most 63)"
                )
        return value


# -- the lock, resolved -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lock:
    """Where a deployment's replicas may run. ``regions`` None means no lock."""

    name: str | None
    #: (cloud, region) pairs replicas may be rented in; None: anywhere.
    regions: frozenset[tuple[str, str]] | None
    #: residency_group labels of reserved agents inside the lock; None: any agent.
    agent_labels: frozenset[str] | None

    def allows_region(self, cloud: str, region: str) -> bool:
        return self.regions is None or (cloud, region) in self.regions

    def allows_agent(self, residency_label: str) -> bool:
        return self.agent_labels is None or residency_label in self.agent_labels


UNLOCKED = Lock(None, None, None)


def resolve_lock(policy: Policy, deployment: Deployment, catalog: Catalog) -> Lock:
    """The lock of ``deployment``: its spillover residency group as regions per cloud."""
    name = deployment.spillover.residency
    if name is None:
        return UNLOCKED
    return _group_lock(name, policy.residency_groups.get(name), catalog)


def _group_lock(name: str, group: ResidencyGroup | None, catalog: Catalog) -> Lock:
    if group is not None:
        pairs = frozenset((c, r) for c, regions in group.regions().items() for r in regions)
        labels = frozenset(group.agent_labels if group.agent_labels is not None else [name])
        return Lock(name, pairs, labels)
    pairs = frozenset(
        (c.cloud, r.name)
        for c in catalog.clouds.values()
        for r in c.regions.values()
        if r.residency == name
    )
    return Lock(name, pairs, frozenset({name}))


def spill_providers(policy: Policy, deployment: Deployment) -> list[str]:
    """Clouds ``deployment`` may rent from: its list, or every cloud with credentials."""
    return list(deployment.spillover.providers) or policy.credentials.configured()


# -- checks across fields -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding. ``loc`` is the field path; notes do not make the policy invalid."""

    loc: tuple[str | int, ...]
    message: str
    note: bool = False


def _walk_strings(
    data: Any, loc: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(data, str):
        yield loc, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _walk_strings(value, (*loc, str(key)))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _walk_strings(value, (*loc, index))


def cross_check(
    data: Mapping[str, Any], catalog: Catalog
) -> tuple[Policy | None, list[Problem], list[dict[str, Any]]]:
    """Validate ``data``; return the policy (None when invalid), every problem and note.

    The third element holds pydantic's raw errors for the schema stage (for line numbers).
    """
    problems: list[Problem] = []
    for loc, value in _walk_strings(dict(data)):
        what = looks_like_secret(value)
        if what:
            problems.append(
                Problem(
                    loc,
                    f"this looks like {what}; secrets may not be written in the policy file "
                    "(reference an environment variable, a file or a profile under credentials)",
                )
            )
    schema_errors: list[dict[str, Any]] = []
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        schema_errors = [dict(e) for e in exc.errors()]
    # Parse what can be parsed on its own, so later checks see every valid part.
    groups = _parts(data.get("residency_groups"), ResidencyGroup)
    deployments = _parts(data.get("deployments"), Deployment)
    try:
        credentials = Credentials.model_validate(data.get("credentials") or {})
    except ValidationError:
        credentials = Credentials()
    problems += _check_groups(groups, catalog)
    problems += _check_deployments(groups, deployments, credentials, catalog)
    return (
        (policy if not problems or all(p.note for p in problems) else None),
        problems,
        schema_errors,
    )


def _parts(raw: Any, model: type[Strict]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    if isinstance(raw, dict):
        for name, value in raw.items():
            try:
                parsed[str(name)] = model.model_validate(value)
            except ValidationError as exc:
                # Unknown fields are reported by the schema stage; check the rest all the same.
                extra = {e["loc"][0] for e in exc.errors() if e["type"] == "extra_forbidden"}
                if not extra or not isinstance(value, dict):
                    continue
                trimmed = {k: v for k, v in value.items() if k not in extra}
                try:
                    parsed[str(name)] = model.model_validate(trimmed)
                except ValidationError:
                    continue
    return parsed


def _check_groups(groups: Mapping[str, ResidencyGroup], catalog: Catalog) -> list[Problem]:
    problems: list[Problem] = []
    catalog_groups = set(catalog.residency_groups())
    for name, group in groups.items():
        for cloud, regions in group.regions().items():
            known = catalog.clouds.get(cloud)
            for index, region in enumerate(regions):
                loc = ("residency_groups", name, cloud, index)
                if known is None or region not in known.regions:
                    listed = ", ".join(known.regions) if known else "none"
                    problems.append(
                        Problem(
                            loc, f"{cloud} has no region {region!r}; the catalog lists {listed}"
                        )
                    )
                    continue
                actual = known.regions[region].residency
                if name in catalog_groups and actual != name:
                    problems.append(
                        Problem(
                            loc,
                            f"{cloud} {region} is in the catalog's residency group {actual!r}, "
                            f"not {name!r}; a group named like a catalog group may only narrow "
                            "it (give the group another name to mix regions)",
                        )
                    )
        if not any(group.regions().values()):
            problems.append(Problem(("residency_groups", name), "the group lists no region"))
    return problems


def _check_deployments(
    groups: Mapping[str, ResidencyGroup],
    deployments: Mapping[str, Deployment],
    credentials: Credentials,
    catalog: Catalog,
) -> list[Problem]:
    problems: list[Problem] = []
    pool_users: dict[str, list[str]] = {}
    for name, dep in deployments.items():
        at: tuple[str | int, ...] = ("deployments", name)
        for pool in dep.pools:
            pool_users.setdefault(pool, []).append(name)
        if dep.sku not in catalog.skus:
            problems.append(
                Problem(
                    (*at, "sku"),
                    f"unknown SKU {dep.sku!r}; the catalog has {', '.join(sorted(catalog.skus))}",
                )
            )
            continue
        spill = dep.spillover
        if not dep.pools and not spill.enabled:
            problems.append(
                Problem(at, "no reserved pool serves it and spillover is off: it can never run")
            )
        if not spill.enabled:
            continue
        if spill.max_spilled_replicas == 0:
            problems.append(
                Problem(
                    (*at, "spillover", "max_spilled_replicas"),
                    "spillover is enabled but max_spilled_replicas is 0: nothing can spill",
                )
            )
        providers = list(spill.providers) or credentials.configured()
        if not providers:
            problems.append(
                Problem(
                    (*at, "spillover", "providers"),
                    "spillover is enabled but no provider is allowed and no credentials are "
                    "configured; add credentials.aws, .gcp or .azure",
                )
            )
            continue
        for index, cloud in enumerate(spill.providers):
            if getattr(credentials, cloud) is None:
                problems.append(
                    Problem(
                        (*at, "spillover", "providers", index),
                        f"no credentials for {cloud}; add credentials.{cloud}",
                    )
                )
        counts = catalog.gpu_counts(dep.sku)
        if dep.gpus not in counts:
            problems.append(
                Problem(
                    (*at, "gpus"),
                    f"clouds sell {dep.sku} in machines of {', '.join(map(str, counts))} GPUs; "
                    f"a spilled replica of {dep.gpus} must fit one machine",
                )
            )
            continue
        group_name = spill.residency
        lock = UNLOCKED
        if group_name is not None:
            if group_name not in groups and group_name not in catalog.residency_groups():
                problems.append(
                    Problem(
                        (*at, "spillover", "residency"),
                        f"unknown residency group {group_name!r}; this file defines "
                        f"{', '.join(sorted(groups)) or 'none'} and the catalog has "
                        f"{', '.join(catalog.residency_groups())}",
                    )
                )
                continue
            lock = _group_lock(group_name, groups.get(group_name), catalog)
        try:
            offers = catalog.offers(OfferRequest(dep.sku, dep.gpus, clouds=frozenset(providers)))
        except ProviderError as exc:
            problems.append(Problem((*at, "spillover"), str(exc)))
            continue
        inside = [o for o in offers if lock.allows_region(o.cloud, o.region)]
        if not inside:
            where = f"residency group {group_name!r}" if group_name else "any region"
            sold = sorted({o.residency for o in offers})
            problems.append(
                Problem(
                    (*at, "spillover", "residency" if group_name else "providers"),
                    f"no region of {where} sells {dep.gpus}x {dep.sku} on "
                    f"{', '.join(providers)}; it is sold there in residency groups "
                    f"{', '.join(sold) or 'none'}. Nothing would ever be placed outside the "
                    "lock, so this deployment could never spill",
                )
            )
        elif spill.max_usd_per_hour is not None and inside[0].usd_per_hour > spill.max_usd_per_hour:
            problems.append(
                Problem(
                    (*at, "spillover", "max_usd_per_hour"),
                    f"${spill.max_usd_per_hour:g}/h is below the cheapest allowed offer "
                    f"(${inside[0].usd_per_hour:g}/h, {inside[0].cloud} {inside[0].region}): "
                    "nothing could ever spill",
                )
            )
    for pool, users in pool_users.items():
        if len(users) > 1:
            problems.append(
                Problem(
                    ("deployments", users[1], "pools"),
                    f"pool {pool!r} serves {', '.join(users)}: they share its free GPUs, "
                    "handed out in the order the deployments appear in this file",
                    note=True,
                )
            )
    return problems


# -- files --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    policy: Policy | None
    errors: list[str]
    notes: list[str]


def check_policy(path: Path | str, catalog: Catalog | None = None) -> CheckResult:
    """Every problem of the policy file at ``path``, as ``FILE:LINE: FIELD: message`` lines."""
    catalog = catalog or default_catalog()
    path = Path(path)
    try:
        root, data = read_yaml_mapping(path)
    except ConfigError as exc:
        return CheckResult(None, exc.problems, [])
    policy, problems, schema_errors = cross_check(data, catalog)
    errors = [describe_error(path, root, err) for err in schema_errors]
    notes: list[str] = []
    for problem in problems:
        loc = tuple(str(part) for part in problem.loc)
        line = line_of(root, loc)
        where = f"{path}:{line}" if line is not None else str(path)
        text_line = f"{where}: {'.'.join(loc) or '(top level)'}: {problem.message}"
        (notes if problem.note else errors).append(text_line)
    errors.sort(key=_line_key)
    return CheckResult(policy if not errors else None, errors, notes)


def _line_key(message: str) -> tuple[int, str]:
    parts = message.split(":", 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0, message)


def load_policy(path: Path | str, catalog: Catalog | None = None) -> Policy:
    """The valid policy at ``path``; :class:`ConfigError` listing every problem otherwise."""
    result = check_policy(path, catalog)
    if result.policy is None:
        raise ConfigError(path, result.errors)
    return result.policy


def policy_schema() -> dict[str, Any]:
    """JSON Schema of the policy file, for editors."""
    schema = Policy.model_json_schema()
    schema["title"] = "Spillway policy"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
