"""The benchmark origin for ``bench/prefetch.py``: a model-shaped data tree in a temporary
directory and one nginx (one worker, ``sendfile on``) serving it on three loopback ports.

- ``uncapped``: as fast as nginx and the machine go;
- ``capped``: ``limit_rate 50m`` per request, like an object store's per-connection limit;
- ``latency``: the same cap plus 30 ms before the first byte of every answer (the echo
  module's ``echo_sleep`` then ``echo_exec`` into the file location).

Paths are ``/<bucket>/<model>/<file>``, so S3 tools can treat the origin as a path-style bucket
for GETs and HEADs (there is no listing). Nothing here is used by Spillway itself, and the data
is never written inside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BUCKET = "models"
MODEL = "bench-model"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
MiB = 1024 * 1024


@dataclass
class Origin:
    name: str
    port: int

    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def make_tree(root: Path, shards: int, shard_mib: int) -> dict[str, int]:
    """Write the model under ``root/BUCKET/MODEL``; return relative path -> size."""
    model = root / BUCKET / MODEL
    model.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    block = os.urandom(8 * MiB)
    for index in range(1, shards + 1):
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        data_len = shard_mib * MiB - 4096
        tensor = f"layers.{index}.weight"
        header = json.dumps(
            {tensor: {"dtype": "U8", "shape": [data_len], "data_offsets": [0, data_len]}}
        ).encode()
        header += b" " * (4096 - 8 - len(header))
        with (model / name).open("wb") as handle:
            handle.write(struct.pack("<Q", len(header)) + header)
            written = 0
            while written < data_len:
                # Rotate the random block so no two chunks are the same.
                chunk = block[written % len(block) :] + block[: written % len(block)]
                piece = chunk[: min(len(chunk), data_len - written)]
                handle.write(piece)
                written += len(piece)
        sizes[name] = shard_mib * MiB
        weight_map[tensor] = name
    small = {
        "config.json": json.dumps({"architectures": ["BenchForCausalLM"], "hidden_size": 8192}),
        "generation_config.json": json.dumps({"max_new_tokens": 256}),
        "tokenizer_config.json": json.dumps({"model_max_length": 131072}),
        "tokenizer.json": json.dumps({"vocab": {f"t{i}": i for i in range(60000)}}),
        "model.safetensors.index.json": json.dumps({"weight_map": weight_map}),
    }
    for name, text in small.items():
        (model / name).write_text(text)
        sizes[name] = len(text.encode())
    return sizes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Nginx:
    def __init__(self, root: Path, work: Path, rate: str = "50m", delay_s: float = 0.03) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise SystemExit("nginx is not installed: apt-get install nginx-light")
        self.origins = [Origin("uncapped", _free_port()), Origin("capped", _free_port())]
        echo = ECHO_MODULE.exists()
        if echo:
            self.origins.append(Origin("latency", _free_port()))
        temp = work / "tmp"
        temp.mkdir(parents=True, exist_ok=True)
        lines = [f"load_module {ECHO_MODULE};"] if echo else []
        if os.geteuid() == 0:
            lines.append("user root;")
        lines += [
            "daemon off;",
            "worker_processes 1;",
            f"pid {work / 'nginx.pid'};",
            f"error_log {work / 'error.log'} error;",
            "events { worker_connections 4096; }",
            "http {",
            "  access_log off;",
            "  sendfile on;",
            "  tcp_nopush on;",
            "  keepalive_requests 100000;",
            *(
                f"  {k}_temp_path {temp};"
                for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ),
            f"  server {{ listen 127.0.0.1:{self.origins[0].port}; root {root}; }}",
            f"  server {{ listen 127.0.0.1:{self.origins[1].port}; root {root}; "
            f"limit_rate {rate}; }}",
        ]
        if echo:
            lines += [
                f"  server {{ listen 127.0.0.1:{self.origins[2].port}; root {root};",
                f"    location / {{ echo_sleep {delay_s}; echo_exec @file; }}",
                f"    location @file {{ limit_rate {rate}; }}",
                "  }",
            ]
        lines.append("}")
        conf = work / "nginx.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [binary, "-c", str(conf), "-e", str(work / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        for origin in self.origins:
            while True:
                if self.process.poll() is not None:
                    raise SystemExit(f"nginx exited: {(work / 'error.log').read_text()}")
                try:
                    with socket.create_connection(("127.0.0.1", origin.port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("nginx did not open its ports") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
