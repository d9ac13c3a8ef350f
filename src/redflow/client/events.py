"""Events (emit, history, cron, workers) and cancellation: a part of RedflowClient."""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._redis.errors import RedisError
from ..durations import datetime_ms
from ..encoding import encode_payload
from ..errors import CanceledError, ConfigurationError, RedflowError
from ..ids import new_run_id
from ..observability import tracing
from ..storage.codes import Code
from ..storage.event_store import EventStore
from ..storage.handoffs import Outbox
from ..types import IDEMPOTENCY_TTL_SEC, EmitEventResult, ListEventsParams
from ..validation import check_event_name, check_run_id

if TYPE_CHECKING:
    from ..storage.keys import PartitionKeys
    from ..storage.store import Store
    from .facade import RedflowClient
    from .handle import RunHandle

log = logging.getLogger("redflow.events")

FANOUT_STATUSES = frozenset({"pending", "completed", "partial", "failed", "no-subscribers"})


class Events:
    """Events (emit, history) and cancellation; RedflowClient forwards its methods of that name here."""

    def __init__(self, client: RedflowClient) -> None:
        self._client = client
        self.store: Store = client.store
        self.keys: PartitionKeys = client.keys
        self.events: EventStore = client.events
        self._by_partition: dict[str, EventStore] = {}
        self.make_run_handle = client.make_run_handle

    @property
    def retention_ms(self) -> int:
        return self._client.retention_ms

    @property
    def max_payload_bytes(self) -> int:
        return self._client.max_payload_bytes

    async def emit_event(
        self,
        event_name: str,
        input: Any = None,
        *,
        correlation_key: str | None = None,
        emit_at: datetime | None = None,
        event_id: str | None = None,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
        parent_run_id: str | None = None,
    ) -> list[RunHandle]:
        """Emit an event: one run per subscribed workflow; resumes runs waiting for it."""
        result = await self.emit_event_detailed(
            event_name, input, correlation_key=correlation_key, emit_at=emit_at, event_id=event_id,
            idempotency_key=idempotency_key, idempotency_ttl=idempotency_ttl, parent_run_id=parent_run_id,
        )
        return result["handles"]

    async def emit_event_detailed(
        self,
        event_name: str,
        input: Any = None,
        *,
        correlation_key: str | None = None,
        emit_at: datetime | None = None,
        event_id: str | None = None,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
        parent_run_id: str | None = None,
    ) -> EmitEventResult:
        """Like emit_event, with the event id and the runs the event resumed."""
        name = check_event_name(event_name, "event_name")
        corr = None if correlation_key is None else check_event_name(correlation_key, "correlation_key")
        eid = None if event_id is None else check_event_name(event_id, "event_id")
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key.strip()):
            raise ConfigurationError(f"idempotency_key must be a non-empty string, got {idempotency_key!r}")
        if emit_at is not None and not isinstance(emit_at, datetime):
            raise ConfigurationError(f"emit_at of event {name!r} must be a datetime, got {emit_at!r}")
        emit_at_ms = datetime_ms(emit_at, f"emit_at of event {name!r}") if emit_at is not None else 0
        data = encode_payload(input, f"payload of event {name!r}", self.max_payload_bytes)
        await self.store.ensure_ready()
        # An event is recorded, and its subscribers' runs are created, in its parent's partition (its
        # children are indexed there), else in p0; runs waiting in other partitions get it through
        # the outbox (storage/event_store.py, hand-offs).
        home = self.store.of(parent_run_id) if parent_run_id else self.store
        events = self.events_of(home)
        generated = new_run_id(home.keys.partition)
        eid = eid or "evt_" + generated.rsplit("-", 1)[0] + os.urandom(2).hex()
        ttl = IDEMPOTENCY_TTL_SEC if idempotency_ttl is None else int(idempotency_ttl)
        with tracing.producer(name, "", None) as trace_context:  # the subscribers' runs continue this trace
            code, bound_id, record = await events.emit(
                eid, name, data, correlation_key=corr, parent_run_id=parent_run_id,
                emit_at_ms=emit_at_ms, idempotency_key=idempotency_key,
                idempotency_ttl_s=min(ttl, self.retention_ms // 1000), retention_ms=self.retention_ms,
                run_id_prefix=generated[:24], run_id_suffix="-" + home.keys.partition, trace_context=trace_context,
            )
        resumed_elsewhere: list[str] = []
        if code in (Code.CREATED, Code.EXISTING) and len(self.store.partitions) > 1:
            try:
                resumed_elsewhere = await Outbox(events.store).apply_event(bound_id, self.retention_ms)
            except RedisError as exc:  # recorded in the outbox: the partition's leader applies it
                log.warning("event %s: hand-off to other partitions left to the leader (%s)", bound_id, exc)
        if code is Code.CANCELED:
            raise CanceledError(f"run {parent_run_id} was canceled: it cannot emit event {name!r}")
        if code is Code.TERMINAL:
            raise RedflowError(f"event {bound_id!r} already exists with different content (name, data, "
                               "correlation key or parent); event ids must identify one event")
        handles = [self.make_run_handle(d["run_id"]) for d in record.get("deliveries", []) if d.get("run_id")]
        return EmitEventResult(event_id=bound_id, handles=handles,
                               resumed_run_ids=[*record.get("resumed_run_ids", []), *resumed_elsewhere])

    def events_of(self, store: Store) -> EventStore:
        """The event store of one partition."""
        if store is self.store:
            return self.events
        found = self._by_partition.get(store.keys.partition)
        if found is None:
            found = self._by_partition[store.keys.partition] = EventStore(store)
        return found

    async def get_event(self, event_id: str) -> dict[str, Any] | None:
        await self.store.ensure_ready()
        for store in self.store.partitions:  # mostly p0: only events emitted by steps live elsewhere
            record = await self.events_of(store).get_event(event_id)
            if record is not None:
                return record
        return None

    async def list_events(
        self, params: ListEventsParams | None = None
    ) -> list[dict[str, Any]]:
        """Events newest first (or oldest first), filtered by name and fan-out status, paged by cursor."""
        p = params or ListEventsParams()
        if p.sort not in ("asc", "desc"):
            raise ConfigurationError(f"ListEventsParams.sort must be 'asc' or 'desc', got {p.sort!r}")
        if p.fanout_status is not None and p.fanout_status not in FANOUT_STATUSES:
            raise ConfigurationError(f"ListEventsParams.fanout_status must be one of {sorted(FANOUT_STATUSES)}")
        limit = max(1, min(int(p.limit), 500))
        await self.store.ensure_ready()
        out: list[dict[str, Any]] = []
        descending = p.sort == "desc"
        stores = [self.events_of(s) for s in self.store.partitions]
        mark = None
        if p.cursor is not None:
            found = [r for r in await asyncio.gather(*(e.event_mark(p.cursor) for e in stores)) if r is not None]
            if not found:
                return []
            mark = found[0]
        for _ in range(20):  # bounded work per call when filtering by status
            # Each partition's page past the mark, merged by (time, id): one mark is valid in all of them.
            pages = await asyncio.gather(*(e.list_event_marks(p.name, mark, limit, descending) for e in stores))
            merged = [m for _, m in zip(range(limit), heapq.merge(*pages, reverse=descending), strict=False)]
            if not merged:
                break
            by_store: dict[int, list[str]] = {}
            for store_index, page in enumerate(pages):
                chosen = set(page) & set(merged)
                if chosen:
                    by_store[store_index] = [m[1] for m in page if m in chosen]
            records: dict[str, dict[str, Any]] = {}
            for store_index, ids in by_store.items():
                for record in await stores[store_index].read_events(ids):
                    records[record["id"]] = record
            for m in merged:
                rec = records.get(m[1])
                if rec is not None and (p.fanout_status is None or rec.get("fanout_status") == p.fanout_status):
                    out.append(rec)
            mark = merged[-1]
            if len(out) >= limit or len(merged) < limit:
                break
        return out[:limit]

    async def list_event_definitions(self) -> list[dict[str, Any]]:
        await self.store.ensure_ready()
        return await self.events.event_definitions()

    async def list_cron_triggers(self) -> list[dict[str, Any]]:
        """Registered cron triggers: id, workflow, queue, expression, timezone, input, last_slot_ms,
        and ``orphaned`` (with ``orphaned_since``, the first slot not fired): no live worker
        defines the trigger's workflow, so the leader does not fire it."""
        await self.store.ensure_ready()
        return await self.events.list_crons()

    async def list_workers(self) -> list[dict[str, Any]]:
        """Workers of this prefix: id, alive (lease not lapsed), lease_until_ms, leader (the elected
        leader), workflows it defines, queues it claims from, registered_at_ms. A worker that
        stopped is listed until its registration is forgotten (an hour after it stopped)."""
        await self.store.ensure_ready()
        return await self.events.list_workers()

    async def cancel_run(self, run_id: str, *, reason: str = "") -> bool:
        """Cancel a run and every run its steps started; True if this call canceled it.

        The cascade is durable: the run is recorded as canceling its descendants in the same script
        that cancels it, and the leader finishes a cascade this call could not (the client died)."""
        check_run_id(run_id)
        await self.store.ensure_ready()
        code, _ = await self.store.cancel(run_id, reason, self.retention_ms)
        if code is not Code.OK:
            return False
        if len(self.store.partitions) > 1:  # a parent in another partition resumes now, not at its leader's tick
            await Outbox(self.store.of(run_id)).apply_child_end(run_id, self.retention_ms)
        await self.cancel_descendants(run_id)
        return True

    async def cancel_descendants(self, run_id: str) -> None:
        """Cancel every descendant of a canceled run, then mark its cascade done (idempotent)."""
        pending, seen = [run_id], {run_id}
        walked: list[str] = []
        while pending:
            parent = pending.pop()
            walked.append(parent)
            for child in await self.store.children_of(parent):
                if child not in seen:
                    seen.add(child)
                    code, _ = await self.store.cancel(child, f"parent run {parent} canceled", self.retention_ms)
                    if code is Code.NOT_FOUND and self.store.of(child) is not self.store.of(parent):
                        # Recorded in the parent's partition and not created yet: it never will be
                        # (an applier creating it now rechecks the parent and cancels it).
                        await Outbox(self.store.of(parent)).drop_child(child)
                    pending.append(child)
        for parent in walked:
            await self.store.cascade_done(parent)
