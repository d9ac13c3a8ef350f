"""Duties of the elected leader, run from its heartbeat: reaping and retention.

Every duty is idempotent and fenced by the leader value (``<worker id>:<epoch>``) inside Lua, so a
deposed leader that still acts is refused, and two leaders can never double-apply a duty.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .._redis.errors import RedisError
from ..storage.codes import Code

if TYPE_CHECKING:
    from ..worker.worker import Worker

log = logging.getLogger("redflow.leader")


class LeaderDuties:
    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._next_cleanup = 0.0

    async def tick(self, lapsed_workers: int) -> None:
        worker = self._worker
        try:
            if lapsed_workers:
                await self.reap()
            now = asyncio.get_running_loop().time()
            if now >= self._next_cleanup:
                self._next_cleanup = now + worker.settings.cleanup_interval_s
                await self.cleanup()
        except RedisError as exc:
            log.warning("leader %s: duty failed (%s); retried next heartbeat", worker.id, exc)

    async def reap(self) -> None:
        """Take back the runs of every worker whose liveness lease lapsed."""
        worker = self._worker
        s = worker.settings
        for dead in await worker.store.lapsed_workers(100):
            if dead == worker.id:
                continue
            while True:
                code, taken, crashed, left = await worker.store.reap(
                    worker.leader_value, dead, s.max_recoveries, worker.retention_ms, s.reaper_batch_size
                )
                if code is not Code.OK:
                    if code is Code.NOT_LEADER:
                        return
                    break
                if taken or crashed:
                    log.warning(
                        "leader %s: worker %s lapsed; took back %d run(s), %d failed as crashed",
                        worker.id, dead, taken, crashed,
                    )
                if not left or not taken:
                    break

    async def cleanup(self) -> None:
        """Delete runs past their retention deadline, in bounded batches."""
        worker = self._worker
        batch = worker.settings.cleanup_batch_size
        total = 0
        for _ in range(20):
            deleted = await worker.store.cleanup(batch)
            total += deleted
            if deleted < batch:
                break
        if total:
            log.info("leader %s: retention removed %d run(s)", worker.id, total)
