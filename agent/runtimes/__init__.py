"""Inference server runtimes the supervisor can launch: ``sglang`` and ``simulated``."""

from __future__ import annotations

import sys

from agent.runtimes.base import Health, LaunchSpec, Runtime, ServerClient
from agent.runtimes.sglang import SGLangRuntime
from agent.runtimes.simulated import SimulatedRuntime

RUNTIME_NAMES = ("sglang", "simulated")


def runtimes(python: str | None = None) -> dict[str, Runtime]:
    """Every runtime by name; ``python`` is the interpreter that launches the servers."""
    interpreter = python or sys.executable
    return {
        "sglang": SGLangRuntime(python=interpreter),
        "simulated": SimulatedRuntime(python=interpreter),
    }


__all__ = [
    "RUNTIME_NAMES",
    "Health",
    "LaunchSpec",
    "Runtime",
    "SGLangRuntime",
    "ServerClient",
    "SimulatedRuntime",
    "runtimes",
]
