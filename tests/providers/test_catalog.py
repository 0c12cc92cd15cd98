"""The catalog data files and the one implementation that reads and ranks them."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

from providers.catalog import (
    CLOUDS,
    CatalogError,
    OfferRequest,
    default_catalog,
    load_catalog,
    parse_sku_request,
)
from providers.errors import UnknownRegionError, UnknownSkuError

REQUIRED_SKUS = {"H100-80GB", "H200", "A100-80GB", "L40S", "A10G", "L4"}
DATA = Path(__file__).resolve().parents[2] / "providers" / "data"


def test_every_required_sku_is_sold_somewhere_with_its_usual_counts() -> None:
    catalog = default_catalog()
    assert set(catalog.skus) >= REQUIRED_SKUS
    for sku in REQUIRED_SKUS:
        assert catalog.gpu_counts(sku), sku
    assert catalog.gpu_counts("H100-80GB") == [1, 8]
    assert catalog.gpu_counts("A100-80GB") == [1, 2, 4, 8]
    assert catalog.gpu_counts("L4") == [1, 2, 4, 8]


def test_every_cloud_lists_its_gpu_regions_with_a_residency_group() -> None:
    catalog = default_catalog()
    for cloud in CLOUDS:
        data = catalog.cloud(cloud)
        assert data.priced_on <= dt.date.today()
        selling = {r for t in data.instance_types.values() for r in t.prices}
        assert len(selling) >= 10, (cloud, selling)  # real GPU regions, not a token few
        for region in data.regions.values():
            assert region.residency in {"us", "ca", "sa", "eu", "uk", "ch", "apac", "me"}
            assert region.zones
        for itype in data.instance_types.values():
            assert itype.vcpus > 0 and itype.ram_gib > 0 and itype.gpus > 0
            assert all(price > 0 for price in itype.prices.values())


def test_header_states_list_prices_and_refresh() -> None:
    for cloud in CLOUDS:
        header = (DATA / f"{cloud}.yaml").read_text().split("cloud:")[0].lower()
        assert "list prices" in header and "refresh" in header


def test_offers_are_ranked_cheapest_first_and_respect_residency() -> None:
    offers = default_catalog().offers(OfferRequest("H100-80GB", 8, residency=frozenset({"eu"})))
    assert {o.cloud for o in offers} == {"aws", "gcp", "azure"}
    assert all(o.residency == "eu" and o.gpus == 8 for o in offers)
    prices = [o.usd_per_hour for o in offers]
    assert prices == sorted(prices)
    assert "eu-west-2" not in {o.region for o in offers}  # London is "uk", not "eu"


def test_offers_honour_allowed_regions_clouds_price_cap_and_the_zone_filter() -> None:
    catalog = default_catalog()
    request = OfferRequest(
        "L4", 1, clouds=frozenset({"gcp"}), allowed_regions=frozenset({"europe-west4"})
    )
    offers = catalog.offers(request)
    assert offers and {(o.cloud, o.region) for o in offers} == {("gcp", "europe-west4")}
    capped = catalog.offers(OfferRequest("L4", 1, clouds=frozenset({"gcp"}), max_usd_per_hour=0.8))
    assert capped and all(o.usd_per_hour <= 0.8 for o in capped)
    skipped = catalog.offers(request, skip_zone=lambda c, t, z: z.endswith("-a"))
    assert all("europe-west4-a" not in o.zones for o in skipped)
    assert catalog.offers(request, skip_zone=lambda c, t, z: True) == []


def test_bad_requests_name_what_was_asked_and_what_exists() -> None:
    catalog = default_catalog()
    with pytest.raises(UnknownSkuError, match=r"unknown SKU 'H100'.*H100-80GB"):
        catalog.offers(OfferRequest("H100", 8))
    with pytest.raises(UnknownSkuError, match=r"counts of 1, 8 GPUs.*asked for 3"):
        catalog.offers(OfferRequest("H100-80GB", 3))
    with pytest.raises(UnknownRegionError, match=r"residency group mars.*eu"):
        catalog.offers(OfferRequest("L4", 1, residency=frozenset({"mars"})))
    with pytest.raises(UnknownRegionError, match=r"no region 'eu-west-9'.*eu-north-1"):
        catalog.region("aws", "eu-west-9")
    with pytest.raises(UnknownRegionError, match=r"does not sell p4de.24xlarge in eu-north-1"):
        catalog.zones("aws", "p4de.24xlarge", "eu-north-1")
    with pytest.raises(UnknownSkuError, match=r"no GPU instance type 'p9.huge'.*p5.48xlarge"):
        catalog.instance_type("aws", "p9.huge")


def test_parse_sku_request() -> None:
    assert parse_sku_request("H100-80GB:8") == ("H100-80GB", 8)
    assert parse_sku_request("L4") == ("L4", 1)
    with pytest.raises(UnknownSkuError):
        parse_sku_request("H100:eight")


def test_inconsistent_data_is_refused_with_the_file_and_entry(tmp_path: Path) -> None:
    for name in ("skus.yaml", "aws.yaml"):
        shutil.copy(DATA / name, tmp_path / name)
    text = (tmp_path / "aws.yaml").read_text()
    (tmp_path / "aws.yaml").write_text(
        text.replace("gpu_memory_gib: 141", "gpu_memory_gib: 140", 1)
    )
    with pytest.raises(CatalogError, match=r"aws.yaml: p5e.48xlarge: gpu_memory_gib 140"):
        load_catalog(tmp_path, clouds=["aws"])
    (tmp_path / "aws.yaml").write_text(text.replace("      us-east-2:", "      us-east-9:", 1))
    with pytest.raises(CatalogError, match="unknown region 'us-east-9'"):
        load_catalog(tmp_path, clouds=["aws"])
