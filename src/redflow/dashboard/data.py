"""What each page reads, through the public client API only.

Every read is an index page or a bounded count, so a page costs the same number of Redis commands
with a million runs as with a hundred (tests/browser/test_scale.py counts them). The bounds are
named here: a count that reaches its bound is shown as "N+" rather than read further.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..types import ListRunsParams, SearchRunsParams
from .filters import time_input
from .format import now_ms

if TYPE_CHECKING:
    from ..client import RedflowClient
    from ..types import ListedRun, WorkflowMeta

HOUR_MS = 3_600_000
HOUR_COUNT_CAP = 500  # runs read per outcome for the last hour's counts
LIVE_COUNT_CAP = 200  # runs read per workflow and status for the workflows page's live counts
CHILDREN_PAGE = 50
STREAM_PAGE = 200
ENDED = ("succeeded", "failed", "canceled")


@dataclass(slots=True)
class Count:
    """A count read up to a bound: ``capped`` when there may be more."""

    value: int
    capped: bool = False

    def __str__(self) -> str:
        return f"{self.value}+" if self.capped else str(self.value)


async def bounded_count(client: RedflowClient, cap: int, **filters: Any) -> Count:
    """Runs matching index filters (status, workflow, created_after/_before), read up to ``cap``."""
    result = await client.search_runs(SearchRunsParams(limit=cap, **filters))
    return Count(len(result["runs"]), result["cursor"] is not None)


# --- overview -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class QueueRow:
    name: str
    ready: int
    scheduled: int
    workflows: list[str] = field(default_factory=list)
    oldest_ms: int | None = None  # when the longest-waiting queued run became ready
    oldest_run: str | None = None


async def queue_rows(client: RedflowClient, metas: list[WorkflowMeta], backlog: dict[str, dict[str, int]],
                     ) -> list[QueueRow]:
    """Every queue's backlog and the age of its oldest queued run: the oldest queued run of each of the
    queue's workflows (one index read per workflow, whatever the backlog)."""
    rows = {q: QueueRow(q, b.get("ready", 0), b.get("scheduled", 0)) for q, b in backlog.items()}
    for meta in metas:
        rows.setdefault(meta["queue"], QueueRow(meta["queue"], 0, 0)).workflows.append(meta["name"])
    oldest = await asyncio.gather(*(
        client.list_runs(ListRunsParams(status="queued", workflow=m["name"], sort="asc", limit=1)) for m in metas
    ))
    for meta, page in zip(metas, oldest, strict=True):
        if not page:
            continue
        run = page[0]
        since = run["available_at"] or run["created_at"]
        row = rows[meta["queue"]]
        if row.oldest_ms is None or since < row.oldest_ms:
            row.oldest_ms, row.oldest_run = since, run["id"]
    return [rows[q] for q in sorted(rows)]


@dataclass(slots=True)
class LastHour:
    succeeded: Count
    failed: Count
    canceled: Count

    @property
    def ended(self) -> Count:
        return Count(self.succeeded.value + self.failed.value + self.canceled.value,
                     self.succeeded.capped or self.failed.capped or self.canceled.capped)

    @property
    def failure_rate(self) -> float | None:
        finished = self.succeeded.value + self.failed.value
        return None if finished == 0 else self.failed.value / finished


async def last_hour(client: RedflowClient, now: int) -> LastHour:
    """Runs created in the last hour that have ended, by outcome (index ranges by status and time)."""
    counts = await asyncio.gather(*(
        bounded_count(client, HOUR_COUNT_CAP, status=s, created_after=now - HOUR_MS) for s in ENDED
    ))
    return LastHour(*counts)


def cron_rows(crons: list[dict[str, Any]], metas: list[WorkflowMeta]) -> list[dict[str, Any]]:
    """Registered cron triggers with their next fire (from the workflow metadata, by trigger id)."""
    upcoming = {c["id"]: c.get("next_run_at") for m in metas for c in m["cron"]}
    return [{**c, "next_run_at": upcoming.get(c["id"])} for c in crons]


async def workers(client: RedflowClient) -> list[dict[str, Any]]:
    """Workers of the prefix, the leader first, then live ones."""
    listed = await client.list_workers()
    return sorted(listed, key=lambda w: (not w.get("leader"), not w.get("alive"), str(w.get("id"))))


async def overview(client: RedflowClient) -> dict[str, Any]:
    now = now_ms()
    stats, metas, crons, hour, workers_now = await asyncio.gather(
        client.get_stats(), client.list_workflows_meta(), client.list_cron_triggers(), last_hour(client, now),
        workers(client),
    )
    return {
        "now": now,
        "stats": stats,
        "queues": await queue_rows(client, metas, stats["backlog"]),
        "hour": hour,
        "hour_after": time_input(now - HOUR_MS),
        "crons": cron_rows(crons, metas),
        "workflow_count": len(metas),
        "workers": workers_now,
    }


# --- workflows ----------------------------------------------------------------------------------------
async def workflow_rows(client: RedflowClient) -> list[dict[str, Any]]:
    """Each workflow's metadata with live counts: running (against max_concurrency) and waiting."""
    metas = await client.list_workflows_meta()
    counts = await asyncio.gather(*(
        bounded_count(client, LIVE_COUNT_CAP, workflow=m["name"], status=s)
        for m in metas for s in ("running", "queued", "scheduled")
    ))
    rows = []
    for i, meta in enumerate(metas):
        running, queued, scheduled = counts[3 * i: 3 * i + 3]
        limit = meta["max_concurrency"]
        rows.append({
            "meta": meta, "running": running, "queued": queued, "scheduled": scheduled,
            "at_capacity": limit is not None and running.value >= limit,
        })
    return rows


# --- runs -----------------------------------------------------------------------------------------------
async def children(client: RedflowClient, run_id: str) -> tuple[list[ListedRun], bool]:
    result = await client.search_runs(SearchRunsParams(parent_run_id=run_id, limit=CHILDREN_PAGE))
    return result["runs"], result["cursor"] is not None
