"""Duties of the elected leader, started by its heartbeat in their own task: reaping, cancel
cascades, cron, delayed events, retention. The heartbeat never waits for them, so a long duty cannot
lapse the leader's own lease.

Every duty is idempotent, so two leaders can never double-apply one: reaping is also fenced by the
leader value (``<worker id>:<epoch>``) inside Lua; a cron slot fires at most once (cron_fire.lua);
retention and delayed-event delivery only ever act on what is due.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .. import observability
from .._redis.errors import RedisError
from ..ids import new_run_id, run_id_time_ms
from ..observability.logs import log_outcome
from ..storage.codes import Code
from ..storage.handoffs import Outbox
from ..storage.records import RunHeader
from .cron import CronScheduler

if TYPE_CHECKING:
    from ..storage.store import Heartbeat
    from ..worker.worker import Worker

log = logging.getLogger("redflow.leader")

BACKLOG_SAMPLE_S = 5.0


class LeaderDuties:
    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._next_cleanup = 0.0
        self.cron = CronScheduler(worker)
        self._event_timer: asyncio.TimerHandle | None = None
        self._next_sample = 0.0
        self._sampled_queues: set[str] = set()
        self._sampled_statuses: set[str] = set()
        self._round: asyncio.Task[None] | None = None

    def tick(self, beat: Heartbeat) -> None:
        """Start this beat's duties in their own task; never blocks the heartbeat.

        A round still running when the next beat comes is not doubled up: that beat is skipped (every
        duty picks up what is due whenever it runs). Each duty is bounded in time and isolated: an
        error in one is logged and the others still run."""
        if self._round is not None and not self._round.done():
            return
        self._round = asyncio.get_running_loop().create_task(self._run_round(beat), name="redflow-leader-duties")

    async def _run_round(self, beat: Heartbeat) -> None:
        worker = self._worker
        budget = max(0.5, worker.settings.lease_ms / 1000)
        if beat.lapsed_workers:
            await self._duty("reap", self.reap(), budget)
        if beat.cascades_pending:
            await self._duty("cancel cascades", self.cancel_cascades(), budget)
        if len(worker.primary.group) > 1:
            await self._duty("hand-offs", self.apply_handoffs(), budget)
        primary = worker.primary is worker  # triggers, registrations and events live in p0
        if primary:
            await self._duty("cron", self.cron.on_beat(beat), budget)
        if beat.next_event_due_ms >= 0:
            await self._duty("delayed events", self.deliver_due_events(beat.server_ms, beat.next_event_due_ms), budget)
        now = asyncio.get_running_loop().time()
        if primary and observability.enabled() and now >= self._next_sample:
            self._next_sample = now + BACKLOG_SAMPLE_S
            await self._duty("backlog sample", self.sample_backlog(beat.server_ms), budget)
        if now >= self._next_cleanup:
            self._next_cleanup = now + worker.settings.cleanup_interval_s
            await self._duty("retention", self.cleanup(), budget)

    async def _duty(self, name: str, work: Coroutine[Any, Any, None], budget_s: float) -> None:
        try:
            async with asyncio.timeout(budget_s):
                await work
        except TimeoutError:
            log.warning("leader %s: %s took longer than %.1fs; it continues next round", self._worker.id, name,
                        budget_s)
        except RedisError as exc:
            log.warning("leader %s: %s failed (%s); retried next round", self._worker.id, name, exc)
        except Exception:
            log.exception("leader %s: %s raised; the other duties go on", self._worker.id, name)

    async def sample_backlog(self, server_ms: int) -> None:
        """Backlog gauges per queue (ready, scheduled, age of the oldest ready run)."""
        client = self._worker.client
        stats = await client.get_stats()
        for status, count in stats["by_status"].items():
            observability.set_gauge("by_status", count, status)
        self._sampled_statuses.update(stats["by_status"])
        for queue, sizes in stats["backlog"].items():
            observability.set_gauge("backlog", sizes["ready"], queue, "ready")
            observability.set_gauge("backlog", sizes["scheduled"], queue, "scheduled")
            oldest = await client.store.index.next_ready(queue)
            age = 0.0
            if oldest:
                # How long the next run to claim has been due (not since it was created: a delayed,
                # retried or resumed run became ready later).
                header = await client.store.read_header(oldest)
                since = header.available_at_ms if header is not None and header.available_at_ms else None
                age = max(0.0, (server_ms - (since or run_id_time_ms(oldest))) / 1000)
            observability.set_gauge("oldest", age, queue)
            self._sampled_queues.add(queue)

    def step_down(self) -> None:
        for status in self._sampled_statuses:
            observability.set_gauge("by_status", 0, status)
        for queue in self._sampled_queues:  # a former leader's samples must not outweigh the new one's
            observability.set_gauge("backlog", 0, queue, "ready")
            observability.set_gauge("backlog", 0, queue, "scheduled")
            observability.set_gauge("oldest", 0, queue)
        self.cron.stop()
        if self._round is not None:
            self._round.cancel()
            self._round = None
        if self._event_timer is not None:
            self._event_timer.cancel()
            self._event_timer = None

    async def deliver_due_events(self, server_ms: int, next_due_ms: int) -> None:
        """Fan out delayed events that are due; set a timer for the next one."""
        worker = self._worker
        events = worker.events
        if next_due_ms <= server_ms:
            for event_id in await events.due_events(server_ms, 100):
                await events.deliver(
                    event_id, retention_ms=worker.retention_ms,
                    run_id_prefix=new_run_id(worker.store.keys.partition)[:24],
                    run_id_suffix="-" + worker.store.keys.partition,
                )
                await Outbox(worker.store).apply_event(event_id, worker.retention_ms)
            upcoming = await events.next_due_event_ms()
            if upcoming is None:
                return
            next_due_ms = upcoming
        if self._event_timer is not None:
            self._event_timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, (next_due_ms - server_ms) / 1000)
        self._event_timer = loop.call_later(delay, lambda: loop.create_task(self._deliver_from_timer()))

    async def _deliver_from_timer(self) -> None:
        self._event_timer = None
        try:
            now = await self._worker.store.server_time_ms()
            await self.deliver_due_events(now, now)
        except RedisError as exc:
            log.warning("leader: delayed event delivery failed (%s); retried at the next heartbeat", exc)

    async def reap(self) -> None:
        """Take back the runs of every worker whose liveness lease lapsed."""
        worker = self._worker
        s = worker.settings
        for dead in await worker.store.lapsed_workers(100):
            if dead == worker.id:
                continue
            while True:
                code, taken, crashed, left = await worker.store.reap(
                    worker.leader_value, dead, s.max_recoveries, worker.retention_ms, s.reaper_batch_size,
                    on_run=_log_reaped,
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

    async def apply_handoffs(self) -> None:
        """Apply this partition's outbox entries that their writers did not (they died, or lost
        their connection): events for other partitions' waiters, children to create elsewhere,
        children's ends for parents elsewhere."""
        outbox = Outbox(self._worker.store)
        while await outbox.pending():
            if not await outbox.apply(self._worker.retention_ms, limit=100):
                return

    async def cancel_cascades(self) -> None:
        """Finish cancel cascades a client left half done (it died, or lost its connection)."""
        client = self._worker.client
        for run_id in await self._worker.store.cascade_pending(50):
            await client.cancel_descendants(run_id)

    async def cleanup(self) -> None:
        """Delete runs past their retention deadline, in bounded batches."""
        worker = self._worker
        batch = worker.settings.cleanup_batch_size
        runs = events = 0
        for _ in range(20):
            deleted_runs, deleted_events = await worker.store.cleanup(batch)
            runs += deleted_runs
            events += deleted_events
            if deleted_runs < batch and deleted_events < batch:
                break
        if runs or events:
            log.info("leader %s: retention removed %d run(s) and %d event(s)", worker.id, runs, events)


_REAPED = {"requeued": "recovered", "crashed": "crashed", "canceled": "canceled", "hook": "recovered",
           "gave_up": "recovered"}


def _log_reaped(run_id: str, outcome: str, h: RunHeader | None) -> None:
    """One line per run taken back from a dead worker (or failed as crashed, or canceled)."""
    if outcome in ("requeued", "hook", "gave_up"):
        observability.observe("recovered", 1)
    if h is None:
        return
    if outcome in ("crashed", "canceled"):  # the run ended here: count it as its worker would have
        observability.count_run(h.workflow, "failed" if outcome == "crashed" else "canceled")
    error = None
    if outcome == "crashed":
        error = {"name": "CrashedError", "kind": "crashed",
                 "message": f"the workers running it kept dying ({(h.lapses or 0) + 1} times)"}
    log_outcome(_REAPED.get(outcome, outcome), run_id=run_id, workflow=h.workflow, queue=h.queue,
                attempt=max(h.attempt, 1), max_attempts=h.max_attempts, error=error)
