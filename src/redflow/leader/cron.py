"""Cron triggers: validation, slot arithmetic, and the leader's scheduler.

Each (trigger, slot) fires at most once: cron_fire.lua keeps the last slot handled per trigger and the
run id is derived from (trigger, slot), so racing or successive leaders cannot fire a slot twice. After
downtime only the most recent missed slot fires (it is, by definition, less than one period old);
older missed slots are never fired.

A trigger whose workflow no live worker defines (by the registrations workers record when they start,
see EventStore.live_workflows) is orphaned: its slots do not fire, it is recorded as orphaned and the
leader logs a warning once. It fires again from the first slot after a worker that defines the
workflow registers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from .. import observability
from .._redis.errors import RedisError
from ..encoding import encode
from ..errors import ConfigurationError
from ..ids import _b32
from ..storage.codes import Code
from ..storage.records import CronRecord
from ..types import CronTrigger

if TYPE_CHECKING:
    from ..storage.store import Heartbeat
    from ..worker.worker import Worker
    from ..workflow import WorkflowDefinition

log = logging.getLogger("redflow.cron")


def trigger_zone(timezone: str | None) -> tzinfo:
    if timezone is None:
        local = datetime.now().astimezone().tzinfo
        assert local is not None
        return local
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(f"unknown cron timezone {timezone!r}: {exc}") from None


def validate_trigger(workflow: str, trigger: CronTrigger) -> None:
    if not isinstance(trigger, CronTrigger):
        raise ConfigurationError(f"workflow {workflow!r}: cron entries must be CronTrigger, got {trigger!r}")
    zone = trigger_zone(trigger.timezone)
    fields = len(str(trigger.expression).split())
    if fields not in (5, 6):
        raise ConfigurationError(
            f"workflow {workflow!r}: cron expression {trigger.expression!r} must have 5 or 6 fields, has {fields}"
        )
    try:
        next(CronSim(trigger.expression, datetime.now(zone)))
    except (CronSimError, StopIteration) as exc:
        raise ConfigurationError(
            f"workflow {workflow!r}: invalid cron expression {trigger.expression!r}: {exc}"
        ) from None


def trigger_id(workflow: str, trigger: CronTrigger) -> str:
    """The trigger's id, or one derived from its content (so two different triggers never collide)."""
    if trigger.id:
        return trigger.id
    digest = hashlib.sha1(encode([workflow, trigger.expression, trigger.timezone, trigger.input])).hexdigest()[:12]
    return f"{workflow}:{trigger.expression}:{trigger.timezone or 'local'}:{digest}"


def cron_records(definitions: Iterable[WorkflowDefinition[Any]]) -> dict[str, CronRecord]:
    """The cron triggers these definitions declare, by trigger id, as registered (hash ``crons``)."""
    records: dict[str, CronRecord] = {}
    for d in definitions:
        for trigger in d.options.cron or []:
            records[trigger_id(d.name, trigger)] = CronRecord(
                workflow=d.name,
                queue=d.options.queue,
                expression=trigger.expression,
                timezone=trigger.timezone,
                input=trigger.input,
                max_attempts=d.max_attempts,
                max_concurrency=d.options.max_concurrency or 0,
            )
    return records


def cron_run_id(trigger: str, slot_ms: int, partition: str) -> str:
    """Deterministic, time-sortable run id of a trigger's slot."""
    digest = int.from_bytes(hashlib.sha1(trigger.encode()).digest()[:10], "big")
    return f"{_b32(slot_ms, 10)}{_b32(digest, 16)}-{partition}"


def latest_slot(expression: str, zone: tzinfo, now_ms: int) -> tuple[int, int] | None:
    """(the latest slot at or before now, the period from it to the next slot), in ms."""
    now = datetime.fromtimestamp(now_ms / 1000, zone)
    probe = now.replace(microsecond=0) + timedelta(seconds=1)
    try:
        prev = next(CronSim(expression, probe, reverse=True))
        if prev > now:
            prev = next(CronSim(expression, prev, reverse=True))
        following = next(CronSim(expression, prev))
    except StopIteration:
        return None
    return int(prev.timestamp() * 1000), int((following - prev).total_seconds() * 1000)


def next_slot(expression: str, zone: tzinfo, after_ms: int) -> int | None:
    try:
        return int(next(CronSim(expression, datetime.fromtimestamp(after_ms / 1000, zone))).timestamp() * 1000)
    except StopIteration:
        return None


class CronScheduler:
    """Runs in the leader: fires due slots at their time, using the server clock (via an offset)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._version = -1
        self._triggers: dict[str, CronRecord] = {}
        self._last: dict[str, int] = {}
        self._offset_ms = 0
        self._timer: asyncio.TimerHandle | None = None
        self._firing: asyncio.Task[None] | None = None
        self._orphans: set[str] = set()
        self.skipped = 0

    def server_now_ms(self) -> int:
        return int(time.time() * 1000) + self._offset_ms

    async def on_beat(self, beat: Heartbeat) -> None:
        self._offset_ms = beat.server_ms - int(time.time() * 1000)
        if beat.cron_version != self._version:
            await self.reload()
            self._version = beat.cron_version
        await self.fire_due()

    async def reload(self) -> None:
        """Load the triggers, their last handled slots and which are orphaned from Redis."""
        events = self._worker.client.events
        self._triggers, self._last = await events.load_crons()
        self._orphans = set(await events.cron_orphans())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._version = -1

    async def fire_due(self, now_ms: int | None = None) -> int:
        """Fire every trigger whose latest slot is due and unfired; returns how many runs started."""
        now = self.server_now_ms() if now_ms is None else now_ms
        fired = 0
        defined: set[str] | None = None
        checked = False  # the workflows live workers define are read once, when a slot is due
        for tid, record in self._triggers.items():
            zone = trigger_zone(record.timezone)
            latest = latest_slot(record.expression, zone, now)
            if latest is None:
                continue
            slot, period = latest
            if slot <= self._last.get(tid, 0) or now - slot >= period:
                continue
            if not checked:
                defined, checked = await self._live_workflows(now), True
            if defined is not None and record.workflow not in defined:
                await self._orphaned(tid, record.workflow, slot)
                self._last[tid] = slot
                continue
            if tid in self._orphans:
                await self._worker.client.events.clear_cron_orphaned(tid)
                self._orphans.discard(tid)
                log.info("cron %s: workflow %r is defined by a live worker again; the trigger fires", tid,
                         record.workflow)
            code = await self.fire_slot(tid, slot, record)
            self._last[tid] = slot
            fired += code is Code.CREATED
        self._schedule(now)
        return fired

    async def _live_workflows(self, now_ms: int) -> set[str] | None:
        """What live workers define (None: no registration recorded), and what this leader defines."""
        defined = await self._worker.client.events.live_workflows(now_ms)
        registry = getattr(self._worker, "registry", None)
        if defined is not None and registry is not None:
            defined |= {d.name for d in registry.definitions()}
        return defined

    async def _orphaned(self, tid: str, workflow: str, slot_ms: int) -> None:
        """Do not fire the slot of a trigger whose workflow no live worker defines; report it once."""
        first = await self._worker.client.events.mark_cron_orphaned(tid, workflow, slot_ms)
        if first or tid not in self._orphans:
            log.warning(
                "cron %s: workflow %r is defined by no live worker (removed from every build?); the trigger "
                "does not fire until a worker that defines the workflow starts", tid, workflow,
            )
        self._orphans.add(tid)

    async def fire_slot(self, tid: str, slot_ms: int, record: CronRecord) -> Code:
        worker = self._worker
        run_id = cron_run_id(tid, slot_ms, worker.store.keys.partition)
        code = await worker.client.events.cron_fire(tid, slot_ms, run_id, record)
        if code in (Code.OK, Code.CREATED):
            observability.observe("cron", 1, "skipped" if code is Code.OK else "fired")
        if code is Code.OK:
            self.skipped += 1
            log.warning("cron %s: slot %d skipped, workflow %r is at max_concurrency", tid, slot_ms, record.workflow)
        return code

    def _schedule(self, now_ms: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        upcoming = [
            n for r in self._triggers.values()
            if (n := next_slot(r.expression, trigger_zone(r.timezone), now_ms)) is not None
        ]
        if not upcoming:
            return
        delay_s = max(0.0, (min(upcoming) - now_ms) / 1000) + 0.001
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._firing is None or self._firing.done():
            self._firing = asyncio.get_running_loop().create_task(self._fire_from_timer())

    async def _fire_from_timer(self) -> None:
        try:
            await self.fire_due()
        except RedisError as exc:
            log.warning("cron: firing failed (%s); retried at the next heartbeat", exc)
