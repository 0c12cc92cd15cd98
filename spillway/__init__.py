"""Spillway: a hybrid inference control plane.

This package is the front door (the ``spillway`` command) and holds the generated gRPC stubs in
``spillway.v1``. Keep it light: the agent imports it, so nothing here may pull in the scheduler,
the cloud SDKs or Temporal.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("spillway")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
