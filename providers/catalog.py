"""The fungible GPU SKU catalog: reads the data files in ``providers/data/`` and ranks offers.

The catalog answers "who sells 8x H100-80GB where, and for how much": every (cloud, instance
type, region) that supplies the SKU in exactly the asked GPU count, filtered by residency group
and allowed regions, cheapest first. Prices are list prices with the date they were taken; they
are data, refreshed by editing the files (or ``scripts/refresh_aws_catalog.py``), never code.

This module must not call any cloud API and must not import a cloud SDK.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.resources
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from providers.errors import Cloud, ProviderError, UnknownRegionError, UnknownSkuError

CLOUDS: tuple[Cloud, ...] = ("aws", "gcp", "azure")
_SKU_REQUEST = re.compile(r"^(?P<sku>[A-Za-z0-9][A-Za-z0-9._-]*)(?::(?P<gpus>\d+))?$")


class CatalogError(ProviderError):
    """A catalog data file is malformed or inconsistent (a bug in the data, not in a request)."""


@dataclass(frozen=True)
class Sku:
    name: str
    gpu_model: str
    memory_gib: int


@dataclass(frozen=True)
class Region:
    cloud: Cloud
    name: str
    residency: str
    #: Zones of the region; ``("",)`` for a region without zones (regional placement).
    zones: tuple[str, ...]


@dataclass(frozen=True)
class InstanceType:
    cloud: Cloud
    name: str
    sku: str
    gpus: int
    gpu_memory_gib: int
    vcpus: int
    ram_gib: int
    #: region -> on-demand list price, USD per hour.
    prices: Mapping[str, float]
    #: region -> zones, where fewer than all zones of the region offer the type.
    zones: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Offer:
    """One way to get the asked GPUs: an instance type in a region, with its list price."""

    cloud: Cloud
    instance_type: str
    sku: str
    gpus: int
    gpu_memory_gib: int
    vcpus: int
    ram_gib: int
    region: str
    residency: str
    #: Zones to try, in order, already without those the capacity memory skips.
    zones: tuple[str, ...]
    usd_per_hour: float
    priced_on: dt.date

    @property
    def usd_per_gpu_hour(self) -> float:
        return self.usd_per_hour / self.gpus


@dataclass(frozen=True)
class OfferRequest:
    """What an operator or the placement code asks for: ``gpus`` x ``sku``, and where."""

    sku: str
    gpus: int
    #: Clouds to consider; empty means all.
    clouds: frozenset[str] = frozenset()
    #: Residency groups the data may go to (eu, us, ...); empty means any.
    residency: frozenset[str] = frozenset()
    #: Regions the deployment is locked to; None means no lock beyond ``residency``.
    allowed_regions: frozenset[str] | None = None
    #: Skip offers that are at least this dear (None: no limit).
    max_usd_per_hour: float | None = None


def parse_sku_request(text: str) -> tuple[str, int]:
    """``"H100-80GB:8"`` -> ``("H100-80GB", 8)``; without ``:N`` the count is 1."""
    match = _SKU_REQUEST.match(text.strip())
    if match is None:
        raise UnknownSkuError(f"expected SKU[:GPUS], e.g. H100-80GB:8 (got {text!r})")
    gpus = int(match.group("gpus") or 1)
    if gpus < 1:
        raise UnknownSkuError(f"GPU count must be at least 1 (got {text!r})")
    return match.group("sku"), gpus


@dataclass(frozen=True)
class CloudCatalog:
    cloud: Cloud
    priced_on: dt.date
    regions: Mapping[str, Region]
    instance_types: Mapping[str, InstanceType]


#: Called with (cloud, instance type, zone); True means "skip this zone for now".
ZoneFilter = Callable[[str, str, str], bool]


class Catalog:
    """All SKUs and all clouds' instance types, regions and prices."""

    def __init__(self, skus: Mapping[str, Sku], clouds: Mapping[str, CloudCatalog]) -> None:
        self.skus = dict(skus)
        self.clouds = dict(clouds)

    # -- lookups that fail with errors naming what exists ------------------------------------

    def sku(self, name: str) -> Sku:
        try:
            return self.skus[name]
        except KeyError:
            raise UnknownSkuError(
                f"unknown SKU {name!r}; the catalog has {', '.join(sorted(self.skus))}"
            ) from None

    def cloud(self, cloud: str) -> CloudCatalog:
        try:
            return self.clouds[cloud]
        except KeyError:
            raise UnknownRegionError(
                f"unknown cloud {cloud!r}; the catalog has {', '.join(sorted(self.clouds))}"
            ) from None

    def region(self, cloud: str, name: str) -> Region:
        regions = self.cloud(cloud).regions
        try:
            return regions[name]
        except KeyError:
            raise UnknownRegionError(
                f"{cloud} has no region {name!r} in the catalog; it lists {', '.join(regions)}"
            ) from None

    def instance_type(self, cloud: str, name: str) -> InstanceType:
        types = self.cloud(cloud).instance_types
        try:
            return types[name]
        except KeyError:
            raise UnknownSkuError(
                f"{cloud} has no GPU instance type {name!r} in the catalog; "
                f"it lists {', '.join(types)}"
            ) from None

    def zones(self, cloud: str, instance_type: str, region: str) -> tuple[str, ...]:
        """Zones of ``region`` that sell ``instance_type``; errors name the regions that do."""
        itype = self.instance_type(cloud, instance_type)
        self.region(cloud, region)
        if region not in itype.prices:
            raise UnknownRegionError(
                f"{cloud} does not sell {instance_type} in {region}; "
                f"regions that do: {', '.join(itype.prices)}"
            )
        return itype.zones.get(region) or self.clouds[cloud].regions[region].zones

    def residency_groups(self) -> list[str]:
        return sorted({r.residency for c in self.clouds.values() for r in c.regions.values()})

    def gpu_counts(self, sku: str) -> list[int]:
        return sorted(
            {
                t.gpus
                for c in self.clouds.values()
                for t in c.instance_types.values()
                if t.sku == sku
            }
        )

    # -- ranking ------------------------------------------------------------------------------

    def offers(self, request: OfferRequest, skip_zone: ZoneFilter | None = None) -> list[Offer]:
        """Every offer that satisfies ``request``, cheapest first.

        Raises :class:`UnknownSkuError` for an unknown SKU or a GPU count no cloud sells, and
        :class:`UnknownRegionError` for an unknown cloud or residency group. An empty list means
        the request is valid but nothing matches (e.g. nothing in that residency group).
        Offers whose every zone ``skip_zone`` rejects are left out.
        """
        self.sku(request.sku)
        counts = self.gpu_counts(request.sku)
        if request.gpus not in counts:
            raise UnknownSkuError(
                f"{request.sku} is sold in counts of {', '.join(map(str, counts))} GPUs "
                f"per machine (asked for {request.gpus})"
            )
        for asked in request.clouds:
            self.cloud(asked)
        groups = self.residency_groups()
        unknown = sorted(set(request.residency) - set(groups))
        if unknown:
            raise UnknownRegionError(
                f"unknown residency group {', '.join(unknown)}; the catalog has {', '.join(groups)}"
            )
        result: list[Offer] = []
        for cloud_name, cloud in self.clouds.items():
            if request.clouds and cloud_name not in request.clouds:
                continue
            for itype in cloud.instance_types.values():
                if itype.sku != request.sku or itype.gpus != request.gpus:
                    continue
                for region_name, price in itype.prices.items():
                    region = cloud.regions[region_name]
                    if request.residency and region.residency not in request.residency:
                        continue
                    if (
                        request.allowed_regions is not None
                        and region_name not in request.allowed_regions
                    ):
                        continue
                    if request.max_usd_per_hour is not None and price > request.max_usd_per_hour:
                        continue
                    zones = itype.zones.get(region_name) or region.zones
                    if skip_zone is not None:
                        zones = tuple(z for z in zones if not skip_zone(cloud_name, itype.name, z))
                    if not zones:
                        continue
                    result.append(
                        Offer(
                            cloud=cloud.cloud,
                            instance_type=itype.name,
                            sku=itype.sku,
                            gpus=itype.gpus,
                            gpu_memory_gib=itype.gpu_memory_gib,
                            vcpus=itype.vcpus,
                            ram_gib=itype.ram_gib,
                            region=region_name,
                            residency=region.residency,
                            zones=zones,
                            usd_per_hour=price,
                            priced_on=cloud.priced_on,
                        )
                    )
        result.sort(key=lambda o: (o.usd_per_hour, o.cloud, o.region, o.instance_type))
        return result


# -- loading ------------------------------------------------------------------------------------


def _require(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise CatalogError(f"{where}: missing {key!r}")
    return data[key]


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a mapping at the top")
    return data


def _parse_cloud(path: Path, skus: Mapping[str, Sku]) -> CloudCatalog:
    data = _load_yaml(path)
    where = str(path)
    cloud = cast(Cloud, _require(data, "cloud", where))
    if cloud not in CLOUDS:
        raise CatalogError(f"{where}: cloud must be one of {', '.join(CLOUDS)} (got {cloud!r})")
    priced_on = _require(data, "priced_on", where)
    if not isinstance(priced_on, dt.date):
        raise CatalogError(f"{where}: priced_on must be a date, YYYY-MM-DD (got {priced_on!r})")
    regions: dict[str, Region] = {}
    for name, spec in _require(data, "regions", where).items():
        region_zones = tuple(str(z) for z in spec.get("zones") or ()) or ("",)
        residency = str(_require(spec, "residency", f"{where}: {name}"))
        regions[name] = Region(cloud, name, residency, region_zones)
    types: dict[str, InstanceType] = {}
    for name, spec in _require(data, "instance_types", where).items():
        at = f"{where}: {name}"
        sku = str(_require(spec, "sku", at))
        if sku not in skus:
            raise CatalogError(f"{at}: unknown SKU {sku!r}; skus.yaml has {', '.join(skus)}")
        memory = int(_require(spec, "gpu_memory_gib", at))
        if memory != skus[sku].memory_gib:
            raise CatalogError(
                f"{at}: gpu_memory_gib {memory} differs from {sku}'s {skus[sku].memory_gib}"
            )
        prices = {str(r): float(p) for r, p in _require(spec, "prices", at).items()}
        for region_name, price in prices.items():
            if region_name not in regions:
                raise CatalogError(f"{at}: price for unknown region {region_name!r}")
            if price <= 0:
                raise CatalogError(f"{at}: price in {region_name} must be positive")
        zones: dict[str, tuple[str, ...]] = {}
        for region_name, zone_list in (spec.get("zones") or {}).items():
            known = regions[region_name].zones if region_name in regions else ()
            extra = sorted(set(zone_list) - set(known))
            if region_name not in prices or extra:
                raise CatalogError(f"{at}: zones for {region_name} not in its region: {extra}")
            zones[region_name] = tuple(zone_list)
        types[name] = InstanceType(
            cloud=cloud,
            name=name,
            sku=sku,
            gpus=int(_require(spec, "gpus", at)),
            gpu_memory_gib=memory,
            vcpus=int(_require(spec, "vcpus", at)),
            ram_gib=int(_require(spec, "ram_gib", at)),
            prices=prices,
            zones=zones,
        )
    return CloudCatalog(cloud, priced_on, regions, types)


def load_catalog(directory: Path | None = None, clouds: Iterable[str] = CLOUDS) -> Catalog:
    """Read ``skus.yaml`` and ``<cloud>.yaml`` from ``directory`` (default: the packaged data)."""
    base = directory or Path(str(importlib.resources.files("providers") / "data"))
    raw_skus = _require(_load_yaml(base / "skus.yaml"), "skus", str(base / "skus.yaml"))
    skus = {
        name: Sku(name, str(spec["gpu_model"]), int(spec["memory_gib"]))
        for name, spec in raw_skus.items()
    }
    parsed = {cloud: _parse_cloud(base / f"{cloud}.yaml", skus) for cloud in clouds}
    return Catalog(skus, parsed)


@functools.cache
def default_catalog() -> Catalog:
    """The packaged catalog, read once per process."""
    return load_catalog()
