"""A run whose header a claim cannot read (damaged by hand, a key clobbered with another type) is put
back where it was and reported, while the runs popped in the same batch are claimed: a claim that
raised after its RPOP lost every run of the batch (they were out of the ready list, still `queued`,
and nothing requeues a queued run that is in no list)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRateLimitOptions, WorkflowRegistry, define_workflow

from ..conftest import WorkerFactory, wait_until
from ..partitioned import keys_of

pytestmark = pytest.mark.usefixtures("one_partition")  # the damaged run shares its batch with the others

DAMAGED = b"\xc1"  # not MessagePack: decoding raises inside the claim


async def _echo(ctx: WorkflowHandlerContext) -> Any:
    return ctx.input


@pytest.mark.parametrize("damaged", [DAMAGED, b"\x80", b"\x07"], ids=["not-msgpack", "empty-map", "integer"])
async def test_a_damaged_ready_run_goes_to_the_back_and_its_batch_is_claimed(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, caplog: pytest.LogCaptureFixture,
    damaged: bytes,
) -> None:
    define_workflow("damaged-ready", handler=_echo, registry=registry)
    handles = [await client.run_by_name("damaged-ready", n) for n in range(5)]
    bad = handles[2]
    keys = keys_of(client, bad.id)
    await client.redis.execute("HSET", keys.runs, bad.id, damaged)
    with caplog.at_level(logging.ERROR, logger="redflow.storage"):
        await make_worker()
        for n, h in enumerate(handles):
            if h is not bad:
                assert await h.result(timeout_ms=15_000) == n
        await wait_until(lambda: any(bad.id in r.getMessage() for r in caplog.records), what="the error logged")
    later = await client.run_by_name("damaged-ready", 9)  # the queue still moves past the damaged run
    assert await later.result(timeout_ms=15_000) == 9
    assert await client.redis.execute("LRANGE", keys.ready("default"), 0, -1) == [bad.id.encode()]
    assert await client.redis.execute("HGET", keys.runs, bad.id) == damaged  # left as it was
    assert await client.redis.execute("HEXISTS", keys.leases, bad.id) == 0
    message = next(r.getMessage() for r in caplog.records if bad.id in r.getMessage())
    assert "could not be claimed" in message and "damaged" in message, message


async def test_a_damaged_due_run_stays_scheduled_and_other_due_runs_start(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    define_workflow("damaged-due", handler=_echo, registry=registry)
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    handles = [await client.run_by_name("damaged-due", n, run_at=soon) for n in range(3)]
    bad = handles[0]
    keys = keys_of(client, bad.id)
    await client.redis.execute("HSET", keys.runs, bad.id, DAMAGED)
    with caplog.at_level(logging.ERROR, logger="redflow.storage"):
        await make_worker()
        assert [await h.result(timeout_ms=15_000) for h in handles[1:]] == [1, 2]
        await wait_until(lambda: any(bad.id in r.getMessage() for r in caplog.records), what="the error logged")
    later = await client.run_by_name("damaged-due", 9, run_at=datetime.now(UTC) + timedelta(milliseconds=100))
    assert await later.result(timeout_ms=15_000) == 9
    due = await client.redis.execute("ZSCORE", keys.scheduled("default"), bad.id)
    assert due is not None and float(due) > time.time() * 1000 + 30_000  # tried again in a minute
    assert await client.redis.execute("LLEN", keys.ready("default")) == 0


@pytest.mark.parametrize("limit", ["max_concurrency", "mutex"])
async def test_a_damaged_held_run_neither_fails_the_run_handing_on_nor_blocks_its_group(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, caplog: pytest.LogCaptureFixture,
    limit: str,
) -> None:
    """The finish of a run reads the runs it hands on to: a damaged one failed that finish (the run
    stayed running, its slot or mutex taken for good). It now goes aside to the queue, where claims
    report it, and the next run held behind it starts."""
    gate = asyncio.Event()

    async def gated(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input == 0:
            await gate.wait()
        return ctx.input

    options: dict[str, Any] = {"max_concurrency": 1} if limit == "max_concurrency" else {"mutex": lambda _: "one"}
    define_workflow("damaged-held", handler=gated, registry=registry, **options)
    first = await client.run_by_name("damaged-held", 0)
    keys = keys_of(client, first.id)
    await make_worker(concurrency=5)
    await wait_until(lambda: _status(client, first.id, "running"), what="the first run running")
    bad, good = [await client.run_by_name("damaged-held", n) for n in (1, 2)]
    await wait_until(lambda: _zcard(client, keys.held, 2), what="both later runs held")
    header = await client.redis.execute("HGET", keys.runs, bad.id)
    await client.redis.execute("HSET", keys.runs, bad.id, DAMAGED)
    with caplog.at_level(logging.ERROR, logger="redflow.storage"):
        gate.set()
        assert await first.result(timeout_ms=15_000) == 0
        assert await good.result(timeout_ms=15_000) == 2
        await wait_until(lambda: any(bad.id in r.getMessage() for r in caplog.records), what="the damaged run logged")
    assert await client.redis.execute("ZCARD", keys.held) == 0
    assert await client.redis.execute("LRANGE", keys.ready("default"), 0, -1) == [bad.id.encode()]
    assert await client.redis.execute("HGET", keys.runs, bad.id) == DAMAGED  # left as it was
    later = await client.run_by_name("damaged-held", 3)  # the group goes on
    assert await later.result(timeout_ms=15_000) == 3
    await client.redis.execute("HSET", keys.runs, bad.id, header)  # the operator restores it
    await client.redis.execute("LPUSH", keys.bell("default"), "1")  # (the next poll would find it too)
    assert await bad.result(timeout_ms=15_000) == 1


async def _status(client: RedflowClient, run_id: str, status: str) -> bool:
    return (await client.get_run(run_id))["status"] == status


async def _zcard(client: RedflowClient, key: str, n: int) -> bool:
    return bool(await client.redis.execute("ZCARD", key) == n)


async def test_a_damaged_run_in_a_throttle_queue_does_not_stop_the_runs_behind_it(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    """A run leaving the head of a throttle queue wakes the next one: when that one is damaged, it is
    moved aside and the next readable run is woken instead."""
    define_workflow("damaged-throttle", handler=_echo, registry=registry,
                    throttle=WorkflowRateLimitOptions(key=lambda _: "k", limit=1, period="1s"))
    handles = [await client.run_by_name("damaged-throttle", n) for n in range(4)]
    keys = keys_of(client, handles[0].id)

    async def in_line() -> list[bytes]:
        members = await client.redis.execute("ZRANGEBYLEX", keys.held, "[t:", "[t:\xff")
        return [m for m in members if not m.endswith(handles[0].id.encode())]

    await make_worker(concurrency=5)
    await wait_until(lambda: _count(in_line(), 3), what="three runs in the throttle queue")
    first_in_line, second = (await in_line())[:2]
    bad = next(h for h in handles if second.endswith(h.id.encode()))
    header = await client.redis.execute("HGET", keys.runs, bad.id)
    await client.redis.execute("HSET", keys.runs, bad.id, DAMAGED)
    head = next(h for h in handles if first_in_line.endswith(h.id.encode()))
    rest = [h for h in handles if h is not bad]
    assert [await h.result(timeout_ms=15_000) for h in rest] == [handles.index(h) for h in rest]
    assert head in rest
    await wait_until(lambda: _count(in_line(), 0), what="the throttle queue empty")
    assert await client.redis.execute("HGET", keys.runs, bad.id) == DAMAGED
    await client.redis.execute("HSET", keys.runs, bad.id, header)  # the operator restores it: it is admitted anew
    await client.redis.execute("LPUSH", keys.bell("default"), "1")
    assert await bad.result(timeout_ms=15_000) == handles.index(bad)


async def _count(members: Any, n: int) -> bool:
    return len(await members) == n
