"""Hand-offs between partitions: what one partition's script records for another partition to apply.

A script writes to one partition only (on a cluster, one slot). What another partition must learn
is recorded, in the same script, as an entry of the writing partition's ``outbox``; an applier (the
process that wrote it, at once, else that partition's leader) applies the entry in its target with
one script there and then removes it (``handoff_done``). Applying an entry twice changes nothing,
so an applier that dies between the two steps only leaves the entry for the next one. Entries:

- ``<index>:<event id>``: an event recorded here that partition ``index``'s waiters must see
  (``EventStore.apply_event_handoff``, script ``handoff_event``);
- ``n<index>:<child id>``: a child run to create in partition ``index`` for a parent of this
  partition (``start_child_elsewhere`` recorded it and indexed the child under its parent);
- ``c<index>:<child id>``: a child of this partition ended and its parent lives in partition
  ``index`` (``end_run`` recorded it; ``child_ended`` keeps the outcome there and resumes the parent).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from .codes import Code
from .event_store import EventStore
from .keys import partition_index

if TYPE_CHECKING:
    from .records import RunHeader
    from .store import Store

log = logging.getLogger("redflow.worker")

TERMINAL = frozenset({"succeeded", "failed", "canceled"})


class ChildRecord(msgspec.Struct, array_like=True, frozen=True):
    """What the applier needs to create a child in its partition (kept in ``outbox_data``)."""

    workflow: str
    queue: str
    input: bytes
    max_attempts: int
    run_at_ms: int
    parent_run_id: str
    trace_context: str


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(ChildRecord).decode


def _canceling(h: RunHeader | None) -> bool:
    return h is None or h.status == "canceled" or bool(h.cancel_requested_at_ms)


class Outbox:
    """The outbox of one partition (``store``): record child hand-offs and apply every kind of entry."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys
        self.redis = store.redis

    async def pending(self) -> int:
        return int(await self.redis.execute("ZCARD", self.keys.outbox))

    # --- children in other partitions -----------------------------------------------------------------
    async def start_child_elsewhere(
        self, target: Store, run_id: str, workflow: str, queue: str, input_json: bytes, max_attempts: int,
        run_at_ms: int, idempotency_key: str | None, idempotency_ttl_s: int, parent_run_id: str,
        trace_context: str, retention_ms: int,
    ) -> tuple[Code, str]:
        """Start child ``run_id`` (of ``target``'s partition) of ``parent_run_id`` (of this one):
        recorded here, then created there. (CREATED | EXISTING, child id) or (CANCELED, '')."""
        index = self.store.home.partitions.index(target)
        member = f"n{index}:{run_id}"
        record = ChildRecord(workflow, queue, input_json, max_attempts, run_at_ms, parent_run_id, trace_context)
        ttl = idempotency_ttl_s if idempotency_key is not None else 0
        idem = self.keys.idempotency(workflow, idempotency_key or "")
        stale = ""
        for _ in range(2):
            reply = await self.store.scripts.run(
                "start_child_elsewhere", (run_id, parent_run_id, ttl, member, _encode(record), stale), idempotency=idem,
            )
            code = Code(reply[0])
            if code is Code.CANCELED:
                return code, ""
            bound = reply[1].decode()
            if code is Code.CREATED:
                await self._apply(member.encode(), retention_ms)
                return code, bound
            if bound == run_id or not await self._gone(target, index, bound):
                return code, bound
            # Bound to a child that never came to exist (its parent was canceled first) or that
            # retention deleted: rebind, as enqueue does for a run it cannot find.
            stale = bound
        return code, bound

    async def _gone(self, target: Store, index: int, child_id: str) -> bool:
        """Whether ``child_id`` (of ``target``) neither exists nor is still to be created. The entry
        is read first: it is removed only after the child was created (or was not to be)."""
        pending = await self.redis.execute("ZSCORE", self.keys.outbox, f"n{index}:{child_id}")
        return pending is None and await target.read_header(child_id) is None

    async def drop_child(self, child_id: str) -> None:
        """Forget the pending creation of ``child_id`` (a child of a run of this partition that a
        cancel cascade found not created yet): it is never created, even if its parent runs again."""
        index = partition_index(child_id)
        if index is not None:
            await self.store.scripts.run("handoff_done", (f"n{index}:{child_id}", ""))

    async def _create_child(self, member: bytes, index: int, child_id: str, retention_ms: int) -> None:
        raw = await self.redis.execute("HGET", self.keys.outbox_data, member)
        if raw is None:
            return
        record = _decode(raw)
        parts = self.store.home.partitions
        parent = await self.store.read_header(record.parent_run_id)
        if _canceling(parent) or index >= len(parts):
            return  # a parent canceled (or gone) before its child existed: the child is never created
        target = parts[index]
        await target.enqueue(
            child_id, record.workflow, record.queue, record.input, record.max_attempts, record.run_at_ms,
            None, 0, record.parent_run_id, record.trace_context,
        )
        # Read again after creating: a cancel that came meanwhile cascaded before the child existed.
        if _canceling(await self.store.read_header(record.parent_run_id)):
            await target.cancel(child_id, f"parent run {record.parent_run_id} canceled", retention_ms)

    async def _child_ended(self, index: int, child_id: str, retention_ms: int) -> list[str]:
        outcome = await self.store.read_outcome(child_id)
        parts = self.store.home.partitions
        if outcome is None or index >= len(parts):
            return []
        status, out, err = outcome
        if status not in TERMINAL:
            return []  # retried by an operator since: its next end records a new entry
        payload = (out if status == "succeeded" else err) or b"null"
        reply = await parts[index].scripts.run("child_ended", (child_id, retention_ms, status, payload), queues=[])
        return [r.decode() for r in reply[1:]] if reply[0] == Code.OK else []

    # --- applying ------------------------------------------------------------------------------------
    async def _apply(self, member: bytes, retention_ms: int) -> list[str]:
        """Apply one entry in its target partition, then remove it; returns the runs it resumed."""
        target, _, subject = member.decode().partition(":")
        kind = target[0] if target and not target[0].isdigit() else ""
        index = int(target[1:] if kind else target)
        event_id = ""
        resumed: list[str] = []
        if kind == "n":
            await self._create_child(member, index, subject, retention_ms)
        elif kind == "c":
            resumed = await self._child_ended(index, subject, retention_ms)
        else:
            event_id = subject
            resumed = await EventStore(self.store).apply_event_handoff(index, subject, retention_ms)
        await self.store.scripts.run("handoff_done", (member, event_id, *resumed))
        return resumed

    async def apply(self, retention_ms: int, *, members: list[bytes] | None = None, limit: int = 100) -> int:
        """Apply ``members`` (else the oldest ``limit`` entries); returns how many were applied."""
        if members is None:
            members = await self.redis.execute("ZRANGE", self.keys.outbox, 0, limit - 1)
        for member in members:
            await self._apply(member, retention_ms)
        return len(members)

    async def apply_child_end(self, child_id: str, retention_ms: int) -> None:
        """Apply at once the end of ``child_id`` (of this partition) for its parent in another
        partition, if one is recorded."""
        mine = [f"c{i}:{child_id}".encode() for i, p in enumerate(self.store.home.partitions) if p is not self.store]
        scores = await self.redis.execute("ZMSCORE", self.keys.outbox, *mine) if mine else []
        for member, score in zip(mine, scores, strict=True):
            if score is not None:
                await self._apply(member, retention_ms)

    async def apply_event(self, event_id: str, retention_ms: int) -> list[str]:
        """Apply at once the hand-offs emitting ``event_id`` here recorded; returns the runs resumed."""
        mine = EventStore(self.store).handoff_members(event_id)
        scores = await self.redis.execute("ZMSCORE", self.keys.outbox, *mine) if mine else []
        resumed: list[str] = []
        for member, score in zip(mine, scores, strict=True):
            if score is not None:
                resumed += await self._apply(member, retention_ms)
        return resumed
