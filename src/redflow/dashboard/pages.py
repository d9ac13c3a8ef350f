"""The dashboard's pages (GET). Each reads index pages and bounded counts through the client."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..types import TERMINAL_STATUSES, ListEventsParams
from . import data, timeline
from .context import dashboard_of
from .filters import PAGE_SIZE, STATUSES, RunFilters, time_input
from .format import now_ms

FAILURES_SCANNED = 1000  # list_failures groups the newest 1000 failed runs by default
FANOUT_STATUSES = ("pending", "completed", "partial", "failed", "no-subscribers")
FAILURE_CATEGORIES = [
    ("exhausted", "Retries exhausted", "every attempt failed: the dead letters"),
    ("non_retriable", "Non-retriable", "failed at once: a NonRetriableError, a validation or serialization error"),
    ("crashed", "Crashed", "the run kept killing its worker and was failed by the leader"),
    ("other", "Other", "canceled or ended another way"),
]
NOTICES = {
    "retried": "Retry started: the run runs again as a new attempt.",
    "replayed": "Replay started: this is the new run.",
    "canceled": "Run canceled.",
    "cancel_requested": "Cancellation requested: the worker holding the run stops it.",
    "not_canceled": "Nothing to cancel: the run had already ended.",
}


def _notice(request: Request) -> str | None:
    return NOTICES.get(request.query_params.get("done", ""))


async def overview(request: Request) -> Response:
    d = dashboard_of(request)
    return d.render(request, "overview.html", active="overview", **await data.overview(d.client))


async def runs(request: Request) -> Response:
    d = dashboard_of(request)
    f = RunFilters.read(request.query_params)
    result, metas = await asyncio.gather(d.client.search_runs(f.search(PAGE_SIZE)), d.client.list_workflows_meta())
    return d.render(
        request, "runs.html", active="runs", f=f, result=result, statuses=STATUSES,
        workflows=[m["name"] for m in metas], queues=sorted({m["queue"] for m in metas}),
        next_params=f.params(cursor=result["cursor"]) if result["cursor"] else None,
        last_hour=f.params(after=time_input(now_ms() - data.HOUR_MS), before=""),
        last_day=f.params(after=time_input(now_ms() - 24 * data.HOUR_MS), before=""),
    )


async def run_detail(request: Request) -> Response:
    d = dashboard_of(request)
    client = d.client
    run_id = request.path_params["run_id"]
    run = await client.get_run(run_id)
    if run is None:
        return d.error(request, 404, "Run not found", f"run {run_id} does not exist (or retention deleted it)")
    want_stream = bool(run.get("stream_enabled"))
    terminal = run.get("status") in TERMINAL_STATUSES
    steps, attempts, (kids, more_kids), stream, explanation = await asyncio.gather(
        client.get_run_steps(run_id), client.get_run_attempts(run_id), data.children(client, run_id),
        client.get_run_stream(run_id, limit=data.STREAM_PAGE) if want_stream else _nothing(),
        _nothing() if terminal else client.explain_run(run_id),  # an ended run's page says why it ended
    )
    bars = timeline.build(run, steps, attempts, now_ms())
    return d.render(
        request, "run.html", active="runs", run=run, steps=steps, attempts=attempts, bars=bars,
        children=kids, more_children=more_kids, stream=stream, explanation=explanation, terminal=terminal,
        can_retry=run.get("status") in ("failed", "canceled"), notice=_notice(request),
        live=bool(request.query_params.get("live")),
        step_names=[s["name"] for s in steps if s.get("name")],
        attempt_began={a["attempt"]: timeline.attempt_start(a["started_at"], a["steps"], a["started_at"])
                       for a in attempts},
    )


async def _nothing() -> Any:
    return None


async def failures(request: Request) -> Response:
    d = dashboard_of(request)
    workflow = request.query_params.get("workflow") or None
    groups, workflows = await asyncio.gather(d.client.list_failures(workflow=workflow), d.client.list_workflows())
    by_category = {key: [g for g in groups if g["category"] == key] for key, _, _ in FAILURE_CATEGORIES}
    return d.render(request, "failures.html", active="failures", categories=FAILURE_CATEGORIES,
                    by_category=by_category, total=sum(g["count"] for g in groups), workflow=workflow or "",
                    workflows=workflows, scanned=FAILURES_SCANNED)


async def events(request: Request) -> Response:
    d = dashboard_of(request)
    q = request.query_params
    name = q.get("name") or None
    fanout = q.get("fanout_status") or None
    cursor = q.get("cursor") or None
    listed = await d.client.list_events(ListEventsParams(name=name, fanout_status=fanout, cursor=cursor,
                                                         limit=PAGE_SIZE))
    params = {"name": name or "", "fanout_status": fanout or ""}
    next_params = {**params, "cursor": listed[-1]["id"]} if len(listed) == PAGE_SIZE else None
    return d.render(request, "events.html", active="events", events=listed, params=params,
                    fanout_statuses=FANOUT_STATUSES, next_params=next_params)


async def event_detail(request: Request) -> Response:
    d = dashboard_of(request)
    event_id = request.path_params["event_id"]
    event = await d.client.get_event(event_id)
    if event is None:
        return d.error(request, 404, "Event not found", f"event {event_id} does not exist (or retention deleted it)")
    return d.render(request, "event.html", active="events", event=event)


async def workflows(request: Request) -> Response:
    d = dashboard_of(request)
    return d.render(request, "workflows.html", active="workflows", rows=await data.workflow_rows(d.client),
                    cap=data.LIVE_COUNT_CAP)
