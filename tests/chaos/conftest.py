"""Fixtures shared by the chaos tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from redflow._redis.client import ServerAddress

from .proxy import FaultProxy


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    """A fault-injecting TCP proxy in front of the session's server."""
    address = ServerAddress.from_url(redis_url)
    p = await FaultProxy(address.host, address.port).start()
    yield p
    await p.close()
