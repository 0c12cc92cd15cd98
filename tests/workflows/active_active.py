"""Two schedulers, active-active, with one of them killed at random moments of a spill.

Both are real ``spillway scheduler run`` processes on one Temporal task queue, with the same
policy, one tokens file and one stand-in machine directory (a cloud both of them see). A
reserved agent and every stand-in machine report to both (``SPILLWAY_AGENT_SCHEDULER__ADDRESSES``
in their environment, which stand-ins inherit from the scheduler that launched them). Load
saturates the reserved replica, so the deployment rents machines on EC2 (moto); meanwhile,
every round, a seeded random scheduler is killed with SIGKILL at a seeded random moment, kept
down a random while and started again.

What is measured, per kill: from the deployment workflow's history, the last plan decision
(``plan_deployment`` completed) before the kill and the first after it, and which scheduler's
worker made it; from ``GetFleet`` on both, how long after the restarted scheduler first
answered its fleet view (connected agents and their replicas with states) equalled the
survivor's. Over the whole run: every live EC2 machine and stand-in, sampled four times a
second, for duplicates (two machines for one launch key, or more rented machines than the
policy allows) and, after the load stops, for leaks (anything left once the spill is over).

:func:`run_chaos` is shared by ``tests/workflows/test_active_active.py`` (a few rounds) and
``bench/active_active.py`` (many); the figures are ``tests/workflows/chaos_figures.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx
from temporalio.api.enums.v1 import EventType, TimeoutType
from temporalio.client import Client

from common.v1 import agent_pb2 as pb
from providers.catalog import default_catalog
from providers.local import LocalProvider
from scheduler.auth import add_token
from spillway.status import fetch_fleet
from tests.conftest import write_yaml
from tests.workflows.chaos_figures import ChaosReport, ChaosSettings, Kill
from tests.workflows.conftest import STAND_IN_RUNTIME, agent_yaml, ec2_instances
from tests.workflows.test_spill import RUNTIME_ARGS, spill_policy, upload_weights
from workflows.deployment import workflow_id
from workflows.sweeper import SWEEPER_ID

NAMES = ("a", "b")
#: The words of a plan decision made while its scheduler is still learning the fleet.
WARMING_UP = "the scheduler started"
EU_REGIONS = sorted(
    name
    for name, region in default_catalog().cloud("aws").regions.items()
    if region.residency == "eu"
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SchedulerProcess:
    """One ``spillway scheduler run`` on a fixed port; killed with SIGKILL, started again."""

    def __init__(self, name: str, config: Path, port: int, env: dict[str, str], log: Path):
        self.name = name
        self.config = config
        self.address = f"127.0.0.1:{port}"
        self.env = env
        self.log = log.open("ab")
        self.pids: list[int] = []
        self.process = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spillway", "scheduler", "run", "--config", str(self.config)],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.pids.append(self.process.pid)
        return self.process

    def kill(self) -> None:
        self.process.kill()  # no goodbye to Temporal, to the agents or to the gateway
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def fleet_view(fleet: pb.GetFleetResponse) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """Connected agents, and their replicas with states: what must agree across schedulers."""
    agents: list[str] = []
    replicas: list[tuple[str, int]] = []
    for agent in fleet.agents:
        if agent.health != pb.AGENT_HEALTH_CONNECTED:
            continue
        agents.append(agent.registration.agent_id)
        replicas.extend((r.replica_id, r.state) for r in agent.last_report.replicas)
    return tuple(sorted(agents)), tuple(sorted(replicas))


class Chaos:
    def __init__(
        self, root: Path, temporal_address: str, moto_url: str, settings: ChaosSettings
    ) -> None:
        self.root = root
        self.temporal_address = temporal_address
        self.moto_url = moto_url
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.suffix = uuid.uuid4().hex[:6]
        self.name = f"aa-{self.suffix}"
        self.queue = f"aa-{self.suffix}"
        self.tokens = root / "tokens.yaml"
        self.operator = add_token(self.tokens, "oncall", "operator")
        self.machines = root / "machines"
        self.report = ChaosReport(settings)
        self.schedulers: dict[str, SchedulerProcess] = {}
        self.agents: list[subprocess.Popen[bytes]] = []
        self.views: dict[str, pb.GetFleetResponse | None] = {}
        self._load: list[asyncio.Task[None]] = []
        self._loaded_ports: set[int] = set()
        self.keys_seen: set[str] = set()
        self.rented_now: list[dict[str, Any]] = []

    # -- set-up ----------------------------------------------------------------------------

    def _scheduler_config(self, name: str, port: int) -> Path:
        interval = self.settings.interval_s
        return write_yaml(
            self.root / f"scheduler-{name}.yaml",
            {
                "listen": f"127.0.0.1:{port}",
                "metrics_listen": None,
                "tokens_file": str(self.tokens),
                "tokens_reload_every_s": 0.2,
                "report_interval_s": interval,
                "stale_after_intervals": 4,
                "gone_after_intervals": 12,
                "policy_file": str(self.root / "policy.yaml"),
                "policy_reload_every_s": 1,
                "temporal": {"address": self.temporal_address, "task_queue": self.queue},
                "spill": {
                    "weights_dir": str(self.root / "weights"),
                    "weights_endpoint_url": self.moto_url,
                    "register_timeout_s": 60,
                    "start_timeout_s": 60,
                    "prefetch_timeout_s": 60,
                    "drain_timeout_s": 10,
                    "heartbeat_timeout_s": 3,
                    "failure_backoff_s": 2,
                    "sweep_every_s": 1,
                    "leak_grace_s": 5,
                },
                "clouds": {"aws": {"image": "ami-12c6146b", "endpoint_url": self.moto_url}},
                "stand_in": {
                    "state_dir": str(self.machines),
                    "agent_settings": {
                        "runtime": STAND_IN_RUNTIME,
                        "temporal": {"address": self.temporal_address},
                        "reconnect": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
                    },
                },
            },
        )

    def _start_agent(self, agent_id: str, config: Path) -> None:
        log = (self.root / f"{agent_id}.log").open("ab")
        self.agents.append(
            subprocess.Popen(
                [sys.executable, "-m", "spillway", "agent", "run", "--config", str(config)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    async def start(self) -> None:
        weights = upload_weights(self.moto_url, f"aa-{self.suffix}")
        pool = f"reserved-{self.suffix}"
        policy = spill_policy(
            self.name,
            pool,
            weights,
            max_spilled_replicas=self.settings.max_spilled,
            scale_up_window_s=1,
            cool_down_s=3,
        )
        policy["deployments"][self.name]["max_replicas"] = 1 + self.settings.max_spilled
        write_yaml(self.root / "policy.yaml", policy)
        ports = {name: free_port() for name in NAMES}
        addresses = ",".join(f"127.0.0.1:{ports[n]}" for n in NAMES)
        env = {
            **os.environ,
            # Every agent (the reserved one and each stand-in a scheduler launches) reports to
            # both schedulers.
            "SPILLWAY_AGENT_SCHEDULER__ADDRESSES": addresses,
        }
        self.env = env
        for name in NAMES:
            config = self._scheduler_config(name, ports[name])
            self.schedulers[name] = SchedulerProcess(
                name, config, ports[name], env, self.root / f"scheduler-{name}.log"
            )
        agent_id = f"reserved-{self.suffix}"
        token = add_token(self.tokens, agent_id, "agent")
        token_file = self.root / f"{agent_id}.token"
        token_file.write_text(token + "\n")
        seed = self.root / "seed-model"
        seed.mkdir(exist_ok=True)
        config = agent_yaml(
            self.root / f"{agent_id}.yaml",
            agent_id,
            self.schedulers["a"].address,  # replaced by the list in the environment
            token_file,
            self.temporal_address,
            pool=pool,
            gpus=8,
            replicas=[
                {
                    "replica_id": f"{self.name}-seed",
                    "deployment": self.name,
                    "model_path": str(seed),
                    "gpus": list(range(8)),
                    "extra_args": RUNTIME_ARGS,
                }
            ],
        )
        self._start_agent(agent_id, config)
        await self._until(
            lambda: all(
                (v := self.views.get(n)) is not None and f"{self.name}-seed" in _healthy(v)
                for n in NAMES
            ),
            60,
            "both schedulers see the reserved replica",
        )

    # -- observers ---------------------------------------------------------------------------

    async def _poll_views(self) -> None:
        while True:
            for name, process in self.schedulers.items():
                try:
                    self.views[name] = await fetch_fleet(
                        process.address, self.operator, None, deadline_s=0.5
                    )
                except Exception:  # down, starting, or not answering yet
                    self.views[name] = None
            await asyncio.sleep(0.05)

    def _rented(self) -> list[dict[str, Any]]:
        """Live EC2 machines of this run in every region of the ``eu`` lock."""
        found: list[dict[str, Any]] = []
        for region in EU_REGIONS:
            found += ec2_instances(self.moto_url, region, f"provision-{self.name}-")
        return found

    async def _watch_machines(self) -> None:
        cap = self.settings.max_spilled
        while True:
            live = await asyncio.to_thread(self._rented)
            keys = [m["key"] for m in live]
            self.keys_seen.update(keys)
            r = self.report
            r.max_live_machines = max(r.max_live_machines, len(live))
            # Two live machines for one launch key, or machines of two offers of one provision:
            # either is a machine too many.
            for key in {k for k in keys if keys.count(k) > 1}:
                if key not in r.duplicate_keys:
                    r.duplicate_keys.append(key)
            if len(live) > cap:
                r.over_cap += 1
            await asyncio.sleep(0.25)

    def _ports(self) -> list[int]:
        view = next((v for v in self.views.values() if v is not None), None)
        if view is None:
            return []
        out = []
        for agent in view.agents:
            for r in agent.last_report.replicas:
                if r.deployment == self.name and r.state == pb.REPLICA_STATE_HEALTHY:
                    out.append(r.port)
                    if agent.registration.labels.provider == "aws":
                        self.report.rented_served = True
        return out

    async def _drive_load(self) -> None:
        while True:
            for port in self._ports():
                if port not in self._loaded_ports:
                    self._loaded_ports.add(port)
                    for _ in range(self.settings.load_per_replica):
                        self._load.append(asyncio.create_task(_client(port)))
            await asyncio.sleep(0.2)

    # -- the chaos ---------------------------------------------------------------------------

    async def _round(self, number: int) -> None:
        s = self.settings
        await asyncio.sleep(self.rng.uniform(*s.up_s))
        victim = self.rng.choice(NAMES)
        survivor = next(n for n in NAMES if n != victim)
        kill = Kill(number, victim, survivor, killed_at=time.time())
        self.schedulers[victim].kill()
        self.report.kills.append(kill)
        await asyncio.sleep(self.rng.uniform(*s.down_s))
        self.views[victim] = None
        kill.restarted_at = time.time()
        self.schedulers[victim].start()
        await self._until(lambda: self.views.get(victim) is not None, 60, f"{victim} answers")
        kill.answered_at = time.time()
        limit = time.monotonic() + 20 * s.interval_s
        while time.monotonic() < limit:
            mine, theirs = self.views.get(victim), self.views.get(survivor)
            if mine is not None and theirs is not None and fleet_view(mine) == fleet_view(theirs):
                kill.converged_at = time.time()
                break
            await asyncio.sleep(0.02)

    async def run(self) -> ChaosReport:
        started = time.monotonic()
        observers = [
            asyncio.create_task(self._poll_views()),
            asyncio.create_task(self._watch_machines()),
        ]
        try:
            await self.start()
            observers.append(asyncio.create_task(self._drive_load()))
            for number in range(self.settings.rounds):
                await self._round(number)
            # The spill must have reached a rented replica (chaos or not).
            await self._until(lambda: self.report.rented_served, 90, "a rented replica serves")
            for task in self._load:
                task.cancel()
            await asyncio.gather(*self._load, return_exceptions=True)
            released_from = time.monotonic()
            with contextlib.suppress(AssertionError):
                await self._until(
                    lambda: not self.rented_now and not self._stand_ins(),
                    self.settings.release_within_s,
                    "the spill is over",
                    refresh=True,
                )
            self.report.release_s = time.monotonic() - released_from
            self.report.leaked = sorted(
                {m["key"] for m in self._rented()} | {i.key for i in self._stand_ins()}
            )
            self.report.machines_launched = len(self.keys_seen)
            by_provision: dict[str, set[str]] = {}
            for key in self.keys_seen:
                by_provision.setdefault(key.rsplit(".", 1)[0], set()).add(key)
            self.report.duplicate_keys += sorted(
                k for keys in by_provision.values() if len(keys) > 1 for k in keys
            )
            await self._decisions()
        finally:
            for task in observers:
                task.cancel()
            await asyncio.gather(*observers, return_exceptions=True)
            await self.close()
        self.report.elapsed_s = time.monotonic() - started
        return self.report

    def _stand_ins(self) -> list[Any]:
        return LocalProvider(self.machines, "127.0.0.1:1", lambda _: "").list_managed()

    async def _until(
        self, check: Any, within_s: float, what: str, *, refresh: bool = False
    ) -> None:
        deadline = time.monotonic() + within_s
        while True:
            if refresh:
                self.rented_now = await asyncio.to_thread(self._rented)
            if check():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {within_s:g}s")
            await asyncio.sleep(0.1)

    # -- the history -------------------------------------------------------------------------

    async def _decisions(self) -> None:
        """Plan decisions from the deployment workflow's history (every run of it), each with
        the scheduler whose worker made it."""
        client = await Client.connect(self.temporal_address)
        owner = {pid: name for name, p in self.schedulers.items() for pid in p.pids}
        times: list[tuple[float, str]] = []
        timeouts: list[tuple[float, str]] = []
        query = f'WorkflowId="{workflow_id(self.name)}"'
        runs: list[str | None] = [wf.run_id async for wf in client.list_workflows(query)]
        for run_id in runs or [None]:
            history = await client.get_workflow_handle(
                workflow_id(self.name), run_id=run_id
            ).fetch_history()
            scheduled: dict[int, str] = {}
            started_by: dict[int, str] = {}
            task_scheduled: dict[int, float] = {}
            taken_over_at: float | None = None
            for event in history.events:
                kind = event.event_type
                if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                    kind_name = event.activity_task_scheduled_event_attributes.activity_type.name
                    if kind_name == "plan_deployment":
                        scheduled[event.event_id] = ""
                elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                    begun = event.activity_task_started_event_attributes
                    if begun.scheduled_event_id in scheduled:
                        pid = begun.identity.split("@", 1)[0]
                        by = owner.get(int(pid), "?") if pid.isdigit() else "?"
                        started_by[begun.scheduled_event_id] = by
                        if begun.attempt > 1:  # an earlier attempt timed out on a dead worker
                            at = event.event_time.ToDatetime(tzinfo=UTC).timestamp()
                            timeouts.append((at, "plan activity held by the killed worker"))
                elif kind == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
                    child = event.start_child_workflow_execution_initiated_event_attributes
                    if child.workflow_type.name == "provision":
                        self.report.provisions += 1
                    elif child.workflow_type.name == "release":
                        self.report.releases += 1
                elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
                    task_scheduled[event.event_id] = _at(event)
                elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                    if taken_over_at is not None:
                        self.report.takeover_s.append(_at(event) - taken_over_at)
                        taken_over_at = None
                elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT:
                    attrs = event.workflow_task_timed_out_event_attributes
                    held = attrs.timeout_type == TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE
                    what = (
                        "workflow task held by the killed worker"
                        if held
                        else "workflow task waiting for the killed worker"
                    )
                    timeouts.append((_at(event), what))
                    if not held and attrs.scheduled_event_id in task_scheduled:
                        waited = _at(event) - task_scheduled[attrs.scheduled_event_id]
                        self.report.sticky_waits_s.append(waited)
                    taken_over_at = _at(event)
                elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                    done = event.activity_task_completed_event_attributes
                    if done.scheduled_event_id in scheduled:
                        at = event.event_time.ToDatetime(tzinfo=UTC).timestamp()
                        times.append((at, started_by.get(done.scheduled_event_id, "?")))
                        self._check_hold(json.loads(done.result.payloads[0].data))
        times.sort()
        r = self.report
        r.decisions = len(times)
        kills = [k.killed_at for k in r.kills]
        usual = [
            b - a
            for (a, _), (b, _) in itertools.pairwise(times)
            if not any(a < k <= b for k in kills)
        ]
        r.cadence_s = sorted(usual)[len(usual) // 2] if usual else 0.0
        for _, by in times:
            r.decisions_by[by] = r.decisions_by.get(by, 0) + 1
        for kill in r.kills:
            before = [t for t, _ in times if t <= kill.killed_at]
            after = [(t, by) for t, by in times if t > kill.killed_at]
            if before and after:
                kill.last_decision_before = before[-1]
                kill.first_decision_after, kill.first_decision_by = after[0]
                kill.waited_for = [
                    w
                    for t, w in sorted(timeouts)
                    if kill.killed_at < t <= kill.first_decision_after
                ]
                kill.in_earlier_pause = any(
                    kill.last_decision_before < k.killed_at < kill.killed_at for k in r.kills
                )
            else:
                r.errors.append(f"round {kill.round}: no decision around the kill")

    def _check_hold(self, plan: dict[str, Any]) -> None:
        """A scheduler still learning the fleet after its start holds: it starts and releases
        nothing (each scheduler decides that from its own start and its own fleet)."""
        if WARMING_UP in plan.get("reason", ""):
            self.report.warm_up_holds += 1
            if plan.get("starts") or plan.get("releases"):
                self.report.errors.append(f"a scheduler acted while warming up: {plan}")

    # -- clean-up ----------------------------------------------------------------------------

    async def close(self) -> None:
        for task in self._load:
            task.cancel()
        await asyncio.gather(*self._load, return_exceptions=True)
        with contextlib.suppress(Exception):
            client = await Client.connect(self.temporal_address)
            for wid in (workflow_id(self.name), SWEEPER_ID):
                with contextlib.suppress(Exception):
                    await client.get_workflow_handle(wid).terminate("chaos over")
        for scheduler in self.schedulers.values():
            scheduler.stop()
        for agent in self.agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
        local = LocalProvider(self.machines, "127.0.0.1:1", lambda _: "")
        for instance in local.list_managed():
            local.terminate(instance.key)
        import boto3

        for machine in self._rented():
            region = machine["Placement"]["AvailabilityZone"][:-1]
            boto3.client("ec2", region_name=region, endpoint_url=self.moto_url).terminate_instances(
                InstanceIds=[machine["id"]]
            )


def _at(event: Any) -> float:
    return float(event.event_time.ToDatetime(tzinfo=UTC).timestamp())


def _healthy(fleet: pb.GetFleetResponse) -> set[str]:
    return {
        r.replica_id
        for agent in fleet.agents
        for r in agent.last_report.replicas
        if r.state == pb.REPLICA_STATE_HEALTHY
    }


async def _client(port: int) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        while True:
            try:
                await client.post(
                    f"http://127.0.0.1:{port}/generate",
                    json={"text": "hello " * 50, "sampling_params": {"max_new_tokens": 64}},
                )
            except httpx.HTTPError:
                await asyncio.sleep(0.1)


async def run_chaos(
    root: Path, temporal_address: str, moto_url: str, settings: ChaosSettings
) -> ChaosReport:
    return await Chaos(root, temporal_address, moto_url, settings).run()
