"""The gateway's parts without a network: the queue, warm-up caps, fleet merging after a
scheduler restart, affinity keys, usage parsing."""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import pytest

from decisions.endpoints import GatewayRouting
from decisions.policy import Policy
from decisions.routing import Tier
from gateway.app import affinity_key
from gateway.fleet import FleetView, RoutableReplica
from gateway.metrics import GatewayMetrics
from gateway.proxy import usage_of, usage_of_stream
from gateway.queue import Refused, WaitQueue
from gateway.targets import Deployments
from tests.gateway.conftest import deployment

# -- the queue ------------------------------------------------------------------------------------


class Capacity:
    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.released: list[str] = []

    def grant(self, name: str) -> str | None:
        if self.free <= 0:
            return None
        self.free -= 1
        return name


async def test_waiters_are_granted_in_order_as_capacity_appears() -> None:
    cap = Capacity()
    queue: WaitQueue[str] = WaitQueue(10, 5.0, cap.released.append)
    order: list[str] = []

    async def wait(name: str) -> None:
        order.append(await queue.wait(lambda: cap.grant(name), plain=True, sheddable=False))

    tasks = [asyncio.create_task(wait(n)) for n in "abcd"]
    await asyncio.sleep(0)
    assert len(queue) == 4
    cap.free = 2
    assert queue.pump() == 2
    await asyncio.sleep(0)
    assert order == ["a", "b"] and len(queue) == 2
    cap.free = 5
    queue.pump()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "d"] and len(queue) == 0


async def test_a_limited_waiter_that_gets_nothing_does_not_block_the_rest() -> None:
    cap = Capacity()
    queue: WaitQueue[str] = WaitQueue(10, 5.0, cap.released.append)
    limited = asyncio.create_task(queue.wait(lambda: None, plain=False, sheddable=False))
    plain = asyncio.create_task(queue.wait(lambda: cap.grant("p"), plain=True, sheddable=False))
    await asyncio.sleep(0)
    cap.free = 1
    queue.pump()
    assert await plain == "p"
    assert not limited.done()
    limited.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await limited
    assert len(queue) == 0


async def test_full_queue_sheds_the_newest_sheddable_waiter_for_a_normal_request() -> None:
    queue: WaitQueue[str] = WaitQueue(2, 5.0, lambda _: None)
    old_shed = asyncio.create_task(queue.wait(lambda: None, plain=True, sheddable=True))
    new_shed = asyncio.create_task(queue.wait(lambda: None, plain=True, sheddable=True))
    await asyncio.sleep(0)
    normal = asyncio.create_task(queue.wait(lambda: None, plain=True, sheddable=False))
    await asyncio.sleep(0)
    with pytest.raises(Refused) as refused:
        await new_shed
    assert refused.value.status == 429 and refused.value.reason == "shed"
    assert not old_shed.done() and len(queue) == 2
    with pytest.raises(Refused) as full:
        await queue.wait(lambda: None, plain=True, sheddable=True)
    assert full.value.reason == "queue_full" and full.value.retry_after_s >= 1
    for task in (old_shed, normal):
        task.cancel()
    await asyncio.gather(old_shed, normal, return_exceptions=True)


async def test_timeout_is_503_and_a_grant_cancelled_in_flight_is_given_back() -> None:
    queue: WaitQueue[str] = WaitQueue(4, 0.05, lambda _: None)
    with pytest.raises(Refused) as late:
        await queue.wait(lambda: None, plain=True, sheddable=False)
    assert late.value.status == 503 and late.value.reason == "queue_timeout"
    assert queue.timeouts == 1

    released: list[str] = []
    queue = WaitQueue(4, 5.0, released.append)
    free = [False]
    task = asyncio.create_task(
        queue.wait(lambda: "slot" if free[0] else None, plain=True, sheddable=False)
    )
    await asyncio.sleep(0)
    free[0] = True
    queue.pump()  # granted ...
    task.cancel()  # ... and the client left before it could use it
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert released == ["slot"]


async def test_zero_size_queue_refuses_at_once() -> None:
    queue: WaitQueue[str] = WaitQueue(0, 5.0, lambda _: None)
    with pytest.raises(Refused):
        await queue.wait(lambda: None, plain=True, sheddable=False)


# -- targets ------------------------------------------------------------------------------------


def _replica(replica_id: str, state: str = "healthy", **kw: object) -> RoutableReplica:
    fields: dict[str, object] = {
        "replica_id": replica_id,
        "deployment": "chat",
        "agent_id": "a",
        "host": "127.0.0.1",
        "port": 9,
        "pool": "reserved-eu",
        "provider": "onprem",
        "region": "eu-frankfurt",
        "residency_group": "eu",
        "state": state,
    }
    fields.update(kw)
    return RoutableReplica(**fields)  # type: ignore[arg-type]


def _deployments(**gateway: Any) -> Deployments:
    deployments = Deployments(GatewayMetrics())
    spec = deployment(**gateway)
    deployments.apply_policy(Policy.model_validate({"deployments": {"chat": spec}}))
    return deployments


def test_a_new_replica_warms_up_from_one_to_its_cap() -> None:
    deployments = _deployments(
        warmup_s=10, max_concurrency_per_replica=32, admission={"adaptive": False}
    )
    fleet = deployments.fleet
    fleet.apply([_replica("old")], "s1", 1.0)  # the first fleet: already warm
    fleet.apply([_replica("old"), _replica("new", max_running_requests=16)], "s1", 1.0)
    dep = deployments.by_name["chat"]
    old, new = dep.replicas["old"], dep.replicas["new"]
    assert old.healthy_since == -math.inf and old.cap_at(0.0, 10) == 32
    start = new.healthy_since
    assert new.base_cap == 16  # the smaller of the policy's and the replica's own
    assert [new.cap_at(start + t, 10) for t in (0, 2.5, 5, 9.99, 10, 60)] == [1, 4, 8, 15, 16, 16]
    # Unhealthy and back: warm-up starts over.
    fleet.apply([_replica("old"), _replica("new", state="starting")], "s1", 1.0)
    assert not new.healthy and new.target(start, 10).accepting is False
    fleet.apply([_replica("old"), _replica("new")], "s1", 1.0)
    assert new.healthy_since > start
    assert new.tier is Tier.RESERVED
    fleet.apply([_replica("old"), _replica("new", pool="spill-aws", provider="aws")], "s1", 1.0)
    assert (new.tier, new.cloud) == (Tier.RENTED, "aws")


def test_default_cap_and_replicas_of_other_deployments() -> None:
    deployments = _deployments()
    deployments.fleet.apply([_replica("a"), _replica("b", deployment="elsewhere")], "s1", 1.0)
    (slot,) = deployments.by_name["chat"].replicas.values()
    assert slot.base_cap == 256 and slot.target_id == "a"


def test_a_restarted_scheduler_does_not_empty_the_fleet_at_once() -> None:
    changes: list[int] = []
    view = FleetView(lambda: changes.append(1))
    view.apply([_replica("a"), _replica("b")], "first", 1.0, now=100.0)
    view.apply([], "first", 1.0, now=101.0)  # the same scheduler: it really lost them
    assert view.replicas == {}
    view.apply([_replica("a"), _replica("b")], "first", 1.0, now=102.0)
    view.apply([_replica("b", state="draining")], "second", 1.0, now=103.0)  # restarted
    assert set(view.replicas) == {"a", "b"} and view.replicas["b"].state == "draining"
    view.apply([_replica("b")], "second", 1.0, now=104.9)
    assert set(view.replicas) == {"a", "b"}
    view.apply([_replica("b")], "second", 1.0, now=105.1)  # two intervals later
    assert set(view.replicas) == {"b"}
    assert len(changes) == 6


# -- what is read of a request and an answer ------------------------------------------------------


def test_affinity_key_by_session_user_then_prompt() -> None:
    routing = GatewayRouting(affinity_prefix_chars=16)
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello world!"}]},
        ],
        "user": "u1",
    }
    assert affinity_key({"x-session-id": "s1"}, chat, "chat", routing) == "s:s1"
    assert affinity_key({}, chat, "chat", routing) == "u:u1"
    del chat["user"]
    assert affinity_key({}, chat, "chat", routing) == "p:be briefhello wo"
    assert affinity_key({}, {"prompt": "x" * 40}, "completions", routing) == "p:" + "x" * 16
    assert affinity_key({}, {"prompt": ["first", "second"]}, "completions", routing) == "p:first"
    assert affinity_key({}, {"input_ids": [1, 2, 3]}, "generate", routing) == "p:1,2,3"
    assert affinity_key({}, {"messages": []}, "chat", routing) is None
    off = GatewayRouting(affinity=False)
    assert affinity_key({}, {"prompt": "x"}, "completions", off) is None
    assert affinity_key({"x-session-id": "s"}, {}, "completions", off) == "s:s"


def test_usage_from_answers_and_streams() -> None:
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 5}}, "chat") == (3, 5)
    meta = {"meta_info": {"prompt_tokens": 2, "completion_tokens": 4}}
    assert usage_of(meta, "generate") == (2, 4)
    assert usage_of([meta, meta], "generate") == (4, 8)
    assert usage_of({"usage": None}, "chat") is None
    tail = (
        b'data: {"choices": [], "usage": null}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage_of_stream(tail, "chat") == (9, 1)
    assert usage_of_stream(b'data: {"usage": null}\n\ndata: [DONE]\n\n', "chat") is None
    assert usage_of_stream(b"data: [DONE]\n\n", "completions") is None
