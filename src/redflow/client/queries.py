"""Client queries over the run index, workflow metadata, stats and retention: a part of RedflowClient.

Every filter is served by a lexicographic index range (status, workflow, both, parent), so a page costs
O(log n + page) whatever the size of the history. Only the free-text ``query`` of search_runs scans,
and then at most ``SEARCH_SCAN_LIMIT`` runs per call, returning a cursor to continue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from ..encoding import decode
from ..errors import ConfigurationError
from ..storage.index import PageSource, children_prefix, index_prefixes, merge_pages
from ..storage.records import decode_workflow_meta
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
    async def index_page(
        self, prefix: bytes, after: str | None, limit: int, created_after: int | None = None,
        created_before: int | None = None, *, descending: bool = False,
    ) -> list[str]:
        """Up to ``limit`` run ids of one index prefix (``storage.index.index_prefixes``) past the id
        ``after``, oldest first (newest first when ``descending``)."""
        return await self._page([prefix], after, limit, descending, created_after, created_before)

    async def _page(
        self, prefixes: list[bytes], cursor: str | None, limit: int, descending: bool,
        created_after: int | None = None, created_before: int | None = None, *, parent: str | None = None,
    ) -> list[str]:
        """A page of ids over every partition, merged in id order. Ids sort alike in every partition
        (creation time, then randomness), so one id is a cursor valid in all of them; a page reads
        about ``limit`` ids in all (``merge_pages``). A parent's children are indexed in its own partition."""
        stores = [self.store.of(parent)] if parent else self.store.partitions

        def source(s: Store) -> PageSource:
            return lambda after, count: s.index.merged_page(prefixes, after, count, descending, created_after,
                                                            created_before, children=parent is not None)
        return await merge_pages([source(s) for s in stores], cursor, limit, descending)

    async def _listed(self, ids: list[str]) -> list[ListedRun]:
        if not ids:
            return []
        out: list[ListedRun] = []
        records = await self.store.headers_and_errors(ids)
        for run_id, (h, err) in zip(ids, records, strict=True):
            if h is None:
                continue
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
        ids = await self._page(index_prefixes(p.status, p.workflow), p.cursor, limit, p.sort == "desc")
        return await self._listed(ids)

    async def search_runs(self, params: SearchRunsParams) -> SearchRunsResult:
        """Filtered run search; the index narrows it, ``queue`` and ``query`` filter a bounded scan."""
        p = params
        limit = _check_page(p.sort, p.limit, p.status)
        await self.store.ensure_ready()
        descending = p.sort == "desc"
        prefixes = [children_prefix(p.parent_run_id)] if p.parent_run_id else index_prefixes(p.status, p.workflow)
        needle = p.query.casefold() if p.query else None  # matched case-insensitively, as in 0.1.x
        runs: list[ListedRun] = []
        scanned = 0
        cursor = p.cursor
        exhausted = False
        post_filtered = bool(p.queue or needle is not None or p.parent_run_id)
        while len(runs) < limit and scanned < SEARCH_SCAN_LIMIT:
            # Without a filter the index cannot serve, one page of ids is exactly the answer.
            chunk = min(200 if post_filtered else limit, SEARCH_SCAN_LIMIT - scanned)
            ids = await self._page(prefixes, cursor, chunk, descending, p.created_after, p.created_before,
                                   parent=p.parent_run_id or None)
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

    async def list_workflows(self) -> list[str]:
        await self.store.ensure_ready()
        return await self.store.index.workflow_names()

    async def get_workflow_meta(self, name: str) -> WorkflowMeta | None:
        await self.store.ensure_ready()
        raw = await self.store.read_workflow(name)
        return None if raw is None else _public_meta(raw, int(time.time() * 1000))

    async def list_workflows_meta(self) -> list[WorkflowMeta]:
        await self.store.ensure_ready()
        now_ms = int(time.time() * 1000)
        metas = [_public_meta(raw, now_ms) for raw in await self.store.index.workflow_metas()]
        return sorted(metas, key=lambda m: str(m["name"]))

    async def get_stats(self) -> RunStats:
        """Runs by status (from the index) and the backlog of every registered queue."""
        await self.store.ensure_ready()
        queues = sorted({str(m.get("queue", "default")) for m in await self.list_workflows_meta()})
        parts = self.store.partitions
        counts = await asyncio.gather(*(s.index.status_counts() for s in parts))
        sizes = await asyncio.gather(*(s.index.queue_sizes(queues) for s in parts))
        by_status = {status: sum(c[status] for c in counts) for status in counts[0]}
        backlog = {q: {kind: sum(size[q][kind] for size in sizes) for kind in ("ready", "scheduled")} for q in queues}
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
        for store in self.store.partitions:
            while limit is None or total < limit:
                step = batch if limit is None else min(batch, limit - total)
                runs, events = await store.cleanup(step, reference_time_ms or 0, what)
                deleted = runs if what == "runs" else events
                total += deleted
                if deleted < step:
                    break
        return total

    async def reset_runs(self) -> dict[str, int]:
        """Development only: delete every run and event under the prefix, keep workflow registrations;
        returns ``{"deleted": <number of keys deleted>}``."""

        keep = set()
        for k in (s.keys for s in self.store.partitions):
            keep |= {k.version, k.partitions, k.workflows, k.subscribers, k.subscriber_index, k.crons, k.cron_last,
                     k.cron_version, k.limits, k.admission, k.workers, k.leader, k.epoch, k.seq, k.registrations,
                     k.cron_orphans}
        return {"deleted": await self._delete_prefix(keep)}

    async def reset_state(self) -> dict[str, int]:
        """Development only: delete everything under the prefix (scans the keyspace); returns
        ``{"deleted": <number of keys deleted>}``."""
        return {"deleted": await self._delete_prefix(set())}

    async def _delete_prefix(self, keep: set[str]) -> int:
        return await self.store.index.delete_prefix(keep)

    async def _blobs(self, ids: list[str]) -> dict[str, tuple[bytes | None, ...]]:
        async def read(store: Store, chunk: Sequence[str]) -> list[tuple[bytes | None, ...] | None]:
            found = await store.index.blobs(list(chunk))
            return [found.get(run_id) for run_id in chunk]

        values = await self.store.per_partition(ids, read)
        return {run_id: v for run_id, v in zip(ids, values, strict=True) if v is not None}


def _matches(run: ListedRun, needle: str, blobs: tuple[bytes | None, ...]) -> bool:
    """Whether ``needle`` (case-folded) is in the run's id, workflow, input, output or error."""
    if needle in run["id"].casefold() or needle in run["workflow"].casefold():
        return True
    return any(blob is not None and needle in blob.decode("utf-8", "replace").casefold() for blob in blobs)
