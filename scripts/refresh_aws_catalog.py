"""Refresh the AWS part of the GPU catalog (``providers/data/aws.yaml``) from EC2 itself.

For every instance type already in the file it reads, with ``describe_instance_types``, the
vCPUs, memory and GPU count and model, and, with ``describe_instance_type_offerings`` in every
region of the file, which availability zones sell it. It then rewrites the file: shapes updated,
``zones`` narrowed to the zones that sell the type, regions that no longer sell it dropped.
Regions that newly sell a type are reported, not added: a region needs a list price, which
EC2 does not give (take it from the AWS price list and add it by hand). Prices are never changed.

Usage: ``python scripts/refresh_aws_catalog.py [--catalog FILE] [--regions R,R] [--dry-run]``.
Needs AWS credentials allowed to call ec2:DescribeInstanceTypes and
ec2:DescribeInstanceTypeOfferings. It must not launch anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "providers" / "data" / "aws.yaml"

#: EC2's GpuInfo names -> the catalog's fungible SKU family they belong to.
GPU_NAMES = {
    "H100": "H100-80GB",
    "H200": "H200",
    "A100": "A100-80GB",
    "L40S": "L40S",
    "A10G": "A10G",
    "L4": "L4",
}


@dataclass(frozen=True)
class Shape:
    vcpus: int
    ram_gib: int
    gpus: int
    gpu_name: str


def fetch_shapes(client: Any, instance_types: Sequence[str]) -> dict[str, Shape]:
    """vCPUs, RAM and GPUs of ``instance_types`` (unknown names are left out)."""
    shapes: dict[str, Shape] = {}
    paginator = client.get_paginator("describe_instance_types")
    for start in range(0, len(instance_types), 100):
        batch = list(instance_types[start : start + 100])
        for page in paginator.paginate(InstanceTypes=batch):
            for raw in page["InstanceTypes"]:
                gpus = raw.get("GpuInfo", {}).get("Gpus", [])
                shapes[raw["InstanceType"]] = Shape(
                    vcpus=int(raw["VCpuInfo"]["DefaultVCpus"]),
                    ram_gib=round(raw["MemoryInfo"]["SizeInMiB"] / 1024),
                    gpus=sum(int(g.get("Count", 0)) for g in gpus),
                    gpu_name=gpus[0]["Name"] if gpus else "",
                )
    return shapes


def fetch_offerings(client: Any, instance_types: Sequence[str]) -> dict[str, list[str]]:
    """instance type -> availability zones of the client's region that sell it."""
    zones: dict[str, list[str]] = {}
    paginator = client.get_paginator("describe_instance_type_offerings")
    pages = paginator.paginate(
        LocationType="availability-zone",
        Filters=[{"Name": "instance-type", "Values": list(instance_types)}],
    )
    for page in pages:
        for offering in page["InstanceTypeOfferings"]:
            zones.setdefault(offering["InstanceType"], []).append(offering["Location"])
    return {name: sorted(found) for name, found in zones.items()}


def refresh(
    data: Mapping[str, Any],
    shapes: Mapping[str, Shape],
    offerings: Mapping[str, Mapping[str, list[str]]],
) -> tuple[dict[str, Any], list[str]]:
    """The catalog ``data`` updated with ``shapes`` and per-region ``offerings``; and notes.

    ``offerings`` is region -> instance type -> zones, for the regions that were asked.
    """
    notes: list[str] = []
    regions = {name: dict(spec) for name, spec in data["regions"].items()}
    for region, by_type in offerings.items():
        known = list(regions[region]["zones"])
        new_zones = sorted({z for zs in by_type.values() for z in zs} - set(known))
        if new_zones:
            notes.append(f"{region}: zones {', '.join(new_zones)} added")
            regions[region]["zones"] = sorted([*known, *new_zones])
    types: dict[str, Any] = {}
    for name, spec in data["instance_types"].items():
        spec = dict(spec)
        shape = shapes.get(name)
        if shape is None:
            notes.append(f"{name}: EC2 does not know this type; left as it was")
        else:
            family = GPU_NAMES.get(shape.gpu_name)
            if family != spec["sku"]:
                notes.append(
                    f"{name}: EC2 reports GPU {shape.gpu_name!r}, catalog says {spec['sku']}"
                )
            for field, value in (
                ("gpus", shape.gpus),
                ("vcpus", shape.vcpus),
                ("ram_gib", shape.ram_gib),
            ):
                if spec[field] != value:
                    notes.append(f"{name}: {field} {spec[field]} -> {value}")
                    spec[field] = value
        prices = dict(spec["prices"])
        zones = {r: list(z) for r, z in (spec.get("zones") or {}).items()}
        for region, by_type in offerings.items():
            sold_in = by_type.get(name, [])
            if not sold_in:
                if region in prices:
                    notes.append(f"{name}: no longer sold in {region}; removed")
                    prices.pop(region)
                zones.pop(region, None)
                continue
            if region not in prices:
                notes.append(f"{name}: now sold in {region} ({', '.join(sold_in)}); add its price")
                continue
            all_zones = list(regions[region]["zones"])
            if sorted(sold_in) == sorted(all_zones):
                zones.pop(region, None)
            else:
                zones[region] = [z for z in all_zones if z in sold_in] or sold_in
        spec["prices"] = prices
        if zones:
            spec["zones"] = zones
        else:
            spec.pop("zones", None)
        types[name] = spec
    refreshed = dict(data)
    refreshed["regions"] = regions
    refreshed["instance_types"] = types
    refreshed["offerings_checked_on"] = dt.date.today()
    return refreshed, notes


def _flow(values: Iterable[str]) -> str:
    return "[" + ", ".join(values) + "]"


def render(header: str, data: Mapping[str, Any]) -> str:
    """The catalog file in its usual layout: header, one line per region, a block per type."""
    lines = [header.rstrip("\n")] if header.strip() else []
    for key in ("cloud", "priced_on", "offerings_checked_on", "currency"):
        if key in data:
            lines.append(f"{key}: {data[key]}")
    lines.append("regions:")
    for name, spec in data["regions"].items():
        lines.append(f"  {name}: {{residency: {spec['residency']}, zones: {_flow(spec['zones'])}}}")
    lines.append("instance_types:")
    for name, spec in data["instance_types"].items():
        lines.append(f"  {name}:")
        for field in ("sku", "gpus", "gpu_memory_gib", "vcpus", "ram_gib"):
            lines.append(f"    {field}: {spec[field]}")
        lines.append("    prices:")
        lines.extend(f"      {region}: {price}" for region, price in spec["prices"].items())
        if spec.get("zones"):
            lines.append("    zones:")
            lines.extend(f"      {r}: {_flow(z)}" for r, z in spec["zones"].items())
    return "\n".join(lines) + "\n"


def split_header(text: str) -> str:
    header = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        header.append(line)
    return "".join(header)


def run(
    catalog: Path,
    regions: Sequence[str] | None = None,
    *,
    session: Any = None,
    endpoint_url: str | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Refresh ``catalog`` in place (unless ``dry_run``); return the notes for a person."""
    import boto3

    text = catalog.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    session = session or boto3.Session()
    asked = list(regions or data["regions"])
    unknown = [r for r in asked if r not in data["regions"]]
    if unknown:
        raise SystemExit(f"{catalog}: no region {', '.join(unknown)}; add it under regions first")
    types = list(data["instance_types"])
    first = session.client("ec2", region_name=asked[0], endpoint_url=endpoint_url)
    shapes = fetch_shapes(first, types)
    offerings = {
        region: fetch_offerings(
            session.client("ec2", region_name=region, endpoint_url=endpoint_url), types
        )
        for region in asked
    }
    refreshed, notes = refresh(data, shapes, offerings)
    if not dry_run:
        catalog.write_text(render(split_header(text), refreshed), encoding="utf-8")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    parser.add_argument("--regions", help="comma-separated; default: every region in the file")
    parser.add_argument("--endpoint-url", help="EC2 endpoint (for a test double)")
    parser.add_argument("--dry-run", action="store_true", help="report, do not write")
    args = parser.parse_args(argv)
    regions = [r for r in (args.regions or "").split(",") if r] or None
    notes = run(args.catalog, regions, endpoint_url=args.endpoint_url, dry_run=args.dry_run)
    for note in notes:
        print(note)
    print(f"{len(notes)} changes{' (dry run)' if args.dry_run else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
