"""scripts/refresh_aws_catalog.py against moto's EC2 (its instance types and offerings data)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest

from providers.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[2]
REGIONS = ["eu-north-1", "us-east-1"]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "refresh_aws_catalog", ROOT / "scripts" / "refresh_aws_catalog.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def session(aws_credentials: None) -> Iterator[boto3.Session]:
    from moto import mock_aws

    with mock_aws():
        yield boto3.Session()


def _offered(session: boto3.Session, region: str, instance_type: str) -> list[str]:
    client: Any = session.client("ec2", region_name=region)
    answer = client.describe_instance_type_offerings(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": [instance_type]}],
    )
    return sorted(o["Location"] for o in answer["InstanceTypeOfferings"])


def test_refresh_updates_shapes_and_zones_and_keeps_prices(
    tmp_path: Path, session: boto3.Session
) -> None:
    for name in ("skus.yaml", "aws.yaml"):
        shutil.copy(ROOT / "providers" / "data" / name, tmp_path / name)
    catalog_file = tmp_path / "aws.yaml"
    original = catalog_file.read_text()
    broken = original.replace(
        "    vcpus: 192\n    ram_gib: 2048", "    vcpus: 100\n    ram_gib: 2048", 1
    )
    catalog_file.write_text(broken)
    before = load_catalog(tmp_path, clouds=["aws"]).cloud("aws")
    assert before.instance_types["p5.48xlarge"].vcpus == 100

    notes = _script().run(catalog_file, REGIONS, session=session)

    assert "p5.48xlarge: vcpus 100 -> 192" in notes
    after_text = catalog_file.read_text()
    assert after_text.startswith(original.split("cloud:")[0])  # the header survives
    after = load_catalog(tmp_path, clouds=["aws"]).cloud("aws")
    assert after.instance_types["p5.48xlarge"].vcpus == 192
    for name, itype in after.instance_types.items():
        for region in REGIONS:
            sold = _offered(session, region, name)
            if region in itype.prices:
                assert sold, (name, region)
                zones = itype.zones.get(region) or after.regions[region].zones
                assert sorted(zones) == sold, (name, region)
                assert itype.prices[region] == before.instance_types[name].prices[region]
            elif region in before.instance_types[name].prices:
                assert not sold and f"{name}: no longer sold in {region}; removed" in notes
            elif sold:
                assert any(n.startswith(f"{name}: now sold in {region}") for n in notes)
    # Regions that were not asked keep their prices untouched.
    assert (
        after.instance_types["p5.48xlarge"].prices["ap-northeast-1"]
        == (before.instance_types["p5.48xlarge"].prices["ap-northeast-1"])
    )


def test_dry_run_writes_nothing(tmp_path: Path, session: boto3.Session) -> None:
    catalog_file = tmp_path / "aws.yaml"
    shutil.copy(ROOT / "providers" / "data" / "aws.yaml", catalog_file)
    text = catalog_file.read_text()
    _script().run(catalog_file, ["eu-north-1"], session=session, dry_run=True)
    assert catalog_file.read_text() == text
