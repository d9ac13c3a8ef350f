"""The hot-path budget, counted in our connection layer and cross-checked against the server."""

from __future__ import annotations

import asyncio

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow

from ..conftest import wait_until


async def _evalsha_calls(client: RedflowClient) -> int:
    """EVALSHA calls the server counted, summed over every master (a cluster's partitions, and so
    the worker's scripts, are spread over all of them; the client counters cover every node)."""
    calls = 0
    for node in await client.redis.masters():
        info = await node.execute("INFO", "commandstats")
        for line in info.decode().splitlines():
            if line.startswith("cmdstat_evalsha:"):
                calls += int(line.split("calls=")[1].split(",")[0])
    return calls


async def echo_step(x: int) -> int:
    return x


async def test_one_step_run_costs_at_most_three_worker_commands(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> int:
        return await ctx.step.run("echo", echo_step, ctx.input)

    wf = define_workflow("hot-one-step", handler=handler, registry=registry)
    await client.store.ensure_ready()
    n = 1000
    evalsha_before = await _evalsha_calls(client)
    before_client = client.redis.counters.commands
    handles = [await client.enqueue_definition(wf, i) for i in range(n)]
    enqueue_cost = (client.redis.counters.commands - before_client) / n
    assert enqueue_cost <= 1.0, f"enqueue cost {enqueue_cost} commands"

    # A worker's start (scripts loaded, subscriptions, a first claim) costs some writes per
    # partition, whatever the number of runs: measured on an identical worker of another queue
    # until every sibling waits in its blocking claim, its EVALSHAs counted too.
    idle = await make_worker(concurrency=100, queues=["hot-idle"])
    idle_counters = idle.store.redis.counters
    parts = len(client.store.partitions)
    await wait_until(lambda: idle_counters.by_name["BRPOP"] >= parts, what="every idle sibling blocked")
    await idle.stop(grace_period_ms=0)
    startup_writes, idle_evalsha = idle_counters.writes, idle_counters.by_name["EVALSHA"]

    worker = await make_worker(concurrency=100)
    counters = worker.store.redis.counters
    await wait_until(lambda: not worker.active and _all_done(client, handles), timeout_s=60, what="drain")
    per_run = counters.commands / n
    # The worker runs on (heartbeats, claims): a call it counted may not have reached the server when
    # INFO is read, and one may leave after; so may a claim of the idle worker cut by its stop.
    counted_before = n + idle_evalsha + counters.by_name["EVALSHA"]
    evalsha_server = await _evalsha_calls(client) - evalsha_before
    counted_after = n + idle_evalsha + counters.by_name["EVALSHA"]
    assert counted_before - 2 * parts <= evalsha_server <= counted_after, (
        f"server and client counts disagree: {evalsha_server} on the server, {counted_before}-{counted_after} sent")
    assert per_run <= 3.0, f"{per_run:.3f} worker commands per run ({dict(counters.by_name)})"
    # Step records and finishes of one loop tick share a call (step_many, finish_many), and the
    # calls of a tick share a socket write: far fewer writes than runs (beyond the start's).
    hot_writes = counters.writes - startup_writes
    assert hot_writes <= n / 5, f"{hot_writes} socket writes for {n} runs (start: {startup_writes}): not batched"
    assert [await h.result(timeout_ms=1000) for h in handles[:5]] == [0, 1, 2, 3, 4]


async def _all_done(client: RedflowClient, handles: list) -> bool:
    last = await client.get_run(handles[-1].id)
    if not last or last["status"] != "succeeded":
        return False
    states = await asyncio.gather(*(client.store.read_header(h.id) for h in handles))
    return all(s is not None and s.status == "succeeded" for s in states)


async def test_concurrent_runs_share_socket_writes(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()

    async def wait_gate() -> int:
        await gate.wait()
        return 1

    async def handler(ctx: WorkflowHandlerContext) -> int:
        return await ctx.step.run("gate", wait_gate)

    wf = define_workflow("hot-shared-writes", handler=handler, registry=registry)
    handles = [await client.enqueue_definition(wf, i) for i in range(100)]
    worker = await make_worker(concurrency=100)
    await wait_until(lambda: worker.inflight() == 100, what="100 runs in flight")
    parts = len(client.store.partitions)  # each partition's runs are batched apart
    counters = worker.store.redis.counters
    commands, writes = counters.commands, counters.writes
    gate.set()
    await wait_until(lambda: worker.inflight() == 0, what="100 runs finished")
    sent = counters.commands - commands
    written = counters.writes - writes
    # The hundred step records leave in a few step_many calls and the hundred finishes in a few
    # finish_many calls (how many depends on how the wake-ups fall into loop ticks), not 200 calls.
    assert 2 <= sent <= 30 * parts, f"{sent} commands for 100 step records and 100 finishes ({dict(counters.by_name)})"
    assert written <= sent, f"{sent} commands went out in {written} socket writes"
    assert all([await h.result(timeout_ms=2000) == 1 for h in handles])


@pytest.mark.timeout(90)
async def test_idle_leader_worker_sends_at_most_two_commands_per_second(make_worker, registry) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> None:
        return None

    define_workflow("hot-idle", handler=handler, registry=registry)
    worker = await make_worker(concurrency=10)
    # Each partition's sibling leads its partition, heartbeats and blocks on its own connection:
    # the idle bound is per partition.
    await wait_until(lambda: all(w.is_leader for w in worker.group), what="leadership of every partition")
    partitions = len(worker.group)
    counters = worker.store.redis.counters
    start, by_name = counters.commands, dict(counters.by_name)
    await asyncio.sleep(30)  # the measurement window itself: idle traffic over 30 s
    sent = counters.commands - start
    window = {name: n - by_name.get(name, 0) for name, n in counters.by_name.items() if n > by_name.get(name, 0)}
    assert sent <= 60 * partitions, f"idle worker sent {sent} commands in 30 s, {partitions} partition(s) ({window})"
