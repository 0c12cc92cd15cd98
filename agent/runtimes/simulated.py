"""The ``simulated`` runtime: :mod:`agent.runtimes.simulated_server` launched like SGLang.

Same flags as the ``sglang`` runtime, plus ``--gpu-model`` so the server picks the speed
profile of the GPU it pretends to run on. Needs no GPU and no SGLang; CI and the demo use it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

from agent.runtimes.base import LaunchSpec, gpu_environment, launch_server_args


@dataclass(frozen=True, slots=True)
class SimulatedRuntime:
    python: str = sys.executable
    name: str = "simulated"

    def command(self, spec: LaunchSpec) -> list[str]:
        # The simulated server takes SGLang's own flags, plus the GPU model it imitates.
        return [
            self.python,
            "-m",
            "agent.runtimes.simulated_server",
            *launch_server_args(
                spec, tp_size=max(1, len(spec.gpu_indices)), extra=("--gpu-model", spec.gpu_model)
            ),
        ]

    def environment(self, spec: LaunchSpec, base: Mapping[str, str]) -> dict[str, str]:
        return gpu_environment(spec, base)
