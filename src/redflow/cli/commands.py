"""The CLI's commands: each takes the parsed arguments and a client and returns (data for --json,
text for people). A missing run or event raises NotFound."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

from ..client import RedflowClient
from ..errors import ConfigurationError, RedflowError, RunNotFoundError
from ..types import BulkQuery, ListEventsParams, ListRunsParams
from .output import duration, error_lines, local_time, run_story, table

Result = tuple[Any, str]


class NotFound(RedflowError):
    """What the command was asked about does not exist (exit code 1)."""


def json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None


async def _run_or_missing(client: RedflowClient, run_id: str) -> dict[str, Any]:
    run = await client.get_run(run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found (never created, or removed by retention)")
    return dict(run)


# --- runs ------------------------------------------------------------------------------------------------
async def runs_list(args: argparse.Namespace, client: RedflowClient) -> Result:
    runs = await client.list_runs(ListRunsParams(status=args.status, workflow=args.workflow, limit=args.limit,
                                                 cursor=args.cursor))
    rows = [{**r, "took": duration((r["finished_at"] or 0) - (r["started_at"] or 0))
             if r.get("finished_at") and r.get("started_at") else "-"} for r in runs]
    cols = [("id", "ID"), ("workflow", "WORKFLOW"), ("status", "STATUS"), ("attempt", "ATTEMPT"),
            ("created_at", "CREATED"), ("took", "TOOK")]
    text = table(rows, cols)
    if len(runs) == args.limit:
        text += f"\n(more: --cursor {runs[-1]['cursor']})"
    return runs, text


async def runs_show(args: argparse.Namespace, client: RedflowClient) -> Result:
    run = await _run_or_missing(client, args.run_id)
    steps = [dict(s) for s in await client.get_run_steps(args.run_id)]
    explanation = dict(await client.explain_run(args.run_id))
    return {"run": run, "steps": steps, "explanation": explanation}, run_story(run, steps, explanation)


async def runs_start(args: argparse.Namespace, client: RedflowClient) -> Result:
    handle = await client.run_by_name(args.workflow, json_arg(args.input, "--input"), queue_override=args.queue,
                                      idempotency_key=args.idempotency_key)
    if not args.wait:
        return {"run_id": handle.id}, handle.id
    output = await handle.result(timeout_ms=int(args.timeout * 1000))
    return {"run_id": handle.id, "output": output}, f"{handle.id}\n{json.dumps(output, default=str)}"


async def runs_retry(args: argparse.Namespace, client: RedflowClient) -> Result:
    if args.run_id is None:
        return await _bulk(args, client, "retry")
    _no_filters(args, "runs retry RUN_ID")
    try:
        handle = await client.retry_run(args.run_id)
    except RunNotFoundError as exc:
        raise NotFound(str(exc)) from None
    return {"run_id": handle.id, "retried": True}, f"run {handle.id} queued again"


async def runs_cancel(args: argparse.Namespace, client: RedflowClient) -> Result:
    if args.run_id is None:
        return await _bulk(args, client, "cancel")
    _no_filters(args, "runs cancel RUN_ID")
    run = await _run_or_missing(client, args.run_id)
    canceled = await client.cancel_run(args.run_id, reason=args.reason)
    text = "canceled" if canceled else f"not canceled: the run had already ended ({run['status']})"
    return {"run_id": args.run_id, "canceled": canceled}, text


def _no_filters(args: argparse.Namespace, usage: str) -> None:
    given = [f"--{name}" for name in ("workflow", "status", "queue") if getattr(args, name, None)]
    if given or args.dry_run or args.job:
        raise ConfigurationError(f"{usage} acts on one run; {', '.join(given) or '--dry-run/--job'} "
                                 "select runs for the bulk form (leave out RUN_ID)")


async def _bulk(args: argparse.Namespace, client: RedflowClient, action: str) -> Result:
    query: dict[str, Any] = {name: getattr(args, name) for name in ("workflow", "status", "queue")
                             if getattr(args, name, None)}
    if not query:
        raise ConfigurationError(f"runs {action} needs a RUN_ID, or --workflow/--status/--queue to select runs")
    if action == "retry":
        result = await client.retry_runs(cast(BulkQuery, query), dry_run=args.dry_run, job_id=args.job)
    else:
        result = await client.cancel_runs(cast(BulkQuery, query), dry_run=args.dry_run, reason=args.reason,
                                          job_id=args.job)
    verb = "retried" if action == "retry" else "canceled"
    if result["dry_run"]:
        text = f"{result['matched']} runs match; nothing {verb} (dry run)"
    else:
        text = (f"{result['done']} runs {verb}, {result['skipped']} skipped (moved on meanwhile); "
                f"job {result['job_id']}")
    return result, text


async def runs_replay(args: argparse.Namespace, client: RedflowClient) -> Result:
    await _run_or_missing(client, args.run_id)
    kwargs: dict[str, Any] = {"from_step": args.from_step, "queue": args.queue}
    if args.input is not None:
        kwargs["input"] = json_arg(args.input, "--input")
    handle = await client.replay_run(args.run_id, **kwargs)
    return {"run_id": handle.id, "replayed_from": args.run_id}, handle.id


async def runs_explain(args: argparse.Namespace, client: RedflowClient) -> Result:
    try:
        explanation = await client.explain_run(args.run_id)
    except RunNotFoundError as exc:
        raise NotFound(str(exc)) from None
    return explanation, f"{explanation['status']}: {explanation['message']}"


async def runs_attempts(args: argparse.Namespace, client: RedflowClient) -> Result:
    await _run_or_missing(client, args.run_id)
    attempts = await client.get_run_attempts(args.run_id)
    lines: list[str] = []
    for a in attempts:
        lines.append(f"attempt {a['attempt']}: {a['status']}  started {local_time(a['started_at'])}, "
                     f"took {duration(a['finished_at'] - a['started_at']) if a['finished_at'] else '-'}")
        for s in a["steps"]:
            lines.append(f"  #{s.get('seq')} {s.get('name')} ({s.get('kind', 'run')}): {s.get('status')}")
        lines += ["  " + line for line in error_lines(a.get("error"), indent="  ")[:1]]
    return attempts, "\n".join(lines) or "(no attempt has ended yet)"


# --- the rest --------------------------------------------------------------------------------------------
async def failures(args: argparse.Namespace, client: RedflowClient) -> Result:
    groups = await client.list_failures(workflow=args.workflow, limit=args.limit)
    rows = [{**g, "where": g["step"] or "(handler)", "last_seen_at": g["last_seen_ms"],
             "error": f"{g['error_name']}: {g['message']}"[:80]} for g in groups]
    cols = [("count", "RUNS"), ("workflow", "WORKFLOW"), ("category", "CATEGORY"), ("where", "STEP"),
            ("error", "ERROR"), ("last_seen_at", "LAST SEEN"), ("fingerprint", "FINGERPRINT")]
    return groups, table(rows, cols)


async def events_list(args: argparse.Namespace, client: RedflowClient) -> Result:
    events = await client.list_events(ListEventsParams(name=args.name, limit=args.limit, cursor=args.cursor))
    cols = [("id", "ID"), ("name", "NAME"), ("fanout_status", "FANOUT"), ("delivery_count", "DELIVERED"),
            ("resumed_run_count", "RESUMED"), ("ts_at", "TIME")]
    return events, table([{**e, "ts_at": e.get("ts")} for e in events], cols)


async def events_show(args: argparse.Namespace, client: RedflowClient) -> Result:
    event = await client.get_event(args.event_id)
    if event is None:
        raise NotFound(f"event {args.event_id} not found (never emitted, or removed by retention)")
    return event, json.dumps(event, indent=2, default=str)


async def events_emit(args: argparse.Namespace, client: RedflowClient) -> Result:
    result = await client.emit_event_detailed(args.name, json_arg(args.data, "--data"), correlation_key=args.key,
                                              event_id=args.id)
    run_ids = [h.id for h in result["handles"]]
    data = {"event_id": result["event_id"], "run_ids": run_ids, "resumed_run_ids": result["resumed_run_ids"]}
    text = (f"event {result['event_id']}: started {len(run_ids)} runs, resumed "
            f"{len(result['resumed_run_ids'])}" + "".join(f"\n  {r}" for r in run_ids))
    return data, text


async def cron_list(args: argparse.Namespace, client: RedflowClient) -> Result:
    triggers = await client.list_cron_triggers()
    metas = {m["name"]: m for m in await client.list_workflows_meta()}
    next_at = {str(c.get("id")): c.get("next_run_at") for m in metas.values() for c in m.get("cron", [])}
    rows = [{**t, "next_at": next_at.get(str(t.get("id"))), "last_at": t.get("last_slot_ms"),
             "state": "orphaned" if t.get("orphaned") else "active"} for t in triggers]
    cols = [("id", "ID"), ("workflow", "WORKFLOW"), ("expression", "SCHEDULE"), ("timezone", "TZ"),
            ("next_at", "NEXT"), ("last_at", "LAST"), ("state", "STATE")]
    return triggers, table(rows, cols)


async def workers(args: argparse.Namespace, client: RedflowClient) -> Result:
    listed = await client.list_workers()
    rows = [{**w, "role": "leader" if w["leader"] else "", "state": "alive" if w["alive"] else "gone",
             "lease_at": w["lease_until_ms"]} for w in listed]
    cols = [("id", "WORKER"), ("state", "STATE"), ("role", "ROLE"), ("queues", "QUEUES"),
            ("workflows", "WORKFLOWS"), ("lease_at", "LEASE UNTIL")]
    return listed, table(rows, cols)


async def workflows(args: argparse.Namespace, client: RedflowClient) -> Result:
    metas = await client.list_workflows_meta()
    cols = [("name", "WORKFLOW"), ("queue", "QUEUE"), ("max_attempts", "MAX ATTEMPTS"),
            ("max_concurrency", "MAX CONCURRENCY"), ("app", "APP")]
    return metas, table([dict(m) for m in metas], cols)


async def stats(args: argparse.Namespace, client: RedflowClient) -> Result:
    data = await client.get_stats()
    text = table([{"status": s, "runs": n} for s, n in data["by_status"].items()], [("status", "STATUS"),
                                                                                   ("runs", "RUNS")])
    text += "\n\n" + table([{"queue": q, **b} for q, b in data["backlog"].items()],
                           [("queue", "QUEUE"), ("ready", "READY"), ("scheduled", "SCHEDULED")])
    return data, text


COMMANDS: dict[tuple[str, str | None], Callable[[argparse.Namespace, RedflowClient], Awaitable[Result]]] = {
    ("runs", "list"): runs_list, ("runs", "show"): runs_show, ("runs", "start"): runs_start,
    ("runs", "retry"): runs_retry, ("runs", "cancel"): runs_cancel, ("runs", "replay"): runs_replay,
    ("runs", "explain"): runs_explain, ("runs", "attempts"): runs_attempts,
    ("events", "list"): events_list, ("events", "show"): events_show, ("events", "emit"): events_emit,
    ("cron", "list"): cron_list, ("failures", None): failures, ("workers", None): workers,
    ("workflows", None): workflows, ("stats", None): stats,
}
