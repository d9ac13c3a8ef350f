"""Helpers for tests that must hold with one partition and with several (REDFLOW_PARTITIONS).

A run's keys live in the partition its id names; worker-wide keys (leases, owned sets, ready
lists, counters) exist once per partition, so a test reads the run's partition or sums over all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redflow import RedflowClient
from redflow.storage.handoffs import Outbox
from redflow.storage.keys import PartitionKeys, partition_index, partition_name
from redflow.storage.store import Store
from redflow.worker.worker import Worker


def store_of(client: RedflowClient, run_id: str) -> Store:
    """The store of the partition ``run_id`` names (the client's store must be prepared)."""
    return client.store.of(run_id)


def keys_of(client: RedflowClient, run_id: str) -> PartitionKeys:
    """The key names of the partition ``run_id`` names."""
    return client.store.of(run_id).keys


def partitions(client: RedflowClient) -> list[Store]:
    return list(client.store.partitions)


def count(client: RedflowClient) -> int:
    return len(client.store.partitions)


async def total(client: RedflowClient, command: Callable[[PartitionKeys], tuple[Any, ...]]) -> int:
    """The sum over every partition of an integer reply, e.g. ``lambda k: ("ZCARD", k.leases)``."""
    result = 0
    for s in client.store.partitions:
        result += int(await s.redis.execute(*command(s.keys)) or 0)
    return result


async def union(client: RedflowClient, command: Callable[[PartitionKeys], tuple[Any, ...]]) -> set[Any]:
    """The union over every partition of a list reply, e.g. ``lambda k: ("SMEMBERS", k.owned(w))``."""
    members: set[Any] = set()
    for s in client.store.partitions:
        members.update(await s.redis.execute(*command(s.keys)) or [])
    return members


async def every(client: RedflowClient, command: Callable[[PartitionKeys], tuple[Any, ...]]) -> list[Any]:
    """The reply of ``command`` in each partition, in partition order."""
    return [await s.redis.execute(*command(s.keys)) for s in client.store.partitions]


def sibling_of(worker: Worker, run_id: str) -> Worker:
    """The worker of ``worker``'s group that claims from the partition ``run_id`` names."""
    group = worker.primary.group
    if len(group) == 1:
        return group[0]
    name = partition_name(partition_index(run_id) or 0)
    return next(w for w in group if w.store.keys.partition == name)


def pin_spread(client: RedflowClient, index: int = 0) -> int:
    """Place every run the client spreads (no key, no limit, no parent) in one partition, for a test
    about what one partition's scripts do with several runs; ``index`` counts from the end when
    negative (-1: the last partition, the home one with a single partition). Needs a ready store."""
    chosen = range(len(client.store.partitions))[index]
    client.store.placement.spread = lambda: chosen  # type: ignore[method-assign]
    return chosen


async def outboxes_empty(client: RedflowClient) -> bool:
    """Whether every partition's outbox has applied all its hand-offs."""
    return all([await Outbox(s).pending() == 0 for s in client.store.partitions])
