"""Checking a policy file: every problem at once, as ``FILE:LINE: FIELD: message``.

Two stages find the problems: the schema (types, ranges, one model at a time, in
:mod:`decisions.policy`) and then the checks that need several fields or the catalog (unknown
SKU, a residency group where nothing sells the SKU, a spillover provider without credentials,
a managed endpoint outside the lock, a queue-age threshold the queue's timeout would never
let a request reach). The second stage runs on every part that passed the
first, so one typo does not hide the other mistakes.

This module does no I/O beyond reading the policy file itself and must not call any cloud API.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common.configfile import ConfigError, describe_error, line_of, read_yaml_mapping
from decisions.policy import (
    UNLOCKED,
    Credentials,
    Deployment,
    Lock,
    Policy,
    ResidencyGroup,
    Strict,
    group_lock,
    looks_like_secret,
)
from providers.catalog import Catalog, OfferRequest, default_catalog
from providers.errors import ProviderError

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


def _check_managed(
    at: tuple[str | int, ...],
    dep: Deployment,
    groups: Mapping[str, ResidencyGroup],
    catalog: Catalog,
) -> list[Problem]:
    """Managed endpoints: unique names, and inside the lock (one outside could never be used)."""
    problems: list[Problem] = []
    name = dep.spillover.residency
    lock = group_lock(name, groups.get(name), catalog) if name is not None else None
    seen: set[str] = set()
    for index, endpoint in enumerate(dep.managed):
        where = (*at, "managed", index)
        if endpoint.name in seen:
            problems.append(Problem((*where, "name"), f"{endpoint.name!r} is listed twice"))
        seen.add(endpoint.name)
        if lock is not None and not lock.allows_group(endpoint.residency_group):
            problems.append(
                Problem(
                    (*where, "residency_group"),
                    f"{endpoint.residency_group!r} is outside the deployment's residency lock "
                    f"{name!r}: the gateway would never send it a request",
                )
            )
    return problems


def _check_reaction(at: tuple[str | int, ...], dep: Deployment, lock: Lock | None) -> list[Problem]:
    """The SLO against the queue that measures it, and the cost model against itself."""
    problems: list[Problem] = []
    slo, timeout = dep.slo, dep.gateway.queue_timeout_s
    if slo.saturated_after_s >= timeout:
        problems.append(
            Problem(
                (*at, "slo", "saturated_queue_age"),
                f"{slo.saturated_queue_age:g} x ttft_s {slo.ttft_s:g}s = "
                f"{slo.saturated_after_s:g}s is not below gateway.queue_timeout_s "
                f"({timeout:g}s): requests time out before the queue's age says saturated "
                "(the deployment still scales up at once when requests wait with no room)",
                note=True,
            )
        )
    costs = dep.autoscaling.costs
    inside = [e for e in dep.managed if lock is None or lock.allows_group(e.residency_group)]
    if inside and dep.spillover.enabled and costs.cold_start_s >= costs.expected_episode_s:
        problems.append(
            Problem(
                (*at, "autoscaling", "costs", "expected_episode_s"),
                f"an episode expected to last {costs.expected_episode_s:g}s is over before a "
                f"replica's {costs.cold_start_s:g}s cold start: overflow stays on "
                f"{inside[0].name} (only a saturated queue rents) until longer episodes are seen",
                note=True,
            )
        )
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
        problems += _check_managed(at, dep, groups, catalog)
        residency = dep.spillover.residency
        problems += _check_reaction(
            at,
            dep,
            group_lock(residency, groups.get(residency), catalog) if residency else None,
        )
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
            lock = group_lock(group_name, groups.get(group_name), catalog)
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
