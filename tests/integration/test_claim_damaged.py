"""A run whose header a claim cannot read (damaged by hand, a key clobbered with another type) is put
back where it was and reported, while the runs popped in the same batch are claimed: a claim that
raised after its RPOP lost every run of the batch (they were out of the ready list, still `queued`,
and nothing requeues a queued run that is in no list)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow

from ..conftest import WorkerFactory, wait_until
from ..partitioned import keys_of

pytestmark = pytest.mark.usefixtures("one_partition")  # the damaged run shares its batch with the others

DAMAGED = b"\xc1"  # not MessagePack: decoding raises inside the claim


async def _echo(ctx: WorkflowHandlerContext) -> Any:
    return ctx.input


async def test_a_damaged_ready_run_goes_to_the_back_and_its_batch_is_claimed(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    define_workflow("damaged-ready", handler=_echo, registry=registry)
    handles = [await client.run_by_name("damaged-ready", n) for n in range(5)]
    bad = handles[2]
    keys = keys_of(client, bad.id)
    await client.redis.execute("HSET", keys.runs, bad.id, DAMAGED)
    with caplog.at_level(logging.ERROR, logger="redflow.storage"):
        await make_worker()
        for n, h in enumerate(handles):
            if h is not bad:
                assert await h.result(timeout_ms=15_000) == n
        await wait_until(lambda: any(bad.id in r.getMessage() for r in caplog.records), what="the error logged")
    later = await client.run_by_name("damaged-ready", 9)  # the queue still moves past the damaged run
    assert await later.result(timeout_ms=15_000) == 9
    assert await client.redis.execute("LRANGE", keys.ready("default"), 0, -1) == [bad.id.encode()]
    assert await client.redis.execute("HGET", keys.runs, bad.id) == DAMAGED  # left as it was
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
