"""The warm pool in a simulation: released machines kept stopped, and started again.

With ``spillover.release: stop`` a rented machine whose replica is drained is stopped, not
terminated, while the pool has room (:func:`decisions.warmpool.release_action`); a stopped
machine pays only for its disk (``warm_pool_disk_gb`` at ``disk_usd_per_gb_month``, settings).
A later provision first takes a stopped machine that a launch could rent now
(:func:`decisions.warmpool.reusable`: a cloud it may use, inside the lock, its SKU) and starts
it: billed again from the start call (with the cloud's billing minimum, as a new start is
billed), boot, replica start, and no weight download, since the weights are on its disk.
Stopped machines past the pool's bounds are terminated (:func:`decisions.warmpool.expired`).

The decisions are the workflows' own (:mod:`decisions.warmpool`); this module keeps the
simulated machines and the disk bill.
"""

from __future__ import annotations

from dataclasses import dataclass

from decisions.policy import Policy, resolve_lock, spill_providers
from decisions.warmpool import WarmMachine, expired, release_action, reusable
from providers.base import label_safe
from providers.catalog import Catalog

#: Hours in a month, as clouds price storage per GB-month.
MONTH_H = 730.0


@dataclass(slots=True)
class Stopped:
    machine_id: str
    cloud: str
    instance_type: str
    region: str
    usd_per_hour: float
    since: float


class WarmPoolModel:
    """One deployment's stopped machines, and what their disks cost."""

    def __init__(
        self,
        policy: Policy,
        deployment: str,
        catalog: Catalog,
        disk_gb: float,
        disk_usd_per_gb_month: float,
    ) -> None:
        self.policy = policy
        self.name = deployment
        self.dep = policy.deployments[deployment]
        bounds = self.dep.spillover.warm()
        if bounds is None:
            raise ValueError(f"{deployment} releases with terminate: it has no warm pool")
        self.bounds = bounds
        self.catalog = catalog
        self.lock = resolve_lock(policy, self.dep, catalog)
        self.clouds = spill_providers(policy, self.dep)
        self.disk_usd_per_s = disk_gb * disk_usd_per_gb_month / (MONTH_H * 3600)
        self.stopped: dict[str, Stopped] = {}
        #: (from, to) of every stretch a machine spent stopped, its disk paid.
        self.spans: list[tuple[float, float]] = []
        self.stops = 0
        self.restarts = 0
        self.expired = 0

    def _view(self) -> list[WarmMachine]:
        return [
            WarmMachine(
                s.cloud,
                key,
                key,
                s.instance_type,
                s.region,
                "stopped",
                label_safe(self.name),
                s.since,
            )
            for key, s in self.stopped.items()
        ]

    def _end(self, key: str, at: float) -> Stopped:
        s = self.stopped.pop(key)
        self.spans.append((s.since, at))
        return s

    def expire(self, now: float) -> list[str]:
        """Terminate what the pool's bounds no longer allow; the machines ended."""
        gone = list(expired(self._view(), self.policy, now))
        for key in gone:
            self._end(key, now)
            self.expired += 1
        return gone

    def stop(
        self,
        machine_id: str,
        cloud: str,
        instance_type: str,
        region: str,
        usd_per_hour: float,
        at: float,
    ) -> str:
        """Stop a released machine into the pool: "" when stopped, else why it is terminated."""
        self.expire(at)
        why = release_action(self.bounds, "", len(self.stopped), self.name)
        if not why:
            self.stopped[machine_id] = Stopped(
                machine_id, cloud, instance_type, region, usd_per_hour, at
            )
            self.stops += 1
        return why

    def take(self, now: float) -> Stopped | None:
        """The stopped machine a new replica should start, taken out of the pool; None when
        none fits."""
        self.expire(now)
        found = reusable(self._view(), self.name, self.dep, self.lock, self.catalog, self.clouds)
        if not found:
            return None
        self.restarts += 1
        return self._end(found[0].key, now)

    def disk_usd(self, horizon: float) -> float:
        """The disks of stopped machines, up to ``horizon`` (those still stopped included)."""
        seconds = sum(min(end, horizon) - start for start, end in self.spans if start < horizon)
        seconds += sum(max(0.0, horizon - s.since) for s in self.stopped.values())
        return seconds * self.disk_usd_per_s
