"""The floor every other package stands on: the gRPC contract and reading files people write.

- :mod:`common.v1`: the stubs generated from ``proto/spillway/v1/`` (``scripts/gen_protos.py``).
- :mod:`common.configfile`: YAML config files into pydantic models, secrets by reference, and
  the one error shape (``FILE:LINE: FIELD: message``) every command prints.
- :mod:`common.schedulerlink`: how a client reaches the scheduler (config section, TLS, token,
  channel).

This package imports nothing of the project and nothing heavier than pydantic, PyYAML,
protobuf and gRPC: the agent, the gateway and the control plane all import it.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("spillway")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
