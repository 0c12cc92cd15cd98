"""Fixtures for the provider tests: fake cloud credentials, moto (in-process and as a real HTTP
server), and a fresh capacity-error memory per test."""

from __future__ import annotations

import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from hypothesis.configuration import set_hypothesis_home_dir

from providers.base import CapacityMemory

# Hypothesis keeps caches; keep them out of the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "spillway-hypothesis")


@pytest.fixture
def memory() -> CapacityMemory:
    return CapacityMemory(ttl_s=600)


@dataclass
class Ec2:
    """An EC2 to test against: a boto3 session (whose clients see the hooks) and an endpoint."""

    session: boto3.Session
    endpoint_url: str | None
    mode: str
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def client(self, region: str) -> Any:
        return self.session.client("ec2", region_name=region, endpoint_url=self.endpoint_url)

    def fail_run_instances(self, code: str, when: Callable[[dict[str, Any]], bool]) -> None:
        """Answer RunInstances with an EC2 error ``code`` whenever ``when(params)`` holds."""

        def hook(context: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
            if not when(context["api_params"]):
                return None
            status = 500 if code.startswith("Insufficient") else 400
            body = {
                "Error": {"Code": code, "Message": f"injected {code}"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            }
            return AWSResponse("https://ec2.invalid", status, {}, None), body

        self.session.events.register("before-call.ec2.RunInstances", hook)

    def run_instances_calls(self) -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == "RunInstances"]


@pytest.fixture(params=["in-process", "http-server"])
def ec2(request: pytest.FixtureRequest, aws_credentials: None) -> Iterator[Ec2]:
    """Moto in-process (``mock_aws``) and moto as a real HTTP server reached by endpoint_url."""
    if request.param == "in-process":
        from moto import mock_aws

        with mock_aws():
            # Created inside the mock: moto hooks sessions as they are made.
            env = Ec2(boto3.Session(), None, request.param)
            _record_calls(env)
            yield env
    else:
        url: str = request.getfixturevalue("moto_server")
        reset = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=10).close()
        env = Ec2(boto3.Session(), url, request.param)
        _record_calls(env)
        yield env


def _record_calls(env: Ec2) -> None:
    def record(params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        env.calls.append((model.name, dict(params)))
        context["api_params"] = params  # for the before-call hooks of fail_run_instances

    env.session.events.register("provide-client-params.ec2.*", record)
