"""The control plane inside the scheduler process: providers, the Temporal worker, and the
workflows kept running for the policy.

:func:`build_providers` turns the scheduler config's ``clouds`` section and the policy's
credential references into adapters (cloud SDKs are imported only for configured clouds).
:class:`ControlHost` connects to Temporal, runs a worker for every workflow and control
activity on the control task queue, starts one deployment workflow per deployment of the
policy (and the sweeper), and signals them when a new policy is loaded. An invalid edit of the
policy never gets this far: the policy store keeps the old one.

Workflow ids are fixed (``deployment-NAME``, ``spillway-sweeper``), so a restarted scheduler
finds the workflows it started before instead of starting a second set. Several schedulers
(active-active) each do the same on one task queue: a start finds the running workflow
(``USE_EXISTING``) and starting twice is harmless; any of their workers may run any task, each
answering from its own fleet state, which is whole because every agent reports to every
scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import Interceptor, Worker

from common.configfile import InputError
from common.temporallink import connect_temporal
from decisions.policy import Policy
from providers.base import SHARED_MEMORY, Provider
from providers.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.fleet import FleetState
from scheduler.policystore import PolicyStore
from workflows.activities import ControlActivities, ControlPlane
from workflows.deployment import DeploymentWorkflow, workflow_id
from workflows.provision import ProvisionWorkflow
from workflows.release import ReleaseWorkflow
from workflows.sweeper import SWEEPER_ID, SweeperWorkflow
from workflows.types import DeploymentInput, DeploymentStatus, PolicyChanged, SweeperInput

log = logging.getLogger(__name__)

WORKFLOWS: list[type[Any]] = [
    DeploymentWorkflow,
    ProvisionWorkflow,
    ReleaseWorkflow,
    SweeperWorkflow,
]


def _environment(names: Sequence[str], cloud: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise InputError(
            f"credentials.{cloud}.env names {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not set in the scheduler's environment"
        )


def build_providers(
    config: SchedulerConfig,
    policy: Policy,
    catalog: Catalog,
    *,
    scheduler_address: str,
    issue_token: Callable[[str], str],
) -> dict[str, Provider]:
    """An adapter per cloud under ``clouds`` (stood in for locally when ``stand_in`` is set)."""
    providers: dict[str, Provider] = {}
    creds = policy.credentials
    clouds = config.clouds
    if clouds.aws is not None:
        import boto3

        from providers.aws.adapter import AwsProvider
        from providers.aws.build import AwsNetwork

        ref = creds.aws
        if ref is not None:
            _environment(ref.env, "aws")
        session = boto3.Session(profile_name=ref.profile if ref is not None else None)
        aws = clouds.aws
        providers["aws"] = AwsProvider(
            catalog=catalog,
            memory=SHARED_MEMORY,
            regions=aws.regions,
            network=AwsNetwork(
                subnets=aws.subnets,
                security_group_ids=tuple(aws.security_group_ids),
                instance_profile_arn=aws.instance_profile_arn,
            ),
            session=session,
            endpoint_url=aws.endpoint_url,
        )
    if clouds.gcp is not None:
        from providers.gcp.adapter import GcpProvider
        from providers.gcp.build import GcpNetwork

        ref = creds.gcp
        if ref is None or not ref.project:
            raise InputError(
                "clouds.gcp is configured but the policy has no credentials.gcp.project"
            )
        credentials: Any = None
        if ref.file is not None:
            from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                str(ref.file), scopes=["https://www.googleapis.com/auth/cloud-platform"]
            )
        _environment(ref.env, "gcp")
        gcp = clouds.gcp
        providers["gcp"] = GcpProvider(
            ref.project,
            catalog=catalog,
            memory=SHARED_MEMORY,
            credentials=credentials,
            api_endpoint=gcp.api_endpoint,
            network=GcpNetwork(
                network=gcp.network, subnetwork=gcp.subnetwork, service_account=gcp.service_account
            ),
        )
    if clouds.azure is not None:
        from providers.azure.adapter import AzureProvider
        from providers.azure.build import AzureNetwork

        ref = creds.azure
        if ref is None or not ref.subscription_id:
            raise InputError(
                "clouds.azure is configured but the policy has no credentials.azure.subscription_id"
            )
        _environment(ref.env, "azure")
        azure = clouds.azure
        providers["azure"] = AzureProvider(
            ref.subscription_id,
            azure.resource_group,
            AzureNetwork(
                subnet_id=azure.subnet_id, admin_ssh_public_key=azure.admin_ssh_public_key
            ),
            catalog=catalog,
            memory=SHARED_MEMORY,
            base_url=azure.base_url,
        )
    if config.stand_in is not None:
        from providers.local import LocalProvider
        from providers.standin import StandInProvider

        local = LocalProvider(
            config.stand_in.state_dir,
            scheduler_address,
            issue_token,
            catalog=catalog,
            memory=SHARED_MEMORY,
            agent_settings=config.stand_in.agent_settings,
        )
        providers = {name: StandInProvider(p, local) for name, p in providers.items()}
    return providers


def images(config: SchedulerConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("aws", "gcp", "azure"):
        cloud = getattr(config.clouds, name)
        if cloud is not None:
            out[name] = cloud.image
    return out


def sticky_timeout(decide_every_s: float) -> timedelta:
    """How long a workflow task waits for the worker that ran the workflow last.

    Several schedulers poll the same task queue (active-active), and each caches the workflows
    it ran; the next task of a workflow goes to that worker first. When that scheduler is
    killed (no goodbye to Temporal), the task waits this long before any worker may take it, so
    it bounds how long a deployment's decisions pause, with the time the other worker then
    takes to replay the run's history: half a decision interval (at least 0.2 s, at most the
    SDK's 10 s). A live worker that misses it costs one replay, nothing else. (A task the killed
    worker had already started waits for the workflow task timeout, 10 s; that one is not
    shortened, because a replay of a long history on a busy machine must still fit in it.)
    """
    return timedelta(seconds=min(10.0, max(0.2, decide_every_s / 2)))


@dataclass
class ControlHost:
    """A running control plane: the worker, and the workflows kept in step with the policy."""

    client: Client
    plane: ControlPlane
    task_queue: str
    sweep_every_s: float
    leak_grace_s: float
    interceptors: Sequence[Interceptor] = ()
    _worker: Worker | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def start(self) -> None:
        self.plane.client = self.client
        self._worker = Worker(
            self.client,
            task_queue=self.task_queue,
            workflows=WORKFLOWS,
            activities=ControlActivities(self.plane).all(),
            interceptors=list(self.interceptors),
            sticky_queue_schedule_to_start_timeout=sticky_timeout(self.plane.decide_every_s),
        )
        self._tasks.append(asyncio.create_task(self._worker.run(), name="control worker"))
        await self.ensure_workflows()

    async def ensure_workflows(self) -> None:
        """Start any deployment workflow (and the sweeper) that is not running."""
        for name in self.plane.policies.policy.deployments:
            await self.client.start_workflow(
                DeploymentWorkflow.run,
                DeploymentInput(name),
                id=workflow_id(name),
                task_queue=self.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
        await self.client.start_workflow(
            SweeperWorkflow.run,
            SweeperInput(every_s=self.sweep_every_s, grace_s=self.leak_grace_s),
            id=SWEEPER_ID,
            task_queue=self.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )

    async def policy_changed(self, digest: str) -> None:
        """A new valid policy is in force: start new deployments' workflows, wake the rest."""
        await self.ensure_workflows()
        for name in self.plane.policies.policy.deployments:
            with contextlib.suppress(Exception):
                await self.client.get_workflow_handle(workflow_id(name)).signal(
                    DeploymentWorkflow.policy_changed, PolicyChanged(digest)
                )

    def on_policy_change(self, _policy: Policy, digest: str) -> None:
        """For :class:`PolicyStore`: called in the event loop when a valid edit is loaded."""
        self._tasks.append(asyncio.get_running_loop().create_task(self.policy_changed(digest)))

    def deployment(self, name: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(workflow_id(name))

    async def status(self, name: str) -> DeploymentStatus:
        status: DeploymentStatus = await self.deployment(name).query(
            "state", result_type=DeploymentStatus
        )
        return status

    async def stop(self) -> None:
        if self._worker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._worker.shutdown(), timeout=15)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def start_control_plane(
    config: SchedulerConfig,
    fleet: FleetState,
    scheduler_address: str,
    *,
    catalog: Catalog | None = None,
    interceptors: Sequence[Interceptor] = (),
    on_launch: Callable[[str, str], None] | None = None,
) -> tuple[ControlHost, PolicyStore]:
    """Load the policy, build the providers, connect to Temporal and start the worker."""
    from providers.catalog import default_catalog
    from scheduler.auth import add_token

    assert config.policy_file is not None and config.temporal is not None
    catalog = catalog or default_catalog()
    store = PolicyStore(config.policy_file, catalog)
    policy = store.load()
    providers = build_providers(
        config,
        policy,
        catalog,
        scheduler_address=scheduler_address,
        issue_token=lambda agent_id: add_token(config.tokens_file, agent_id, "agent"),
    )
    plane = ControlPlane(
        fleet=fleet,
        policies=store,
        catalog=catalog,
        providers=providers,
        settings=config.spill,
        decide_every_s=config.decide_every_s,
        memory=SHARED_MEMORY,
        on_launch=on_launch,
        images=images(config),
    )
    # A refusal (TLS, API key) or a bad credential file is an InputError: one line, exit 2.
    client = await connect_temporal(config.temporal, what="the control plane")
    host = ControlHost(
        client,
        plane,
        config.temporal.task_queue,
        config.spill.sweep_every_s,
        config.spill.leak_grace_s,
        interceptors,
    )
    store.on_change = host.on_policy_change
    await host.start()
    return host, store
