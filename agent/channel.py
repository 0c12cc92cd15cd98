"""The agent's connection to the scheduler: :mod:`common.schedulerlink`, which the gateway
and ``spillway status`` share."""

from __future__ import annotations

from common.schedulerlink import CHANNEL_OPTIONS, auth_metadata, open_channel, read_token

__all__ = ["CHANNEL_OPTIONS", "auth_metadata", "open_channel", "read_token"]
