"""Client queries over the run index, workflow metadata, stats and retention (mixed into RedflowClient).

Every filter is served by a lexicographic index range (status, workflow, both, parent), so a page costs
O(log n + page) whatever the size of the history. Only the free-text ``query`` of search_runs scans,
and then at most ``SEARCH_SCAN_LIMIT`` runs per call, returning a cursor to continue.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from typing import TYPE_CHECKING, cast

from ..encoding import decode
from ..errors import ConfigurationError
from ..ids import _b32
from ..storage.keys import tag
from ..storage.records import decode_header, decode_workflow_meta
from ..types import (
    ListedRun,
    ListRunsParams,
    RunStats,
    RunStatus,
    SearchRunsParams,
    SearchRunsResult,
    WorkflowMeta,
)

if TYPE_CHECKING:
    from ..storage.keys import PartitionKeys
    from ..storage.store import Store
    from .facade import RedflowClient

STATUSES: tuple[RunStatus, ...] = ("scheduled", "queued", "running", "succeeded", "failed", "canceled")
SEARCH_SCAN_LIMIT = 1000
MAX_PAGE = 500


def _check_page(sort: str, limit: int, status: str | None) -> int:
    if sort not in ("asc", "desc"):
        raise ConfigurationError(f"sort must be 'asc' or 'desc', got {sort!r}")
    if status is not None and status not in STATUSES:
        raise ConfigurationError(f"status must be one of {list(STATUSES)}, got {status!r}")
    if not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f"limit must be a positive integer, got {limit!r}")
    return min(limit, MAX_PAGE)


def _public_meta(raw: bytes, now_ms: int) -> WorkflowMeta:
    """A stored workflow registration as get_workflow_meta returns it: each cron trigger with its
    trigger id and the time of its next slot."""
    from ..leader.cron import next_slot, trigger_id, trigger_zone
    from ..types import CronTrigger

    meta = decode_workflow_meta(raw)
    out = meta.public()
    crons = []
    for c in meta.cron:
        trigger = CronTrigger(expression=c.expression, timezone=c.timezone, input=c.input, id=c.id)
        try:
            upcoming = next_slot(c.expression, trigger_zone(c.timezone), now_ms)
        except ConfigurationError:  # a zone this machine does not know
            upcoming = None
        crons.append({"expression": c.expression, "timezone": c.timezone, "input": c.input,
                      "id": trigger_id(meta.name, trigger), "next_run_at": upcoming})
    out["cron"] = crons
    return cast(WorkflowMeta, out)


def _prefixes(status: str | None, workflow: str | None) -> list[bytes]:
    if status and workflow:
        return [f"ws:{tag(workflow)}{status}:".encode()]
    if status:
        return [f"s:{status}:".encode()]
    if workflow:
        return [f"w:{tag(workflow)}".encode()]
    return [f"s:{s}:".encode() for s in STATUSES]


class Queries:
    """Run listing, search, workflow metadata, stats and retention; RedflowClient forwards its methods
    of that name here."""

    def __init__(self, client: RedflowClient) -> None:
        self._client = client
        self.store: Store = client.store
        self.keys: PartitionKeys = client.keys

    @property
    def retention_ms(self) -> int:
        return self._client.retention_ms

    # --- index pages ----------------------------------------------------------------------------------
    async def _page(
        self, key: str, prefix: bytes, cursor: str | None, limit: int, descending: bool,
        created_after: int | None = None, created_before: int | None = None,
    ) -> list[str]:
        # Bounds as (member, inclusive). Ids start with their creation time, so a time range is a
        # member range; the cursor (an id) tightens the bound on the side the page moves away from.
        lo: tuple[bytes, bool] = (prefix + (_b32(created_after, 10).encode() if created_after else b""), True)
        hi: tuple[bytes, bool] = (
            (prefix + _b32(created_before, 10).encode(), False) if created_before else (prefix + b"\xff", True)
        )
        if cursor is not None:
            mark = prefix + cursor.encode()
            if descending and mark <= hi[0]:
                hi = (mark, False)
            elif not descending and mark >= lo[0]:
                lo = (mark, False)
        lo_arg = (b"[" if lo[1] else b"(") + lo[0]
        hi_arg = (b"[" if hi[1] else b"(") + hi[0]
        if descending:
            members = await self.store.redis.execute("ZREVRANGEBYLEX", key, hi_arg, lo_arg, "LIMIT", 0, limit)
        else:
            members = await self.store.redis.execute("ZRANGEBYLEX", key, lo_arg, hi_arg, "LIMIT", 0, limit)
        return [m[len(prefix):].decode() for m in members]

    async def index_page(
        self, prefix: bytes, after: str | None, limit: int, created_after: int | None = None,
        created_before: int | None = None, *, descending: bool = False,
    ) -> list[str]:
        """Up to ``limit`` run ids of one index prefix past the id ``after``, oldest first (newest
        first when ``descending``)."""
        return await self._page(self.keys.index, prefix, after, limit, descending, created_after, created_before)

    async def _ids(
        self, prefixes: list[bytes], cursor: str | None, limit: int, descending: bool,
        created_after: int | None = None, created_before: int | None = None, key: str | None = None,
    ) -> list[str]:
        pages = await asyncio.gather(*(
            self._page(key or self.keys.index, p, cursor, limit, descending, created_after, created_before)
            for p in prefixes
        ))
        if len(pages) == 1:
            return pages[0]
        merged = heapq.merge(*pages, reverse=descending)
        return [run_id for _, run_id in zip(range(limit), merged, strict=False)]

    async def _listed(self, ids: list[str]) -> list[ListedRun]:
        if not ids:
            return []
        k = self.keys
        headers, errors = await asyncio.gather(
            self.store.redis.execute("HMGET", k.runs, *ids), self.store.redis.execute("HMGET", k.errors, *ids)
        )
        out: list[ListedRun] = []
        for run_id, raw, err in zip(ids, headers, errors, strict=True):
            if raw is None:
                continue
            h = decode_header(raw)
            out.append(ListedRun(
                id=run_id, workflow=h.workflow, queue=h.queue, status=h.status, error=decode(err) if err else None,
                created_at=h.created_at_ms, cursor=run_id, available_at=h.available_at_ms,
                started_at=h.started_at_ms, finished_at=h.finished_at_ms, attempt=h.attempt,
                max_attempts=h.max_attempts, parent_run_id=h.parent_id,
            ))
        return out

    # --- public queries ---------------------------------------------------------------------------------
    async def list_runs(self, params: ListRunsParams | None = None) -> list[ListedRun]:
        """Runs newest first (or oldest first), by status and/or workflow, paged by run-id cursor."""
        p = params or ListRunsParams()
        limit = _check_page(p.sort, p.limit, p.status)
        await self.store.ensure_ready()
        ids = await self._ids(_prefixes(p.status, p.workflow), p.cursor, limit, p.sort == "desc")
        return await self._listed(ids)

    async def search_runs(self, params: SearchRunsParams) -> SearchRunsResult:
        """Filtered run search; the index narrows it, ``queue`` and ``query`` filter a bounded scan."""
        p = params
        limit = _check_page(p.sort, p.limit, p.status)
        await self.store.ensure_ready()
        descending = p.sort == "desc"
        if p.parent_run_id:
            prefixes, key = [f"{p.parent_run_id}:".encode()], self.keys.children
        else:
            prefixes, key = _prefixes(p.status, p.workflow), self.keys.index
        needle = p.query.casefold() if p.query else None  # matched case-insensitively, as in 0.1.x
        runs: list[ListedRun] = []
        scanned = 0
        cursor = p.cursor
        exhausted = False
        post_filtered = bool(p.queue or needle is not None or p.parent_run_id)
        while len(runs) < limit and scanned < SEARCH_SCAN_LIMIT:
            # Without a filter the index cannot serve, one page of ids is exactly the answer.
            chunk = min(200 if post_filtered else limit, SEARCH_SCAN_LIMIT - scanned)
            ids = await self._ids(prefixes, cursor, chunk, descending, p.created_after, p.created_before, key)
            if not ids:
                exhausted = True
                break
            scanned += len(ids)
            cursor = ids[-1]
            blobs = await self._blobs(ids) if needle is not None else {}
            for run in await self._listed(ids):
                if p.parent_run_id and (run["parent_run_id"] != p.parent_run_id or
                                        (p.status and run["status"] != p.status) or
                                        (p.workflow and run["workflow"] != p.workflow)):
                    continue
                if p.queue and run["queue"] != p.queue:
                    continue
                if needle is not None and not _matches(run, needle, blobs.get(run["id"], ())):
                    continue
                runs.append(run)
                if len(runs) == limit:
                    cursor = run["id"]
                    break
            if len(ids) < chunk:
                exhausted = True
                break
        return SearchRunsResult(runs=runs, scanned=scanned, cursor=None if exhausted and len(runs) < limit else cursor)

    async def _blobs(self, ids: list[str]) -> dict[str, tuple[bytes | None, ...]]:
        """Input, output and error of each run, in three commands for the whole chunk."""
        k, redis = self.keys, self.store.redis
        inputs, outputs, errors = await asyncio.gather(
            redis.execute("HMGET", k.inputs, *ids), redis.execute("HMGET", k.results, *ids),
            redis.execute("HMGET", k.errors, *ids),
        )
        return {run_id: (inp, out, err) for run_id, inp, out, err in zip(ids, inputs, outputs, errors, strict=True)}

    async def list_workflows(self) -> list[str]:
        await self.store.ensure_ready()
        return sorted(n.decode() for n in await self.store.redis.execute("HKEYS", self.keys.workflows))

    async def get_workflow_meta(self, name: str) -> WorkflowMeta | None:
        await self.store.ensure_ready()
        raw = await self.store.read_workflow(name)
        return None if raw is None else _public_meta(raw, int(time.time() * 1000))

    async def list_workflows_meta(self) -> list[WorkflowMeta]:
        await self.store.ensure_ready()
        flat = await self.store.redis.execute("HGETALL", self.keys.workflows)
        now_ms = int(time.time() * 1000)
        metas = [_public_meta(flat[i + 1], now_ms) for i in range(0, len(flat), 2)]
        return sorted(metas, key=lambda m: str(m["name"]))

    async def get_stats(self) -> RunStats:
        """Runs by status (from the index) and the backlog of every registered queue."""
        await self.store.ensure_ready()
        redis, k = self.store.redis, self.keys
        counts = await asyncio.gather(*(
            redis.execute("ZLEXCOUNT", k.index, f"[s:{s}:".encode(), f"[s:{s}:".encode() + b"\xff") for s in STATUSES
        ))
        queues = sorted({str(m.get("queue", "default")) for m in await self.list_workflows_meta()})
        sizes = await asyncio.gather(*(
            c for q in queues for c in (redis.execute("LLEN", k.ready(q)), redis.execute("ZCARD", k.scheduled(q)))
        ))
        by_status: dict[str, int] = {s: int(c) for s, c in zip(STATUSES, counts, strict=True)}
        backlog = {q: {"ready": int(sizes[2 * i]), "scheduled": int(sizes[2 * i + 1])} for i, q in enumerate(queues)}
        return RunStats(total=sum(by_status.values()), by_status=by_status, backlog=backlog)

    # --- retention ----------------------------------------------------------------------------------------
    async def cleanup_expired_runs_now(self, *, reference_time_ms: int | None = None, limit: int | None = None) -> int:
        """Delete runs whose retention ended (before ``reference_time_ms``, default now); returns how many."""
        return await self._cleanup("runs", reference_time_ms, limit)

    async def cleanup_expired_events_now(
        self, *, reference_time_ms: int | None = None, limit: int | None = None
    ) -> int:
        """Delete events whose retention ended; returns how many."""
        return await self._cleanup("events", reference_time_ms, limit)

    async def _cleanup(self, what: str, reference_time_ms: int | None, limit: int | None) -> int:
        await self.store.ensure_ready()
        total = 0
        batch = 500 if limit is None else max(1, min(500, limit))
        while limit is None or total < limit:
            step = batch if limit is None else min(batch, limit - total)
            runs, events = await self.store.cleanup(step, reference_time_ms or 0, what)
            deleted = runs if what == "runs" else events
            total += deleted
            if deleted < step:
                break
        return total

    async def reset_runs(self) -> dict[str, int]:
        """Development only: delete every run and event under the prefix, keep workflow registrations;
        returns ``{"deleted": <number of keys deleted>}``."""

        k = self.keys
        keep = {k.version, k.workflows, k.subscribers, k.subscriber_index, k.crons, k.cron_last, k.cron_version,
                k.limits, k.admission, k.workers, k.leader, k.epoch, k.seq, k.registrations, k.cron_orphans}
        return {"deleted": await self._delete_prefix(keep)}

    async def reset_state(self) -> dict[str, int]:
        """Development only: delete everything under the prefix (scans the keyspace); returns
        ``{"deleted": <number of keys deleted>}``."""
        return {"deleted": await self._delete_prefix(set())}

    async def _delete_prefix(self, keep: set[str]) -> int:
        redis = self.store.redis
        cursor = b"0"
        deleted = 0
        # Only this prefix's partitions, not longer prefixes. SCAN MATCH is a glob: the prefix's glob
        # characters are escaped so it matches itself only (PartitionKeys refuses braces in it).
        literal = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in self.keys.prefix)
        pattern = f"{literal}:{{*"
        while True:
            cursor, keys = await redis.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            doomed = [key for key in keys if key.decode() not in keep]
            if doomed:
                deleted += int(await redis.execute("UNLINK", *doomed))
            if cursor == b"0":
                return deleted


def _matches(run: ListedRun, needle: str, blobs: tuple[bytes | None, ...]) -> bool:
    """Whether ``needle`` (case-folded) is in the run's id, workflow, input, output or error."""
    if needle in run["id"].casefold() or needle in run["workflow"].casefold():
        return True
    return any(blob is not None and needle in blob.decode("utf-8", "replace").casefold() for blob in blobs)
