"""The Temporal dev server fixture serves a real workflow service."""

from __future__ import annotations

from temporalio.client import Client


async def test_dev_server_answers(temporal_address: str) -> None:
    client = await Client.connect(temporal_address)
    assert client.namespace == "default"
    assert await client.service_client.check_health()
