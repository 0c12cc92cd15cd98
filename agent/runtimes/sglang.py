"""The ``sglang`` runtime: the real SGLang server, launched as ``python -m
sglang.launch_server``.

Builds the command line (model path, served model name, host, port, tensor parallel size from
the GPU count, memory fraction, metrics on, then the deployment's extra arguments) and pins the
process to its GPUs with ``CUDA_VISIBLE_DEVICES``. It does not check that SGLang is installed or
that the GPUs exist: the supervisor owns those checks, and a missing package shows up as the
replica's exit reason.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

from agent.runtimes.base import LaunchSpec, gpu_environment, launch_server_args


@dataclass(frozen=True, slots=True)
class SGLangRuntime:
    python: str = sys.executable
    name: str = "sglang"

    def command(self, spec: LaunchSpec) -> list[str]:
        if not spec.gpu_indices:
            raise ValueError("an sglang replica needs at least one GPU")
        return [
            self.python,
            "-m",
            "sglang.launch_server",
            *launch_server_args(spec, tp_size=len(spec.gpu_indices)),
        ]

    def environment(self, spec: LaunchSpec, base: Mapping[str, str]) -> dict[str, str]:
        return gpu_environment(spec, base)
