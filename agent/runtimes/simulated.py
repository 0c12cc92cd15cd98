"""The ``simulated`` runtime: :mod:`agent.runtimes.simulated_server` launched like SGLang.

Same flags as the ``sglang`` runtime, plus ``--gpu-model`` so the server picks the speed
profile of the GPU it pretends to run on. Needs no GPU and no SGLang; CI and the demo use it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

from agent.runtimes.base import LaunchSpec, gpu_environment


@dataclass(frozen=True, slots=True)
class SimulatedRuntime:
    python: str = sys.executable
    name: str = "simulated"

    def command(self, spec: LaunchSpec) -> list[str]:
        command = [
            self.python,
            "-m",
            "agent.runtimes.simulated_server",
            "--model-path",
            str(spec.model_path),
            "--served-model-name",
            spec.served_model_name,
            "--host",
            spec.host,
            "--port",
            str(spec.port),
            "--tp-size",
            str(max(1, len(spec.gpu_indices))),
            "--enable-metrics",
            "--gpu-model",
            spec.gpu_model,
        ]
        if spec.mem_fraction_static is not None:
            command += ["--mem-fraction-static", f"{spec.mem_fraction_static:g}"]
        return command + list(spec.extra_args)

    def environment(self, spec: LaunchSpec, base: Mapping[str, str]) -> dict[str, str]:
        return gpu_environment(spec, base)
