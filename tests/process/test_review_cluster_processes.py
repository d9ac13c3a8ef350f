"""Review attacks on today's Redis Cluster support with real server processes: each test starts its own
local cluster (tests/cluster_harness.py; 3 masters, one replica each) and fails a master over — by
SIGKILL (the connections break) or by SIGSTOP (half-open: the frozen master keeps its sockets, answers
nothing, and its replica takes over after cluster-node-timeout) — while a handle waits on pub/sub, a
worker blocks in BRPOP, a worker's control channel waits for cancellations. Also: the seed node of
the URL dead at start, and the supervisor forking after a client detected the cluster.

Each test that failed on the engine when it was written names the bug it covers.

This module doubles as the supervisor's app module (``--import tests.process.test_review_cluster_processes``)
when REVIEW_SUP_URL is set: it then defines the workflows below in the default registry and uses its
client at import time, so the supervisor forks a process whose client already detected the cluster.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from redflow import (
    RedflowClient,
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    start_worker,
)
from redflow._redis.errors import ConnectionClosedError
from redflow.errors import CanceledError
from redflow.storage.keys import PartitionKeys
from redflow.worker.worker import Worker

ROOT = Path(__file__).resolve().parents[2]

# --- the supervisor app (only when the supervisor imports this module) ----------------------------

if os.environ.get("REVIEW_SUP_URL"):
    app_client = create_client(url=os.environ["REVIEW_SUP_URL"], prefix=os.environ["REVIEW_SUP_PREFIX"])

    async def _detect() -> bool:
        await app_client.redis.execute("PING")
        await app_client.store.ensure_ready()
        return app_client.redis.is_cluster

    # Before the fork: the client reads INFO cluster, builds its router and loads the scripts.
    if not asyncio.run(_detect()):
        raise SystemExit("the review app expected a cluster")

    async def _counted(ctx: WorkflowHandlerContext[Any]) -> dict[str, Any]:
        async def body() -> int:
            return int(await app_client.redis.execute("INCR", f"{app_client.keys.base}:review:body:{ctx.run.id}"))

        await ctx.step.run("body", body)
        return {"pid": os.getpid(), "cluster": app_client.redis.is_cluster}

    define_workflow("review-sup-counted", handler=_counted)


from ..cluster_harness import ClusterNode, LocalCluster, key_slot  # noqa: E402
from ..conftest import wait_until  # noqa: E402
from .supervised import _children  # noqa: E402

# --- fixtures and helpers ---------------------------------------------------------------------------


def _binary() -> str | None:
    """REDFLOW_TEST_REDIS_SERVER (Redis 6.2 in CI's second pass) or the harness's default, Valkey."""
    return os.environ.get("REDFLOW_TEST_REDIS_SERVER") or None


@pytest.fixture(autouse=True)
def _one_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests fail over the master that holds the prefix: it must hold all of it (a cluster's
    default is 16 partitions, spread over every master)."""
    monkeypatch.setenv("REDFLOW_PARTITIONS", "1")


@pytest.fixture
def replicated() -> Iterator[LocalCluster]:
    cluster = LocalCluster(_binary(), masters=3, replicas_per_master=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()  # SIGKILLs paused nodes too


def _prefix_on(cluster: LocalCluster, master: ClusterNode) -> str:
    for _ in range(2000):
        prefix = f"rft:{uuid.uuid4().hex[:10]}"
        if cluster.slot_owner(key_slot(PartitionKeys(prefix).runs)) is master:
            return prefix
    raise AssertionError(f"no prefix found on {master.name}")


def _freeze_and_fail_over(cluster: LocalCluster, master: ClusterNode) -> ClusterNode:
    """SIGSTOP ``master`` (half-open: its sockets stay, it answers nothing) and wait until its replica
    has taken over and the live nodes form a healthy cluster; return the new master."""
    (replica,) = cluster.replicas_of(master)
    master.stop_process()
    deadline = time.monotonic() + 30
    while replica.current_role() != "master":
        if time.monotonic() > deadline:
            raise AssertionError(f"{replica.name} was not promoted")
        time.sleep(0.05)
    cluster.wait_healthy(30)
    return replica


class Setup:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.owner = cluster.nodes[0]  # the prefix's master, the one that fails over
        self.entry = cluster.nodes[1]  # a master that stays: every URL points here
        self.prefix = _prefix_on(cluster, self.owner)
        self.registry = WorkflowRegistry()
        self.clients: list[RedflowClient] = []
        self.workers: list[Worker] = []

    def client(self) -> RedflowClient:
        c = create_client(url=self.entry.url, prefix=self.prefix)
        c.registry = self.registry
        self.clients.append(c)
        return c

    async def worker(self, **overrides: Any) -> Worker:
        options = StartWorkerOptions(app="review", url=self.entry.url, prefix=self.prefix, registry=self.registry)
        for name, value in overrides.items():
            setattr(options, name, value)
        worker = await start_worker(options)
        self.workers.append(worker)
        return worker

    async def close(self) -> None:
        for node in self.cluster.nodes:
            if node.is_paused():
                node.kill()  # nothing may wait on a frozen node during teardown
        for worker in self.workers:
            await worker.stop(grace_period_ms=0)
        for c in self.clients:
            await c.close()


@pytest.fixture
async def setup(replicated: LocalCluster) -> AsyncIterator[Setup]:
    s = Setup(replicated)
    try:
        yield s
    finally:
        await s.close()


async def _status(client: RedflowClient, run_id: str) -> str | None:
    run = await client.get_run(run_id)
    return None if run is None else str(run["status"])


# --- handle.result() across a failover ----------------------------------------------------------------


async def _subscribed(node: ClusterNode, channel: bytes) -> bool:
    reply = await asyncio.to_thread(node.execute, "PUBSUB", "NUMSUB", channel)
    return int(reply[1]) > 0


async def _is(client: RedflowClient, run_id: str, status: str) -> bool:
    try:
        return await _status(client, run_id) == status
    except ConnectionClosedError:
        return False  # the first command after a failover may meet the dead master once


FAULTS = {"killed": LocalCluster.failover_after_kill, "half-open": _freeze_and_fail_over}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.timeout(120)
async def test_result_returns_after_a_master_fails_over(setup: Setup, fault: str) -> None:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("echo", lambda: ctx.input)

    wf = define_workflow("review-echo", handler=echo, registry=setup.registry)
    waiting = setup.client()
    handle = await waiting.enqueue_definition(wf, 7)
    result = asyncio.ensure_future(handle.result(timeout_ms=60_000))
    await wait_until(lambda: _subscribed(setup.owner, waiting.keys.done_channel(handle.id)), timeout_s=10,
                     interval_s=0.05, what="the waiter subscribed on the owner")
    await asyncio.to_thread(FAULTS[fault], setup.cluster, setup.owner)
    await setup.worker()  # a worker started after the failover claims it on the new master
    checker = setup.client()
    await wait_until(lambda: _is(checker, handle.id, "succeeded"), timeout_s=30, interval_s=0.1, what="run done")
    try:
        # A frozen owner is noticed by the subscriber's keepalive: a PING every 10 s, 2 s to answer.
        assert await asyncio.wait_for(result, 10 + 2 + 8) == 7
    finally:
        result.cancel()


# --- a worker connected before a half-open failover -------------------------------------------------


@pytest.mark.timeout(120)
async def test_idle_worker_resumes_soon_after_a_killed_master_fails_over(setup: Setup) -> None:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    wf = define_workflow("review-echo", handler=echo, registry=setup.registry)
    await setup.worker()
    c = setup.client()
    assert await (await c.enqueue_definition(wf, 1)).result(timeout_ms=15_000) == 1  # now idle in BRPOP
    await asyncio.to_thread(setup.cluster.failover_after_kill, setup.owner)
    began = time.monotonic()
    handle = None
    while handle is None:
        try:
            handle = await c.enqueue_definition(wf, 2)
        except ConnectionClosedError:  # once: the map still named the dead master
            await asyncio.sleep(0.1)
    await wait_until(lambda: _is(c, handle.id, "succeeded"), timeout_s=30, interval_s=0.1, what="run done")
    assert time.monotonic() - began < 8


@pytest.mark.timeout(120)
async def test_idle_worker_resumes_soon_after_a_half_open_master_fails_over(setup: Setup) -> None:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    wf = define_workflow("review-echo", handler=echo, registry=setup.registry)
    await setup.worker()
    c = setup.client()
    assert await (await c.enqueue_definition(wf, 1)).result(timeout_ms=15_000) == 1  # now idle in BRPOP
    await asyncio.to_thread(_freeze_and_fail_over, setup.cluster, setup.owner)
    began = time.monotonic()
    checker = setup.client()  # connected after the failover: reads the new master at once
    handle = await checker.enqueue_definition(wf, 2)
    # The engine's own bound for a silent server is the command deadline (10 s by default).
    await wait_until(lambda: _is(checker, handle.id, "succeeded"), timeout_s=10, interval_s=0.1,
                     what="the run enqueued after the failover to be claimed by the old worker")
    assert time.monotonic() - began < 10


@pytest.mark.timeout(150)
async def test_worker_hears_a_cancel_after_a_half_open_master_fails_over(setup: Setup) -> None:
    async def long_running(ctx: WorkflowHandlerContext) -> str:
        for _ in range(1200):  # 60 s unless canceled
            await asyncio.sleep(0.05)
        return "not canceled"

    wf = define_workflow("review-long", handler=long_running, registry=setup.registry)
    await setup.worker()  # its control subscription lives on the owner
    await asyncio.to_thread(_freeze_and_fail_over, setup.cluster, setup.owner)
    c = setup.client()
    handle = await c.enqueue_definition(wf, None)
    # The same worker picks it up once it found the new master (slowly: see the test above).
    await wait_until(lambda: _is(c, handle.id, "running"), timeout_s=45, interval_s=0.2, what="the run to start")
    assert await c.cancel_run(handle.id, reason="review")
    await wait_until(lambda: _is(c, handle.id, "canceled"), timeout_s=10, interval_s=0.1,
                     what="the cancel to reach the worker")
    with pytest.raises(CanceledError):
        await handle.result(timeout_ms=5_000)


# --- the URL's node dead when a process starts -------------------------------------------------------


@pytest.mark.timeout(90)
async def test_seed_node_dead_at_start_is_a_clear_connection_error(setup: Setup) -> None:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    wf = define_workflow("review-echo", handler=echo, registry=setup.registry)
    seed = setup.cluster.nodes[2]  # a master holding none of the prefix's data
    promoted = await asyncio.to_thread(setup.cluster.failover_after_kill, seed)
    c = create_client(url=seed.url, prefix=setup.prefix)
    c.registry = setup.registry
    setup.clients.append(c)
    with pytest.raises(ConnectionClosedError, match=f"cannot connect to Redis at 127.0.0.1:{seed.port}"):
        await c.enqueue_definition(wf, 1)
    with pytest.raises(ConnectionClosedError, match=f"127.0.0.1:{seed.port}"):
        await start_worker(StartWorkerOptions(app="review", url=seed.url, prefix=setup.prefix,
                                              registry=setup.registry))
    # Any live node's URL, a replica's included, reaches the whole cluster.
    replica = next(n for n in setup.cluster.live_nodes() if n.current_role() == "replica")
    await setup.worker()
    for url in (promoted.url, replica.url):
        other = create_client(url=url, prefix=setup.prefix)
        other.registry = setup.registry
        setup.clients.append(other)
        assert await (await other.enqueue_definition(wf, url)).result(timeout_ms=15_000) == url
        assert other.redis.is_cluster


# --- the supervisor forks after its app module's client detected the cluster ---------------------------


def _start_supervisor(url: str, prefix: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(REVIEW_SUP_URL=url, REVIEW_SUP_PREFIX=prefix)
    return subprocess.Popen(
        [sys.executable, "-m", "redflow.supervisor", "--import", "tests.process.test_review_cluster_processes",
         "--url", url, "--prefix", prefix, "--procs", "2", "--concurrency", "4", "--lease-ms", "1500"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.timeout(120)
async def test_supervisor_forks_after_a_client_detected_the_cluster(replicated: LocalCluster) -> None:
    entry = replicated.nodes[1]
    prefix = _prefix_on(replicated, replicated.nodes[0])
    sup = _start_supervisor(entry.url, prefix)
    c = create_client(url=entry.url, prefix=prefix)
    try:
        await wait_until(lambda: len(_children(sup.pid)) == 2 or sup.poll() is not None, timeout_s=30,
                         interval_s=0.1, what="two worker processes")
        assert sup.poll() is None, sup.stderr.read() if sup.stderr else ""
        # A forked worker registers its workflows once it has started: wait for that, not only for the fork.
        await wait_until(lambda: c.get_workflow_meta("review-sup-counted"), timeout_s=30, interval_s=0.1,
                         what="the workflow registered by a worker")
        handles = [await c.run_by_name("review-sup-counted", n) for n in range(40)]
        results = await asyncio.gather(*(h.result(timeout_ms=40_000) for h in handles))
        assert all(r["cluster"] for r in results)
        pids = {r["pid"] for r in results}
        assert pids <= {p.pid for p in _children(sup.pid)} and len(pids) >= 1
        for h in handles:
            assert await c.redis.execute("GET", f"{c.keys.base}:review:body:{h.id}") == b"1"
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
    finally:
        for child in _children(sup.pid):
            child.kill()
        if sup.poll() is None:
            sup.kill()
        sup.wait()
        if sup.stderr is not None:
            sup.stderr.close()
        await c.close()


# --- a frozen master without a replica: the cluster stalls, then resumes ------------------------------


@pytest.mark.timeout(120)
async def test_everything_resumes_after_a_frozen_master_without_replica_wakes() -> None:
    cluster = LocalCluster(_binary(), masters=3, replicas_per_master=0).start()
    s = Setup(cluster)
    try:
        async def echo(ctx: WorkflowHandlerContext) -> Any:
            return await ctx.step.run("echo", lambda: ctx.input)

        wf = define_workflow("review-echo", handler=echo, registry=s.registry)
        await s.worker()
        c = s.client()
        assert await (await c.enqueue_definition(wf, 0)).result(timeout_ms=15_000) == 0  # worker idle in BRPOP
        waiting_handle = await c.enqueue_definition(wf, 1)
        s.owner.stop_process()
        # Long enough for every deadline to fire (heartbeat 2.5 s, the node marked failed at 2 s: the
        # other masters answer CLUSTERDOWN), short of the 10 s command deadline of a handle's read.
        await asyncio.sleep(6)
        s.owner.resume()
        await asyncio.to_thread(cluster.wait_healthy, 30)
        began = time.monotonic()
        assert await waiting_handle.result(timeout_ms=30_000) == 1
        fresh = s.client()
        assert await (await fresh.enqueue_definition(wf, 2)).result(timeout_ms=30_000) == 2
        assert time.monotonic() - began < 15
    finally:
        await s.close()
        cluster.stop()
