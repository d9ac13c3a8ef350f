"""Fixtures shared by integration test modules (the session's servers and clients are in
``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from redflow import RedflowClient, WorkflowRegistry, create_client

PARTED = 4  # partitions of the `parted` fixture's prefix


@pytest.fixture
async def calls(client: RedflowClient, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many finish_many and finish script calls the stores made, over every partition (the real
    calls are made)."""
    seen = {"many": 0, "one": 0}
    await client.store.ensure_ready()
    for store in client.store.partitions:
        many, one = store.finish_many, store.finish_one

        async def counted_many(requests, many=many):  # type: ignore[no-untyped-def]
            seen["many"] += 1
            return await many(requests)

        async def counted_one(request, one=one):  # type: ignore[no-untyped-def]
            seen["one"] += 1
            return await one(request)

        monkeypatch.setattr(store, "finish_many", counted_many)
        monkeypatch.setattr(store, "finish_one", counted_one)
    return seen


@pytest.fixture
async def parted(
    redis_url: str, prefix: str, registry: WorkflowRegistry, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RedflowClient]:
    """A client that creates the test's prefix with PARTED partitions (workers adopt the count); the
    suite's REDFLOW_PARTITIONS does not apply to it."""
    monkeypatch.delenv("REDFLOW_PARTITIONS", raising=False)
    c = create_client(url=redis_url, prefix=prefix, partitions=PARTED)
    c.registry = registry
    await c.store.ensure_ready()
    yield c
    await c.close()
