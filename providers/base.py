"""The provider interface, its request and result types, and what every adapter shares.

Shared here: the region-lock guard every adapter runs before any API call, the capacity-error
memory (an (instance type, zone) that just had no capacity is skipped for a while), the zone
order for failover, and resource names derived from an idempotency key.

This module must not import any cloud SDK and must not call any cloud API.
"""

from __future__ import annotations

import abc
import hashlib
import re
import threading
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Literal

from providers.catalog import Catalog, Offer, OfferRequest, default_catalog
from providers.errors import (
    CannotStopError,
    CapacityError,
    InvalidRequestError,
    ResidencyError,
    TransientError,
)

#: Label/tag marking a machine as Spillway's (``list_managed`` finds leaks by it).
MANAGED_LABEL = "spillway-managed"
#: Label/tag carrying the idempotency key (or, where values are restricted, its digest).
KEY_LABEL = "spillway-key"
#: Agent label naming the instance type of the rented machine it runs on.
INSTANCE_TYPE_LABEL = "instance_type"
#: Label/tag naming the deployment a machine was rented for.
DEPLOYMENT_LABEL = "spillway-deployment"
#: Label/tag on a stopped machine kept in its deployment's warm pool: when it was released
#: (whole seconds since the epoch). The machine itself is the record of the pool.
WARM_LABEL = "spillway-warm"
#: Label/tag naming the provision workflow that took the machine out of the warm pool.
CLAIM_LABEL = "spillway-claim"
_LABEL_SAFE = re.compile(r"[^a-z0-9_-]")

InstanceState = Literal["pending", "running", "stopping", "stopped", "terminated", "failed"]
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class LaunchRequest:
    """Launch one machine. ``key`` makes the launch idempotent: the same key, the same machine."""

    key: str
    instance_type: str
    region: str
    #: The image to boot (AMI id; GCP image or family link; Azure image id or
    #: ``publisher:offer:sku:version``). Never defaulted: GPU images are the operator's choice.
    image: str
    #: The region lock: the launch may only happen in one of these regions.
    allowed_regions: frozenset[str]
    #: Residency groups the data may go to; empty means the lock is ``allowed_regions`` alone.
    residency: frozenset[str] = frozenset()
    #: Boot payload: cloud-init user data (or a shell script) the machine runs on first boot.
    user_data: str = ""
    #: Extra labels/tags; the ownership and key labels are added by the adapter.
    labels: Mapping[str, str] = field(default_factory=dict)
    spot: bool = False
    #: Restrict (and order) the zones to try; empty means every zone that sells the type.
    zones: tuple[str, ...] = ()
    disk_gib: int = 200

    @classmethod
    def for_offer(cls, offer: Offer, key: str, image: str, **kwargs: object) -> LaunchRequest:
        """A request for ``offer``, locked to the offer's region unless told otherwise."""
        fields: dict[str, object] = {
            "allowed_regions": frozenset({offer.region}),
            "zones": offer.zones,
        }
        fields.update(kwargs)
        return cls(
            key=key,
            instance_type=offer.instance_type,
            region=offer.region,
            image=image,
            **fields,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Instance:
    """A machine as the cloud reports it."""

    key: str
    cloud: str
    instance_id: str
    instance_type: str
    region: str
    zone: str
    state: InstanceState
    spot: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    private_ip: str = ""
    #: Why this machine cannot be stopped and started again; empty when it can.
    cannot_stop: str = ""

    def label(self, name: str) -> str:
        """The value of label ``name`` ("" when unset)."""
        return str(self.labels.get(name, ""))


def label_safe(value: str) -> str:
    """``value`` as the most restricted cloud (GCP) keeps it in a label: lower case letters,
    digits, '_' and '-', 63 characters. Compare label values through this on every cloud."""
    return _LABEL_SAFE.sub("-", value.lower())[:63]


class Provider(abc.ABC):
    """One cloud (or the local stand-in). Implementations are safe to call from several threads.

    Contract:

    * :meth:`offers` ranks what this provider sells for a request, cheapest first, leaving out
      (instance type, zone) pairs that recently had no capacity.
    * :meth:`launch` is idempotent by ``request.key``: calling it again with the same key (after
      a crash, a timeout, a retry) returns the machine the first call created and never creates
      a second one; a key that already has a machine gets that machine back (its ``region``
      says where), so a new placement needs a new key. Before any API call it checks the
      region lock and the catalog and raises
      :class:`~providers.errors.ResidencyError`, ``UnknownRegionError`` or ``UnknownSkuError``.
      It tries every zone of the region that sells the type, skipping zones in the capacity
      memory, and raises :class:`~providers.errors.CapacityError` only when all failed. A failed
      launch leaves nothing behind.
    * :meth:`describe` returns the live machine for a key, or None when there is none.
    * :meth:`terminate` is idempotent and silent when the machine is already gone.
    * :meth:`list_managed` returns every live machine carrying Spillway's ownership label,
      whatever created it, so that leaks can be found. Stopped machines are live: they keep
      their disks (and cost for them) until terminated.
    * :meth:`stop` stops the machine with its disks kept, so that :meth:`start` brings it back
      with what it wrote (downloaded weights) in place; compute billing ends while it is
      stopped. It returns once the cloud reports it stopped. Idempotent: stopping a stopped
      machine is not an error, and a machine that is still starting is waited for first. A
      machine that cannot be stopped (``Instance.cannot_stop`` says why) raises
      :class:`~providers.errors.CannotStopError` before any change; a provider that cannot
      stop any machine says so in every instance it returns.
    * :meth:`start` starts a stopped machine again and returns it (``pending`` or
      ``running``); a running machine is returned as it is, one still stopping is waited for.
      The cloud may have no capacity to start it: that is a
      :class:`~providers.errors.CapacityError`, and the machine stays stopped.
    * :meth:`set_labels` merges labels into the machine's own (a value of None removes the
      label); the ownership and key labels cannot be changed this way.
    """

    cloud: str

    def __init__(
        self, catalog: Catalog | None = None, memory: CapacityMemory | None = None
    ) -> None:
        self.catalog = catalog or default_catalog()
        self.memory = memory if memory is not None else SHARED_MEMORY

    def offers(self, request: OfferRequest) -> list[Offer]:
        """This provider's offers for ``request``, cheapest first."""
        mine = OfferRequest(
            sku=request.sku,
            gpus=request.gpus,
            clouds=frozenset({self.cloud}),
            residency=request.residency,
            allowed_regions=request.allowed_regions,
            max_usd_per_hour=request.max_usd_per_hour,
        )
        if request.clouds and self.cloud not in request.clouds:
            return []
        return self.catalog.offers(mine, skip_zone=self.memory.blocked)

    @abc.abstractmethod
    def launch(self, request: LaunchRequest) -> Instance:
        """Create the machine for ``request.key`` or return the one that exists."""

    @abc.abstractmethod
    def describe(self, key: str) -> Instance | None:
        """The live machine for ``key``, or None."""

    @abc.abstractmethod
    def terminate(self, key: str) -> None:
        """Delete the machine for ``key``; silent when there is none."""

    @abc.abstractmethod
    def list_managed(self) -> list[Instance]:
        """Every live machine carrying the ownership label."""

    def stop(self, key: str) -> Instance | None:
        """Stop the machine for ``key`` with its disks kept; None when there is none."""
        instance = self.describe(key)
        if instance is None:
            return None
        raise CannotStopError(
            instance.cannot_stop or f"{self.cloud}: machines cannot be stopped and started again",
            cloud=self.cloud,
        )

    def start(self, key: str) -> Instance | None:
        """Start the stopped machine for ``key`` again; None when there is none."""
        instance = self.describe(key)
        if instance is None or instance.state in ("pending", "running"):
            return instance
        raise CannotStopError(
            f"{self.cloud}: machines cannot be stopped and started again", cloud=self.cloud
        )

    def set_labels(self, key: str, labels: Mapping[str, str | None]) -> None:
        """Merge ``labels`` into the labels of the machine for ``key`` (None removes one)."""
        raise CannotStopError(
            f"{self.cloud}: machines cannot be relabelled, so no warm pool is kept",
            cloud=self.cloud,
        )

    # -- shared steps --------------------------------------------------------------------------

    def check_request(self, request: LaunchRequest) -> tuple[str, ...]:
        """The region-lock guard and catalog check; returns the zones to try, in order.

        Runs before any API call. Raises ResidencyError when the region is outside the lock,
        and the catalog's errors (naming what exists) for an unknown type, region or zone.
        """
        check_key(request.key)
        if request.region not in request.allowed_regions:
            allowed = ", ".join(sorted(request.allowed_regions)) or "none"
            raise ResidencyError(
                f"{self.cloud}: launch of {request.key!r} in {request.region} refused: the "
                f"request is locked to {allowed}",
                cloud=self.cloud,
            )
        region = self.catalog.region(self.cloud, request.region)
        if request.residency and region.residency not in request.residency:
            raise ResidencyError(
                f"{self.cloud}: launch of {request.key!r} in {request.region} refused: the region"
                f" is in residency group {region.residency!r}, the request allows "
                f"{', '.join(sorted(request.residency))}",
                cloud=self.cloud,
            )
        zones = self.catalog.zones(self.cloud, request.instance_type, request.region)
        if request.zones:
            unknown = [z for z in request.zones if z not in zones]
            if unknown:
                raise InvalidRequestError(
                    f"{self.cloud}: {request.instance_type} is not sold in zone "
                    f"{', '.join(unknown)} of {request.region}; zones that sell it: "
                    f"{', '.join(zones)}",
                    cloud=self.cloud,
                )
            zones = request.zones
        if not request.image.strip():
            raise InvalidRequestError(
                f"{self.cloud}: launch of {request.key!r} names no image; GPU machines boot the "
                "image the request names",
                cloud=self.cloud,
            )
        return zones

    def zones_to_try(self, request: LaunchRequest, zones: tuple[str, ...]) -> tuple[str, ...]:
        """``zones`` without those in the capacity memory; CapacityError when none is left."""
        left = tuple(
            z for z in zones if not self.memory.blocked(self.cloud, request.instance_type, z)
        )
        if not left:
            raise CapacityError(
                f"{self.cloud}: every zone of {request.region} ({', '.join(zones)}) recently "
                f"had no {request.instance_type} capacity; not trying again before the memory "
                "expires",
                cloud=self.cloud,
            )
        return left

    def failover(
        self,
        request: LaunchRequest,
        zones: tuple[str, ...],
        attempt: Callable[[str], Instance],
    ) -> Instance:
        """Call ``attempt(zone)`` for each zone until one succeeds.

        A CapacityError marks (instance type, zone) in the memory and moves on; any other error
        stops at once. When every zone had no capacity, one CapacityError lists them all.
        """
        failures: list[str] = []
        for zone in self.zones_to_try(request, zones):
            try:
                return attempt(zone)
            except CapacityError as exc:
                self.memory.mark(self.cloud, request.instance_type, zone)
                failures.append(f"{zone or request.region}: {exc}")
        raise CapacityError(
            f"{self.cloud}: no {request.instance_type} capacity in {request.region}: "
            + "; ".join(failures),
            cloud=self.cloud,
            code="AllZonesFailed",
        )


def wait_for_state(
    describe: Callable[[], Instance | None],
    wanted: Container[str],
    *,
    timeout_s: float,
    poll_s: float,
    what: str,
) -> Instance | None:
    """Describe until the machine is in one of ``wanted`` (or gone: None).

    Raises TransientError (retried by the caller's retry policy) after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        instance = describe()
        if instance is None or instance.state in wanted:
            return instance
        if time.monotonic() > deadline:
            raise TransientError(
                f"{what}: still {instance.state} after {timeout_s:.0f}s", cloud=instance.cloud
            )
        time.sleep(poll_s)


def check_labels(cloud: str, labels: Mapping[str, str | None]) -> None:
    """Refuse a label change that would touch the ownership or key label."""
    fixed = sorted({MANAGED_LABEL, KEY_LABEL} & set(labels))
    if fixed:
        raise InvalidRequestError(
            f"{cloud}: label {', '.join(fixed)} is set at launch and cannot be changed",
            cloud=cloud,
        )


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise InvalidRequestError(
            f"idempotency key {key!r} must be 1-128 characters of letters, digits, '.', '_', "
            "':' and '-', starting with a letter or digit"
        )
    return key


def resource_name(key: str, max_len: int = 63) -> str:
    """A lower-case DNS-style name derived from ``key`` alone: same key, same name.

    The readable part is cut to fit; a digest of the whole key keeps distinct keys distinct.
    """
    check_key(key)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")
    room = max_len - len("spw--") - len(digest)
    slug = slug[:room].strip("-")
    return f"spw-{slug}-{digest}" if slug else f"spw-{digest}"


def key_digest(key: str) -> str:
    """A label-safe stand-in for ``key`` where label values are restricted (GCP)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class CapacityMemory:
    """Remembers (cloud, instance type, zone) triples that had no capacity, for ``ttl_s``.

    One instance is shared by every adapter in a process (:data:`SHARED_MEMORY`), so a zone that
    just failed for one deployment is skipped by the next launch and by offer ranking too.
    """

    def __init__(self, ttl_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._until: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def mark(self, cloud: str, instance_type: str, zone: str) -> None:
        with self._lock:
            self._until[(cloud, instance_type, zone)] = self._clock() + self.ttl_s

    def blocked(self, cloud: str, instance_type: str, zone: str) -> bool:
        with self._lock:
            until = self._until.get((cloud, instance_type, zone))
            if until is None:
                return False
            if self._clock() >= until:
                del self._until[(cloud, instance_type, zone)]
                return False
            return True

    def clear(self) -> None:
        with self._lock:
            self._until.clear()


SHARED_MEMORY = CapacityMemory()
