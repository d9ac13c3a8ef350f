"""The finish-phase probe (bench/lua_costs.py) still finds its cut points in finish.lua and leaves
nothing behind. No timing is asserted: the figures are what the probe reports."""

from __future__ import annotations

import uuid

from bench import lua_costs
from redflow import create_client


async def test_probe_measures_every_phase_and_cleans_up(redis_url: str) -> None:
    prefix = f"rft:lua:{uuid.uuid4().hex[:10]}"
    phases = await lua_costs.finish_phases(redis_url, 20, prefix)
    writes = await lua_costs.write_costs(redis_url, 20, prefix)
    assert len(phases) == 5 and set(writes) == set(lua_costs.WRITES)
    client = create_client(url=redis_url, prefix=prefix)
    try:
        assert await client.redis.execute("KEYS", f"{prefix}:*") == []
    finally:
        await client.close()
