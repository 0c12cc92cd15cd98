"""What the simulator assumes about the world, each number named, defaulted and overridable.

``spillway simulate --settings FILE`` reads a YAML file of these fields (unknown fields are
errors, reported as ``FILE:LINE: FIELD: ...``). The defaults are assumptions unless a comment
names where a figure comes from; the JSON output repeats every value used, so a result always
says what it rests on.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.configfile import load_model


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CloudModel(Strict):
    """How one cloud behaves when a machine is rented from it."""

    boot_s: float = Field(
        ge=0, description="Launch call accepted to agent registered (VM boot and cloud-init)."
    )
    capacity_error_probability: float = Field(
        ge=0,
        le=1,
        description="Chance that one launch attempt (one offer, one zone) has no capacity.",
    )
    offers: dict[str, float] = Field(
        default_factory=dict,
        description="Capacity-error probability of particular offers, by instance type or "
        "'INSTANCE_TYPE@REGION' (the latter wins); others use capacity_error_probability.",
    )
    billing_granularity_s: float = Field(
        default=1, gt=0, description="Billed time is rounded up to a multiple of this."
    )
    billing_minimum_s: float = Field(default=60, ge=0, description="Shortest billed time.")

    @field_validator("offers")
    @classmethod
    def _probabilities(cls, value: dict[str, float]) -> dict[str, float]:
        for key, p in value.items():
            if not 0 <= p <= 1:
                raise ValueError(f"{key}: a probability from 0 to 1, got {p:g}")
        return value

    def capacity_error(self, instance_type: str, region: str) -> float:
        """The chance that one launch attempt of this offer finds no capacity."""
        found = self.offers.get(f"{instance_type}@{region}")
        if found is None:
            found = self.offers.get(instance_type, self.capacity_error_probability)
        return found


def _default_clouds() -> dict[str, CloudModel]:
    # Billing: AWS (Linux on-demand) and Google Compute Engine bill per second with a one-minute
    # minimum; Azure is modelled per started minute. Boot times and capacity errors are
    # assumptions for large GPU machines (no provider publishes them); set your own.
    return {
        "aws": CloudModel(boot_s=150, capacity_error_probability=0.15),
        "gcp": CloudModel(boot_s=120, capacity_error_probability=0.15),
        "azure": CloudModel(
            boot_s=180,
            capacity_error_probability=0.15,
            billing_granularity_s=60,
        ),
    }


class ReservedFleet(Strict):
    """The GPUs the operator already has, and what they cost."""

    machines: int | None = Field(
        default=None,
        ge=0,
        description="Reserved machines (unset: as many as the trace's mean load needs, the "
        "usual way reserved capacity is sized).",
    )
    gpus_per_machine: int | None = Field(
        default=None, ge=1, le=64, description="GPUs per machine (unset: one replica's worth)."
    )
    pool: str | None = Field(
        default=None, description="Pool label of the machines (unset: the deployment's first)."
    )
    residency_label: str | None = Field(
        default=None,
        description="residency_group label of the machines (unset: inside the deployment's lock).",
    )
    discount: float = Field(
        default=0.40,
        ge=0,
        lt=1,
        description="Committed-use discount on the on-demand price (assumption: one-year "
        "commitments on GPU machines commonly save 30-50%).",
    )
    usd_per_gpu_hour: float | None = Field(
        default=None,
        gt=0,
        description="Price of a reserved GPU-hour (unset: the cheapest on-demand offer for the "
        "SKU inside the lock, less the discount).",
    )


class OnDemandBaseline(Strict):
    """The on-demand-only baseline: request-rate autoscaling as SkyServe does it.

    Defaults are SkyServe's (SkyPilot ``sky/serve/constants.py``): a decision every 20 s over
    the requests of the last 60 s, scale up after 300 s and down after 1,200 s of a different
    target.
    """

    target_qps_per_replica: float | None = Field(
        default=None,
        gt=0,
        description="Requests per second per replica (unset: tuned, see ``tune``).",
    )
    tune: bool = Field(
        default=True,
        description="With no target given: the largest target that keeps 99% of requests "
        "within the TTFT target on the tuning data (the cheapest on-demand service an operator "
        "could tune; see --tune-on); off: the rate one replica holds in a load test.",
    )

    @field_validator("target_range")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low < high:
            raise ValueError(f"expected [LOW, HIGH] with 0 < LOW < HIGH, got [{low:g}, {high:g}]")
        return value

    target_range: tuple[float, float] = Field(
        default=(0.05, 4.0),
        description="The targets searched, as multiples of what one replica holds in a load "
        "test: from LOW to HIGH, evenly on a log scale.",
    )
    search_points: int = Field(
        default=33, ge=2, le=257, description="Targets on that scale (bisection visits ~6)."
    )
    upscale_delay_s: float = Field(default=300, ge=0)
    downscale_delay_s: float = Field(default=1200, ge=0)
    decision_interval_s: float = Field(default=20, gt=0)
    qps_window_s: float = Field(default=60, gt=0)


class SimSettings(Strict):
    seed: int = Field(default=0, description="Seeds every random draw; same seed, same result.")
    ttft_slo_s: float = Field(
        default=2.0,
        gt=0,
        description="Time-to-first-token target for SLO attainment (unset: the deployment's "
        "slo.ttft_s in the policy).",
    )
    decide_every_s: float = Field(
        default=5, gt=0, description="Autoscaling tick (the scheduler's report interval)."
    )
    failure_backoff_s: float = Field(
        default=60, ge=0, description="After a failed provision, no new one for this long."
    )
    capacity_memory_s: float = Field(
        default=600, ge=0, description="A zone without capacity is skipped this long."
    )
    launch_offers: int = Field(default=5, ge=1, description="Offers one provision walks.")
    launch_call_s: float = Field(
        default=10, ge=0, description="One launch attempt, accepted or refused."
    )
    replica_start_s: float = Field(
        default=60,
        ge=0,
        description="Weights on local disk to replica healthy (SGLang loading and CUDA graphs).",
    )
    prefetch_mb_per_s: float = Field(
        default=600,
        gt=0,
        description="Weight download rate onto a new machine (bench/prefetch.py measures it).",
    )
    weights_gb: float | None = Field(
        default=None,
        gt=0,
        description="Model weights (unset: 2 bytes per parameter, parameters from the model name).",
    )
    params_b: float | None = Field(
        default=None,
        gt=0,
        description="Billions of parameters (unset: read from the model name, e.g. '70b'; 8 "
        "when the name does not say). The replica profiles are for an 8B model and are slowed "
        "by params_b / 8 (assumption: decode is bandwidth-bound and prefill compute-bound, both "
        "proportional to the parameter count).",
    )
    gpu_profile: str | None = Field(
        default=None, description="Replica speed profile (unset: from the deployment's SKU)."
    )
    probe_requests: int = Field(
        default=20_000,
        ge=500,
        description="Requests per load probe (what one replica holds, how many replicas the "
        "mean load needs); the p99 rests on the worst 1% of them.",
    )
    fast_forward: bool = Field(
        default=True,
        description="Apply runs of identical decode steps at once (exact; off only to compare).",
    )
    managed_output_tokens_per_s: float = Field(
        default=60,
        gt=0,
        description="How fast a managed endpoint streams output tokens to one request "
        "(assumption: hosted 8B-70B APIs commonly stream 50-150 tokens/s; its time to first "
        "token is our idle replica's prefill plus the endpoint's added_latency_s).",
    )
    gateway_poll_s: float = Field(
        default=0.1,
        gt=0,
        le=5,
        description="While requests wait in the gateway queue, routing is re-run this often "
        "(besides whenever a replica becomes healthy or a managed request ends).",
    )
    hindsight_bucket_s: float = Field(
        default=10,
        gt=0,
        description="The hindsight bound plans capacity in steps of this many seconds.",
    )
    warm_pool_disk_gb: float | None = Field(
        default=None,
        gt=0,
        description="Disk a machine stopped in the warm pool keeps paying for (unset: twice "
        "the weights: the weights and room for the image and caches).",
    )
    disk_usd_per_gb_month: float = Field(
        default=0.08,
        ge=0,
        description="Price of a stopped machine's disk (AWS EBS gp3 list price in US East, "
        "USD 0.08 per GB-month; other clouds' block storage is priced alike).",
    )
    clouds: dict[str, CloudModel] = Field(default_factory=_default_clouds)
    reserved: ReservedFleet = Field(default_factory=ReservedFleet)
    on_demand: OnDemandBaseline = Field(default_factory=OnDemandBaseline)

    def params_for(self, model: str) -> float:
        if self.params_b is not None:
            return self.params_b
        found = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model)
        return float(found.group(1)) if found else 8.0

    def weights_bytes_for(self, model: str) -> float:
        if self.weights_gb is not None:
            return self.weights_gb * 1e9
        return self.params_for(model) * 2e9

    def cloud(self, name: str) -> CloudModel:
        found = self.clouds.get(name)
        if found is None:
            return _default_clouds().get(name) or CloudModel(
                boot_s=150, capacity_error_probability=0
            )
        return found


def load_settings(path: Path | str | None) -> SimSettings:
    """Settings from ``path`` (YAML), or the defaults when None."""
    if path is None:
        return SimSettings()
    return load_model(path, SimSettings)
