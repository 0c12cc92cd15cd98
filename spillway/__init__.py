"""Spillway: a hybrid inference control plane.

This package is the front door and the top of the import graph: the ``spillway`` command
(:mod:`spillway.cli`, which imports each subcommand's code only when it runs), the processes it
starts (:mod:`spillway.serve`: the scheduler with its control-plane worker, the agent with its
node worker), and the demo. Nothing below imports it.
"""

from __future__ import annotations

from common import __version__

__all__ = ["__version__"]
