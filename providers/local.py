"""The ``local`` provider: a "machine" is a ``spillway agent run`` process on this host.

It stands in for a booted cloud VM in demos and end-to-end tests. Launching writes an agent
config with a static GPU inventory of the asked SKU and count (so the agent registers exactly
like a fresh VM would), and starts the agent in its own process group; terminating sends SIGTERM
to the group, waits, then SIGKILL. Stopping does the same but keeps the config, the token and the
agent's state directory, and starting runs the agent again from them, as a stopped VM keeps its
disk. One small JSON record per key in ``state_dir`` makes launch
idempotent across provider objects and restarts.

Instance types are fungible SKU requests, ``"H100-80GB:8"``; the only region is ``region``
(default ``local``). This module must not import the agent or scheduler code: it talks to the
agent through its config file and command line only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from providers.base import (
    KEY_LABEL,
    MANAGED_LABEL,
    CapacityMemory,
    Instance,
    LaunchRequest,
    Provider,
    check_key,
    check_labels,
    resource_name,
)
from providers.catalog import Catalog, Offer, OfferRequest, parse_sku_request
from providers.errors import ProviderError, ResidencyError, UnknownRegionError


@dataclasses.dataclass(frozen=True)
class _Record:
    key: str
    agent_id: str
    pid: int
    instance_type: str
    region: str
    config: str
    log: str
    labels: dict[str, str]
    #: Stopped by :meth:`LocalProvider.stop`: no process, its config and state kept.
    stopped: bool = False


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class LocalProvider(Provider):
    """Agent processes on this host that register with ``scheduler_address``.

    ``issue_token(agent_id)`` returns a bearer token the scheduler accepts for that agent id
    (the provider writes it to a 0600 file next to the agent's config).
    """

    cloud = "local"

    def __init__(
        self,
        state_dir: Path,
        scheduler_address: str,
        issue_token: Callable[[str], str],
        *,
        catalog: Catalog | None = None,
        memory: CapacityMemory | None = None,
        region: str = "local",
        residency: str = "local",
        pool: str = "spill-local",
        command: Sequence[str] = (sys.executable, "-m", "spillway"),
        agent_settings: Mapping[str, Any] | None = None,
        stop_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(catalog, memory)
        self.state_dir = Path(state_dir)
        self.scheduler_address = scheduler_address
        self.region = region
        self.residency = residency
        self.pool = pool
        self._issue_token = issue_token
        self._command = tuple(command)
        self._agent_settings = dict(agent_settings or {})
        self._stop_timeout_s = stop_timeout_s
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # -- records -------------------------------------------------------------------------------

    def _record_path(self, key: str) -> Path:
        return self.state_dir / f"{resource_name(key)}.json"

    def _read(self, path: Path) -> _Record | None:
        try:
            return _Record(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _is_running(self, record: _Record) -> bool:
        if record.pid <= 0:
            return False
        child = self._children.get(record.pid)
        if child is not None:
            return child.poll() is None
        return _alive(record.pid)

    def _instance(self, record: _Record) -> Instance:
        return Instance(
            key=record.key,
            cloud="local",
            instance_id=record.agent_id,
            instance_type=record.instance_type,
            region=record.region,
            zone="",
            state="stopped" if record.stopped else "running",
            labels=record.labels,
        )

    # -- the contract --------------------------------------------------------------------------

    def offers(self, request: OfferRequest) -> list[Offer]:
        """One free offer for any known SKU, when this host's region passes the request."""
        if request.clouds and self.cloud not in request.clouds:
            return []
        self.catalog.sku(request.sku)
        if request.residency and self.residency not in request.residency:
            return []
        if request.allowed_regions is not None and self.region not in request.allowed_regions:
            return []
        sku = self.catalog.skus[request.sku]
        return [
            Offer(
                cloud="local",
                instance_type=f"{request.sku}:{request.gpus}",
                sku=request.sku,
                gpus=request.gpus,
                gpu_memory_gib=sku.memory_gib,
                vcpus=os.cpu_count() or 1,
                ram_gib=0,
                region=self.region,
                residency=self.residency,
                zones=("",),
                usd_per_hour=0.0,
                priced_on=min(c.priced_on for c in self.catalog.clouds.values()),
            )
        ]

    def _check(self, request: LaunchRequest) -> tuple[str, int]:
        check_key(request.key)
        if request.region not in request.allowed_regions:
            raise ResidencyError(
                f"local: launch of {request.key!r} in {request.region} refused: the request is "
                f"locked to {', '.join(sorted(request.allowed_regions)) or 'none'}",
                cloud="local",
            )
        if request.residency and self.residency not in request.residency:
            raise ResidencyError(
                f"local: launch of {request.key!r} refused: this host is in residency group "
                f"{self.residency!r}, the request allows {', '.join(sorted(request.residency))}",
                cloud="local",
            )
        if request.region != self.region:
            raise UnknownRegionError(
                f"local: no region {request.region!r}; this provider has only {self.region!r}",
                cloud="local",
            )
        sku, gpus = parse_sku_request(request.instance_type)
        self.catalog.sku(sku)
        return sku, gpus

    def launch(self, request: LaunchRequest) -> Instance:
        sku_name, gpus = self._check(request)
        sku = self.catalog.skus[sku_name]
        return self.boot(
            request,
            provider="local",
            region=self.region,
            zone="",
            residency=self.residency,
            instance_id=resource_name(request.key),
            gpu_model=sku.gpu_model,
            memory_gib=sku.memory_gib,
            gpus=gpus,
            pool=self.pool,
        )

    def agent_id_for(self, key: str) -> str:
        """The agent id (and instance id) of the machine for ``key``."""
        return resource_name(key)

    def boot(
        self,
        request: LaunchRequest,
        *,
        provider: str,
        region: str,
        zone: str,
        residency: str,
        instance_id: str,
        gpu_model: str,
        memory_gib: float,
        gpus: int,
        pool: str,
        extra_labels: Mapping[str, str] | None = None,
    ) -> Instance:
        """Start the agent for ``request.key`` with these labels, or return the running one.

        The agent registers as a machine of ``provider`` in ``region`` would: same labels, a
        static inventory of ``gpus`` GPUs of ``gpu_model``, and the ownership and key labels.
        """
        with self._lock:
            path = self._record_path(request.key)
            record = self._read(path)
            if record is not None and self._is_live(record):
                return self._instance(record)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            agent_id = resource_name(request.key)
            token_file = self.state_dir / f"{agent_id}.token"
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(self._issue_token(agent_id) + "\n")
            labels = {
                **request.labels,
                **(extra_labels or {}),
                MANAGED_LABEL: "true",
                KEY_LABEL: request.key,
            }
            config: dict[str, Any] = {
                "agent_id": agent_id,
                "scheduler": {"address": self.scheduler_address, "token_file": str(token_file)},
                "labels": {
                    "pool": pool,
                    "provider": provider,
                    "region": region,
                    "zone": zone,
                    "residency_group": residency,
                    "instance_id": instance_id,
                    "extra": {k: str(v) for k, v in labels.items()},
                },
                "gpus": {
                    "discovery": "static",
                    "static": [{"model": gpu_model, "memory_gib": memory_gib, "count": gpus}],
                },
                "reconnect": {"initial_backoff_s": 0.2, "max_backoff_s": 2.0},
            }
            config.update(self._agent_settings)
            config_file = self.state_dir / f"{agent_id}.yaml"
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            log_file = self.state_dir / f"{agent_id}.log"
            if request.user_data:
                self._write_user_data(agent_id, request)
            child = self._spawn(config_file, log_file)
            record = _Record(
                key=request.key,
                agent_id=agent_id,
                pid=child.pid,
                instance_type=request.instance_type,
                region=region,
                config=str(config_file),
                log=str(log_file),
                labels=labels,
            )
            path.write_text(json.dumps(dataclasses.asdict(record)))
            return self._instance(record)

    def _spawn(self, config_file: Path, log_file: Path) -> subprocess.Popen[bytes]:
        """Start ``spillway agent run`` with ``config_file``, in its own process group."""
        env = dict(os.environ)
        # Per agent id below this: replica state and logs survive a stop, like a VM's disk.
        env["XDG_STATE_HOME"] = str(self.state_dir / "agent-state")
        with log_file.open("ab") as log:
            try:
                child = subprocess.Popen(
                    [*self._command, "agent", "run", "--config", str(config_file)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group, stopped as one
                )
            except OSError as exc:
                raise ProviderError(
                    f"local: cannot start {self._command[0]}: {exc}", cloud="local"
                ) from exc
        self._children[child.pid] = child
        return child

    def _write_user_data(self, agent_id: str, request: LaunchRequest) -> Path:
        """Keep the boot payload next to the config, as a VM would receive it (not executed)."""
        path = self.state_dir / f"{agent_id}.user-data"
        path.write_text(request.user_data)
        return path

    def describe(self, key: str) -> Instance | None:
        record = self._read(self._record_path(key))
        if record is None or not self._is_live(record):
            return None
        return self._instance(record)

    def _is_live(self, record: _Record) -> bool:
        return record.stopped or self._is_running(record)

    def stop(self, key: str) -> Instance | None:
        """Stop the agent process group; its config, token, state directory and the weights it
        fetched stay, as a stopped VM keeps its disk."""
        with self._lock:
            path = self._record_path(key)
            record = self._read(path)
            if record is None or not self._is_live(record):
                return None
            if not record.stopped:
                self._stop(record.pid)
                record = dataclasses.replace(record, stopped=True, pid=0)
                path.write_text(json.dumps(dataclasses.asdict(record)))
            return self._instance(record)

    def start(self, key: str) -> Instance | None:
        """Start the agent of a stopped machine again with the config it had."""
        with self._lock:
            path = self._record_path(key)
            record = self._read(path)
            if record is None or not self._is_live(record):
                return None
            if record.stopped:
                child = self._spawn(Path(record.config), Path(record.log))
                record = dataclasses.replace(record, stopped=False, pid=child.pid)
                path.write_text(json.dumps(dataclasses.asdict(record)))
            return self._instance(record)

    def set_labels(self, key: str, labels: Mapping[str, str | None]) -> None:
        check_labels("local", labels)
        with self._lock:
            path = self._record_path(key)
            record = self._read(path)
            if record is None:
                return
            merged = dict(record.labels)
            for name, value in labels.items():
                if value is None:
                    merged.pop(name, None)
                else:
                    merged[name] = value
            path.write_text(json.dumps(dataclasses.asdict(record) | {"labels": merged}))

    def terminate(self, key: str) -> None:
        with self._lock:
            path = self._record_path(key)
            record = self._read(path)
            if record is None:
                return
            if not record.stopped:
                self._stop(record.pid)
            for name in (path, Path(record.config), self.state_dir / f"{record.agent_id}.token"):
                with contextlib.suppress(FileNotFoundError):
                    name.unlink()

    def _stop(self, pid: int) -> None:
        child = self._children.pop(pid, None)
        if child is not None and child.poll() is not None:
            return
        if child is None and not _alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        while time.monotonic() < deadline:
            if (child.poll() is not None) if child is not None else not _alive(pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if child is not None:
            child.wait(timeout=5)

    def list_managed(self) -> list[Instance]:
        if not self.state_dir.is_dir():
            return []
        found = []
        for path in sorted(self.state_dir.glob("*.json")):
            record = self._read(path)
            if record is not None and self._is_live(record):
                found.append(self._instance(record))
        return found
