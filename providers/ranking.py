"""Offer ranking for people: ``spillway offers H100-80GB:8 --residency eu`` builds on this.

Turns a command-line ask into an :class:`~providers.catalog.OfferRequest`, ranks the catalog's
offers (skipping zones the process's capacity memory holds), and renders them as a table or
JSON. It must not call any cloud API: the ranking is from list prices in the catalog.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table

from providers.base import SHARED_MEMORY, CapacityMemory
from providers.catalog import Catalog, Offer, OfferRequest, default_catalog, parse_sku_request
from providers.errors import UnknownRegionError


def rank(
    ask: str,
    *,
    residency: Iterable[str] = (),
    clouds: Iterable[str] = (),
    regions: Iterable[str] = (),
    max_usd_per_hour: float | None = None,
    catalog: Catalog | None = None,
    memory: CapacityMemory | None = None,
) -> tuple[OfferRequest, list[Offer]]:
    """The request ``ask`` ("SKU:GPUS") stands for, and its offers, cheapest first."""
    catalog = catalog or default_catalog()
    memory = memory if memory is not None else SHARED_MEMORY
    sku, gpus = parse_sku_request(ask)
    region_set = frozenset(regions)
    known = {r for c in catalog.clouds.values() for r in c.regions}
    unknown = sorted(region_set - known)
    if unknown:
        raise UnknownRegionError(
            f"unknown region {', '.join(unknown)}; the catalog has {', '.join(sorted(known))}"
        )
    request = OfferRequest(
        sku=sku,
        gpus=gpus,
        clouds=frozenset(clouds),
        residency=frozenset(residency),
        allowed_regions=region_set or None,
        max_usd_per_hour=max_usd_per_hour,
    )
    return request, catalog.offers(request, skip_zone=memory.blocked)


def explain_empty(request: OfferRequest, catalog: Catalog | None = None) -> str:
    """Why nothing matched, naming where the SKU is sold."""
    catalog = catalog or default_catalog()
    everywhere = catalog.offers(OfferRequest(request.sku, request.gpus, clouds=request.clouds))
    groups = sorted({o.residency for o in everywhere})
    where = f"residency {', '.join(sorted(request.residency))}" if request.residency else "there"
    return (
        f"no offer for {request.gpus}x {request.sku} in {where}"
        + (f" under ${request.max_usd_per_hour:.2f}/h" if request.max_usd_per_hour else "")
        + f"; it is sold in residency groups {', '.join(groups) or 'none'}"
    )


def offers_table(request: OfferRequest, offers: Sequence[Offer], limit: int | None = None) -> Table:
    shown = list(offers[:limit] if limit else offers)
    priced = sorted({str(o.priced_on) for o in shown})
    table = Table(
        title=f"{request.gpus}x {request.sku}: {len(offers)} offers, cheapest first",
        caption=f"on-demand list prices taken {', '.join(priced)}; refresh before trusting them",
    )
    for column in ("#", "cloud", "instance type", "region", "residency", "zones"):
        table.add_column(column)
    for column in ("vCPUs", "RAM GiB", "$/hour", "$/GPU-hour"):
        table.add_column(column, justify="right")
    for index, offer in enumerate(shown, 1):
        table.add_row(
            str(index),
            offer.cloud,
            offer.instance_type,
            offer.region,
            offer.residency,
            str(len([z for z in offer.zones if z])) or "-",
            str(offer.vcpus),
            str(offer.ram_gib),
            f"{offer.usd_per_hour:.2f}",
            f"{offer.usd_per_gpu_hour:.2f}",
        )
    return table


def offers_json(offers: Sequence[Offer]) -> list[dict[str, Any]]:
    return [
        {
            "cloud": o.cloud,
            "instance_type": o.instance_type,
            "sku": o.sku,
            "gpus": o.gpus,
            "gpu_memory_gib": o.gpu_memory_gib,
            "vcpus": o.vcpus,
            "ram_gib": o.ram_gib,
            "region": o.region,
            "residency": o.residency,
            "zones": [z for z in o.zones if z],
            "usd_per_hour": o.usd_per_hour,
            "usd_per_gpu_hour": round(o.usd_per_gpu_hour, 4),
            "priced_on": o.priced_on.isoformat(),
        }
        for o in offers
    ]
