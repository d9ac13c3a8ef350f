"""Helpers of the tests that drive one partition's batched transitions by hand: a claim for a fake
worker and the partition spread runs are pinned to (the ``calls`` fixture, in
``integration/conftest.py``, counts the finish script calls)."""

from __future__ import annotations

from redflow import RedflowClient, WorkflowHandlerContext
from redflow.storage.codes import Code
from redflow.storage.records import ClaimedRun
from redflow.storage.store import Store

from .partitioned import pin_spread


async def noop(ctx: WorkflowHandlerContext) -> None:
    return None


async def claim_batch(store: Store, queue: str, n: int) -> list[ClaimedRun]:
    """Up to ``n`` runs of ``queue`` claimed by worker "w" (registered by the caller)."""
    code, _, runs = await store.claim("w", [queue], n, 10)
    assert code is Code.OK
    return runs


async def pinned(client: RedflowClient, index: int) -> Store:
    """The store of the partition every spread run of this test goes to."""
    await client.store.ensure_ready()
    return client.store.at(pin_spread(client, index))
