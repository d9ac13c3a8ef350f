"""Typed wrappers for events, subscriptions and cron triggers."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec

from ..encoding import decode, encode
from ..errors import ConfigurationError
from ..validation import json_schema_issues, validation_error
from .codes import Code
from .keys import PartitionKeys, event_member_prefix, tag
from .records import (
    CronOrphanRecord,
    CronRecord,
    RegistrationRecord,
    SubscriberRecord,
    admission_meta,
    decode_cron,
    decode_cron_orphan,
    decode_event,
    decode_event_data,
    decode_registration,
    decode_subscriber,
    encode_record,
)
from .store import Store

EVENT_BUFFER_BOUND = 64
# A registration counts as a live worker's this long before that worker shows up in the workers set.
REGISTRATION_GRACE_MS = 15_000
# Registrations of workers absent from the workers set are forgotten this long after they were made.
REGISTRATION_RETENTION_MS = 3_600_000


class EventStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys
        self.redis = store.redis

    # --- registration ------------------------------------------------------------------------------
    @property
    def registrations_key(self) -> str:
        return self.keys.registrations

    @property
    def cron_orphans_key(self) -> str:
        return self.keys.cron_orphans

    async def register(
        self,
        workflows: dict[str, dict[str, Any]],
        subscriptions: dict[str, list[str]],
        crons: dict[str, CronRecord],
        server_now_ms: int,
    ) -> None:
        """Publish what this build defines: for each of its workflows, the event subscriptions and
        cron triggers it has now replace whatever an earlier build registered for that workflow.
        A build whose event contracts disagree with the registered ones is refused before anything
        is written."""
        k = self.keys
        redis = self.redis
        await self._check_contracts(workflows, subscriptions)
        # Every partition keeps the subscriptions: an event fans out in the partition it is recorded in.
        for partition in self.store.home.partitions:
            await self._write_subscriptions(partition.keys, workflows, subscriptions)
        old_crons = await redis.execute("HGETALL", k.crons)
        stale_crons = []
        for i in range(0, len(old_crons), 2):
            trigger_id, old = old_crons[i].decode(), decode_cron(old_crons[i + 1])
            if old.workflow in workflows and trigger_id not in crons:
                stale_crons.append(trigger_id)
        changed = bool(stale_crons)
        if stale_crons:
            await redis.execute("HDEL", k.crons, *stale_crons)
        for trigger_id, cron in crons.items():
            data = encode_record(cron)
            current = await redis.execute("HGET", k.crons, trigger_id)
            if current != data:
                await redis.execute("HSET", k.crons, trigger_id, data)
                changed = True
            # A new trigger first fires at its next slot, not at a slot before it existed.
            await redis.execute("HSETNX", k.cron_last, trigger_id, server_now_ms)
        # This build defines these workflows: none of their triggers is orphaned (or stale) now.
        if crons or stale_crons:
            await redis.execute("HDEL", self.cron_orphans_key, *crons, *stale_crons)
        if changed:
            await redis.execute("INCR", k.cron_version)
        # Runs of a limited workflow are placed in p0, where its limits count; every partition has
        # the limits too, so runs placed elsewhere before the limit was known are held to them there.
        admission = {w: m["admission"] for w, m in workflows.items() if m.get("admission")}
        plain = [w for w in workflows if w not in admission]
        limited = {w: m["max_concurrency"] for w, m in workflows.items() if m.get("max_concurrency")}
        unlimited = [w for w in workflows if w not in limited]
        for p in (partition.keys for partition in self.store.home.partitions):
            if admission:
                await redis.execute("HSET", p.admission, *[
                    x for w, a in admission.items() for x in (w, encode_record(admission_meta(a)))])
            if plain:
                await redis.execute("HDEL", p.admission, *plain)
            if limited:
                await redis.execute("HSET", p.limits, *[x for item in limited.items() for x in item])
            if unlimited:
                await redis.execute("HDEL", p.limits, *unlimited)

    async def _write_subscriptions(
        self, k: PartitionKeys, workflows: dict[str, dict[str, Any]], subscriptions: dict[str, list[str]],
    ) -> None:
        """Replace, in one partition, the subscriptions of ``workflows`` with ``subscriptions``."""
        redis = self.redis
        old_subs = await redis.execute("ZRANGE", k.subscriber_index, 0, -1)
        stale_subs = []
        for member in old_subs:
            text = member.decode()
            raw = await redis.execute("HGET", k.subscribers, member)
            sub = None if raw is None else decode_subscriber(raw)
            if sub is not None and sub.workflow in workflows:
                wanted = {tag(ev) + sub.workflow for ev in subscriptions.get(sub.workflow, [])}
                if text not in wanted:
                    stale_subs.append(member)
        if stale_subs:
            await redis.execute("ZREM", k.subscriber_index, *stale_subs)
            await redis.execute("HDEL", k.subscribers, *stale_subs)
        for workflow, events in subscriptions.items():
            meta = workflows[workflow]
            for event in events:
                member = tag(event) + workflow
                record = SubscriberRecord(event=event, workflow=workflow, queue=meta["queue"],
                                          max_attempts=meta["max_attempts"],
                                          input_json_schema=meta.get("input_json_schema"))
                await redis.execute("HSET", k.subscribers, member, encode_record(record))
                await redis.execute("ZADD", k.subscriber_index, 0, member)

    async def record_registration(
        self, worker_id: str, workflows: list[str], queues: list[str] | None, now_ms: int | None = None
    ) -> None:
        """Record what a started worker defines and which queues it claims from (the leader does not
        fire a trigger whose workflow no live worker defines), and forget workers gone for
        REGISTRATION_RETENTION_MS. ``now_ms`` is the server's time (read when not given)."""
        if now_ms is None:
            now_ms = await self.store.server_time_ms()
        key = self.registrations_key
        record = RegistrationRecord(workflows=sorted(workflows), registered_at_ms=now_ms, queues=queues)
        await self.redis.execute("HSET", key, worker_id, encode_record(record))
        registrations = await self._registrations(now_ms)
        gone = [wid for wid, (live, at) in registrations.items()
                if not live and at < now_ms - REGISTRATION_RETENTION_MS and wid != worker_id]
        if gone:
            await self.redis.execute("HDEL", key, *gone)

    async def _registrations(self, now_ms: int) -> dict[str, tuple[bool, int]]:
        """Each recorded worker id -> (whether it counts as live, see live_workflows; registered at)."""
        return {wid: (live, record.registered_at_ms)
                for wid, (live, record) in (await self._registration_records(now_ms)).items()}

    async def _registration_records(self, now_ms: int) -> dict[str, tuple[bool, RegistrationRecord]]:
        """Each recorded worker id -> (whether it counts as live, see live_workflows; its record)."""
        flat = await self.redis.execute("HGETALL", self.registrations_key)
        if not flat:
            return {}
        listed = {m.decode() for m in await self.redis.execute("ZRANGE", self.keys.workers, 0, -1)}
        out: dict[str, tuple[bool, RegistrationRecord]] = {}
        for i in range(0, len(flat), 2):
            wid, record = flat[i].decode(), decode_registration(flat[i + 1])
            out[wid] = (wid in listed or record.registered_at_ms > now_ms - REGISTRATION_GRACE_MS, record)
        return out

    async def list_workers(self) -> list[dict[str, Any]]:
        """Every worker in the liveness set or with a recent registration: id, alive (its lease
        has not lapsed), lease_until_ms, leader, workflows, queues, registered_at_ms."""
        k, redis = self.keys, self.redis
        (sec, usec), leased, leader, flat = await asyncio.gather(
            redis.execute_at(k.base, "TIME"), redis.execute("ZRANGE", k.workers, 0, -1, "WITHSCORES"),
            redis.execute("GET", k.leader), redis.execute("HGETALL", k.registrations),
        )
        now_ms = int(sec) * 1000 + int(usec) // 1000
        leader_id = leader.decode().rsplit(":", 1)[0] if leader else None
        leases = {leased[i].decode(): int(float(leased[i + 1])) for i in range(0, len(leased), 2)}
        records = {flat[i].decode(): decode_registration(flat[i + 1]) for i in range(0, len(flat), 2)}
        out = []
        for wid in sorted(set(leases) | set(records)):
            record = records.get(wid)
            until = leases.get(wid)
            out.append({
                "id": wid, "alive": until is not None and until >= now_ms, "lease_until_ms": until,
                "leader": wid == leader_id, "workflows": record.workflows if record else [],
                "queues": record.queues if record else None,
                "registered_at_ms": record.registered_at_ms if record else None,
            })
        return out

    async def live_registrations(self, now_ms: int) -> list[RegistrationRecord]:
        """The registrations of live workers (see live_workflows)."""
        return [record for live, record in (await self._registration_records(now_ms)).values() if live]

    async def live_workflows(self, now_ms: int) -> set[str] | None:
        """The workflows some live worker defines, from the registrations workers record at start;
        None when no registration is recorded (no evidence either way). A worker is live while it
        is in the workers set (until it resigns or is reaped), and for REGISTRATION_GRACE_MS after it
        registered (it registers just before its first heartbeat)."""
        registrations = await self._registration_records(now_ms)
        if not registrations:
            return None
        out: set[str] = set()
        for live, record in registrations.values():
            if live:
                out.update(record.workflows)
        return out

    async def _check_contracts(
        self, workflows: dict[str, dict[str, Any]], subscriptions: dict[str, list[str]]
    ) -> None:
        """Every subscriber of an event must accept the same input schema: that schema is the
        event's contract. A build that disagrees with the others is refused at start."""
        mine: dict[str, list[tuple[str, bytes]]] = {}
        for workflow, events in subscriptions.items():
            schema = canonical(workflows[workflow].get("input_json_schema"))
            for event in events:
                mine.setdefault(event, []).append((workflow, schema))
        for event, ours in mine.items():
            theirs = [(s.workflow, canonical(s.input_json_schema))
                      for s in await self._subscribers(event) if s.workflow not in workflows]
            workflow, schema = ours[0]
            other = next((w for w, c in theirs + ours if c != schema), None)
            if other is not None:
                raise ConfigurationError(
                    f"event {event!r}: subscribers {workflow!r} and {other!r} declare different "
                    "input schemas; all subscribers of an event must share one schema (its contract)"
                )

    async def subscribers_of(self, event: str) -> list[dict[str, Any]]:
        return [s.public() for s in await self._subscribers(event)]

    async def _subscribers(self, event: str) -> list[SubscriberRecord]:
        prefix = tag(event).encode()
        members = await self.redis.execute("ZRANGEBYLEX", self.keys.subscriber_index, b"[" + prefix,
                                           b"[" + prefix + b"\xff")
        if not members:
            return []
        records = await self.redis.execute("HMGET", self.keys.subscribers, *members)
        return [decode_subscriber(r) for r in records if r is not None]

    async def event_definitions(self) -> list[dict[str, Any]]:
        members = await self.redis.execute("ZRANGE", self.keys.subscriber_index, 0, -1)
        if not members:
            return []
        raws = await self.redis.execute("HMGET", self.keys.subscribers, *members)
        by_event: dict[str, list[dict[str, Any]]] = {}
        contracts: dict[str, Any] = {}
        for r in (decode_subscriber(raw) for raw in raws if raw):
            by_event.setdefault(r.event, []).append({"workflow": r.workflow, "queue": r.queue})
            if r.input_json_schema is not None:
                contracts[r.event] = r.input_json_schema
        definitions: list[dict[str, Any]] = []
        for name, subs in sorted(by_event.items()):
            definition: dict[str, Any] = {"event": name, "subscribers": subs}
            if name in contracts:
                definition["input_json_schema"] = contracts[name]
            definitions.append(definition)
        return definitions

    # --- emitting ----------------------------------------------------------------------------------
    async def emit(
        self,
        event_id: str,
        name: str,
        data: bytes,
        *,
        correlation_key: str | None,
        parent_run_id: str | None,
        emit_at_ms: int,
        idempotency_key: str | None,
        idempotency_ttl_s: int,
        retention_ms: int,
        run_id_prefix: str,
        run_id_suffix: str,
        deliver: bool = False,
        trace_context: str = "",
    ) -> tuple[Code, str, dict[str, Any]]:
        """Record and deliver an event; (CREATED | EXISTING | TERMINAL | NOT_FOUND, event id, record)."""
        k = self.keys
        fingerprint = hashlib.sha1(
            b"\0".join([name.encode(), data, (correlation_key or "").encode(), (parent_run_id or "").encode()])
        ).hexdigest()
        member = event_member_prefix(name, correlation_key) if correlation_key else ""
        subscribers = await self._subscribers(name)
        if not deliver:
            contract = next((s.input_json_schema for s in subscribers if s.input_json_schema), None)
            issues = [] if contract is None else json_schema_issues(contract, decode(data))
            if issues:
                raise validation_error(f"payload of event {name!r} (its contract)", issues)
        queues = sorted({s.queue for s in subscribers})
        idem_key = k.event_idempotency(name, idempotency_key) if idempotency_key else k.event_idempotency(name, "")
        reply = await self.store.scripts.run(
            "emit",
            (
                event_id, name, data, correlation_key or "", parent_run_id or "", emit_at_ms,
                idempotency_ttl_s if idempotency_key else 0, retention_ms, "deliver" if deliver else "emit",
                fingerprint, tag(name), member, member, EVENT_BUFFER_BOUND, run_id_prefix, run_id_suffix,
                trace_context, self._other_partitions(),
            ),
            queues=queues, event_idempotency=idem_key,
        )
        code = Code(reply[0])
        if code in (Code.CREATED, Code.EXISTING):
            return code, reply[1].decode(), decode_event(reply[3]).public()
        return code, reply[1].decode() if len(reply) > 1 else event_id, {}

    def _other_partitions(self) -> str:
        parts = self.store.home.partitions
        return ",".join(str(i) for i, p in enumerate(parts) if p is not self.store)

    # --- hand-offs to the other partitions (storage/handoffs.py applies the outbox) --------------------
    def handoff_members(self, event_id: str) -> list[bytes]:
        """The outbox entries emitting ``event_id`` here may have recorded."""
        return [f"{i}:{event_id}".encode() for i in self._other_partitions().split(",") if i]

    async def apply_event_handoff(self, index: int, event_id: str, retention_ms: int) -> list[str]:
        """Give event ``event_id`` of this partition to partition ``index``; returns the runs it
        resumed there. handoff_event applies an event once per partition, so a repeat does nothing.
        The copy it leaves there is kept ``retention_ms``."""
        k = self.keys
        raw, data = await asyncio.gather(
            self.redis.execute("HGET", k.events, event_id), self.redis.execute("HGET", k.event_data, event_id)
        )
        parts = self.store.home.partitions
        if raw is None or data is None or index >= len(parts):
            return []
        record = decode_event(raw)
        if record.correlation_key is None:
            return []
        reply = await parts[index].scripts.run(  # it asks for the queues of the runs it resumes
            "handoff_event",
            (event_id, data, event_member_prefix(record.name, record.correlation_key),
             record.emitted_at_ms, EVENT_BUFFER_BOUND, retention_ms),
            queues=[],
        )
        return [r.decode() for r in reply[1:]] if reply[0] == Code.OK else []

    async def deliver(self, event_id: str, *, retention_ms: int, run_id_prefix: str, run_id_suffix: str) -> Code:
        """Fan out a delayed event that is due (idempotent: delivered events are left alone)."""
        raw = await self.redis.execute("HGET", self.keys.events, event_id)
        if raw is None:
            await self.redis.execute("ZREM", self.keys.events_due, event_id)
            return Code.NOT_FOUND
        record = decode_event(raw)
        code, _, _ = await self.emit(
            event_id, record.name, b"null", correlation_key=record.correlation_key,
            parent_run_id=record.parent_run_id, emit_at_ms=0, idempotency_key=None, idempotency_ttl_s=0,
            retention_ms=retention_ms, run_id_prefix=run_id_prefix, run_id_suffix=run_id_suffix, deliver=True,
        )
        return code

    async def due_events(self, now_ms: int, limit: int) -> list[str]:
        ids = await self.redis.execute("ZRANGEBYSCORE", self.keys.events_due, "-inf", now_ms, "LIMIT", 0, limit)
        return [i.decode() for i in ids]

    async def next_due_event_ms(self) -> int | None:
        head = await self.redis.execute("ZRANGE", self.keys.events_due, 0, 0, "WITHSCORES")
        return int(float(head[1])) if head else None

    # --- reading -------------------------------------------------------------------------------------
    async def get_event(self, event_id: str) -> dict[str, Any] | None:
        raw, data, expires = await asyncio.gather(
            self.redis.execute("HGET", self.keys.events, event_id),
            self.redis.execute("HGET", self.keys.event_data, event_id),
            self.redis.execute("ZSCORE", self.keys.event_expiry, event_id),
        )
        if raw is None:
            return None
        record = decode_event(raw).public()
        record["expires_at"] = None if expires is None else int(float(expires))
        record["data"] = decode_event_data(data).payload() if data else None
        return record

    async def event_mark(self, event_id: str) -> tuple[int, str] | None:
        """(emit time, id) of an event recorded here: its place in the listing order."""
        raw = await self.redis.execute("HGET", self.keys.events, event_id)
        return None if raw is None else (decode_event(raw).emitted_at_ms, event_id)

    async def list_event_marks(
        self, name: str | None, after: tuple[int, str] | None, limit: int, descending: bool
    ) -> list[tuple[int, str]]:
        """(emit time, id) of up to ``limit`` events past ``after``, in listing order."""
        prefix = (b"n:" + tag(name).encode()) if name else b"a:"
        if after is None:
            lo, hi = b"[" + prefix, b"[" + prefix + b"\xff"
        else:
            mark = prefix + f"{after[0]:013d}:{after[1]}".encode()
            lo, hi = (b"[" + prefix, b"(" + mark) if descending else (b"(" + mark, b"[" + prefix + b"\xff")
        if descending:
            members = await self.redis.execute("ZREVRANGEBYLEX", self.keys.event_index, hi, lo, "LIMIT", 0, limit)
        else:
            members = await self.redis.execute("ZRANGEBYLEX", self.keys.event_index, lo, hi, "LIMIT", 0, limit)
        skip = len(prefix)  # <prefix><13-digit ts>:<event id>
        return [(int(m[skip:skip + 13]), m[skip + 14:].decode()) for m in members]

    async def read_events(self, ids: list[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        raws, expiries = await asyncio.gather(
            self.redis.execute("HMGET", self.keys.events, *ids),
            self.redis.execute("ZMSCORE", self.keys.event_expiry, *ids),
        )
        out = []
        for raw, expires in zip(raws, expiries, strict=True):
            if raw is not None:
                record = decode_event(raw).public()
                record["expires_at"] = None if expires is None else int(float(expires))
                out.append(record)
        return out

    # --- cron ------------------------------------------------------------------------------------------
    async def load_crons(self) -> tuple[dict[str, CronRecord], dict[str, int]]:
        k = self.keys
        crons_raw = await self.redis.execute("HGETALL", k.crons)
        last_raw = await self.redis.execute("HGETALL", k.cron_last)
        crons = {crons_raw[i].decode(): decode_cron(crons_raw[i + 1]) for i in range(0, len(crons_raw), 2)}
        last = {last_raw[i].decode(): int(last_raw[i + 1]) for i in range(0, len(last_raw), 2)}
        return crons, last

    async def cron_orphans(self) -> dict[str, CronOrphanRecord]:
        flat = await self.redis.execute("HGETALL", self.cron_orphans_key)
        return {flat[i].decode(): decode_cron_orphan(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def mark_cron_orphaned(self, trigger_id: str, workflow: str, slot_ms: int) -> bool:
        """Record the trigger as orphaned; True if it was not recorded as such already."""
        record = encode_record(CronOrphanRecord(workflow=workflow, since_slot_ms=slot_ms))
        return bool(await self.redis.execute("HSETNX", self.cron_orphans_key, trigger_id, record))

    async def clear_cron_orphaned(self, trigger_id: str) -> None:
        await self.redis.execute("HDEL", self.cron_orphans_key, trigger_id)

    async def list_crons(self) -> list[dict[str, Any]]:
        """Every registered trigger with its last handled slot and whether it is orphaned."""
        crons, last = await self.load_crons()
        orphans = await self.cron_orphans()
        out: list[dict[str, Any]] = []
        for tid, record in sorted(crons.items()):
            orphan = orphans.get(tid)
            out.append({
                "id": tid, "workflow": record.workflow, "queue": record.queue,
                "expression": record.expression, "timezone": record.timezone,
                "input": record.input, "last_slot_ms": last.get(tid),
                "orphaned": orphan is not None, "orphaned_since": orphan.since_slot_ms if orphan else None,
            })
        return out

    async def cron_fire(self, trigger_id: str, slot_ms: int, run_id: str, record: CronRecord) -> Code:
        k = self.keys
        queue = record.queue
        workflow = record.workflow
        reply = await self.store.scripts.run(
            "cron_fire",
            (trigger_id, slot_ms, run_id, workflow, queue, encode(record.input), record.max_attempts,
             record.max_concurrency or 0),
            ready=k.ready(queue), scheduled=k.scheduled(queue), bell=k.bell(queue),
        )
        return Code(reply[0])


# Keywords that only document a schema; dropped where they are keywords (not a property so named).
_SCHEMA_METADATA = frozenset({
    "$id", "$schema", "$comment", "title", "description", "default", "examples", "deprecated", "readOnly",
    "writeOnly",
})
# Keywords whose value maps names (of properties, definitions) to schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# Keywords whose value is one schema (or, for items in older drafts, a list of them).
_SCHEMA_VALUED = frozenset({
    "items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
    "unevaluatedItems", "unevaluatedProperties", "contentSchema",
})
_SCHEMA_ALTERNATIVES = frozenset({"allOf", "anyOf", "oneOf"})  # lists of schemas whose order means nothing
_UNORDERED_ARRAYS = frozenset({"enum", "type", "required"})  # lists of values whose order means nothing
_sorted_encoder = msgspec.json.Encoder(order="sorted")


def canonical(schema: Any) -> bytes:
    """A schema compared by content: key order, the order of enum / type / required values and of
    allOf / anyOf / oneOf members, and documentation keywords (title, description, ...) ignored.
    Only keywords are stripped: a property or definition named ``title`` is part of the schema."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):  # items as a list (tuple validation): the order matters
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value  # true / false schemas
        out: dict[str, Any] = {}
        for key, sub in value.items():
            if key in _SCHEMA_METADATA:
                continue
            if key in _SCHEMA_MAPS and isinstance(sub, dict):
                out[key] = {name: walk(s) for name, s in sub.items()}
            elif key in _SCHEMA_VALUED or key == "prefixItems":
                out[key] = walk(sub)
            elif key in _SCHEMA_ALTERNATIVES and isinstance(sub, list):
                out[key] = sorted((walk(s) for s in sub), key=_sorted_encoder.encode)
            elif key in _UNORDERED_ARRAYS and isinstance(sub, list):
                out[key] = sorted(sub, key=_sorted_encoder.encode)
            else:
                out[key] = sub  # const, enum values, formats, bounds...: data, compared as is
        return out

    return _sorted_encoder.encode(walk(schema))

