"""The ``redflow`` command.

    redflow supervisor [options]            run worker processes (see --help)
    redflow dashboard [options]             serve the web dashboard (see --help)
    redflow runs list [--status S] [--workflow W] [--limit N] [--cursor ID]
    redflow runs show RUN_ID
    redflow runs cancel RUN_ID [--reason TEXT]
    redflow events list [--name N] [--limit N] [--cursor ID]
    redflow events show EVENT_ID
    redflow workflows
    redflow stats

Every command but ``supervisor`` takes ``--url`` (default REDIS_URL), ``--prefix`` (default
REDFLOW_PREFIX) and ``--json``; without ``--json`` the output is a readable table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

from ..client import RedflowClient, create_client
from ..errors import RedflowError
from ..types import ListEventsParams, ListRunsParams


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="Redis URL (default: REDIS_URL)")
    common.add_argument("--prefix", default=None, help="key prefix (default: REDFLOW_PREFIX or redflow:v1)")
    common.add_argument("--json", action="store_true", help="print JSON")
    p = argparse.ArgumentParser(prog="redflow", description="Inspect and operate a redflow deployment.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("supervisor", help="run worker processes (python -m redflow.supervisor)", add_help=False)
    sub.add_parser("dashboard", help="serve the web dashboard (redflow dashboard --help)", add_help=False)
    runs = sub.add_parser("runs", help="list, show or cancel runs").add_subparsers(dest="action", required=True)
    ls = runs.add_parser("list", parents=[common])
    ls.add_argument("--status")
    ls.add_argument("--workflow")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--cursor")
    runs.add_parser("show", parents=[common]).add_argument("run_id")
    cancel = runs.add_parser("cancel", parents=[common])
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default="")
    events = sub.add_parser("events", help="list or show events").add_subparsers(dest="action", required=True)
    els = events.add_parser("list", parents=[common])
    els.add_argument("--name")
    els.add_argument("--limit", type=int, default=20)
    els.add_argument("--cursor")
    events.add_parser("show", parents=[common]).add_argument("event_id")
    sub.add_parser("workflows", parents=[common], help="registered workflows")
    sub.add_parser("stats", parents=[common], help="runs by status and queue backlog")
    return p


def _time(ms: Any) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(int(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(key, "")) if not key.endswith("_at") else _time(r.get(key)) for key, _ in columns]
             for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


async def _run(args: argparse.Namespace, client: RedflowClient) -> tuple[Any, str]:
    """(data for --json, text for humans)."""
    if args.command == "runs" and args.action == "list":
        runs = await client.list_runs(ListRunsParams(status=args.status, workflow=args.workflow, limit=args.limit,
                                                     cursor=args.cursor))
        cols = [("id", "ID"), ("workflow", "WORKFLOW"), ("status", "STATUS"), ("attempt", "ATTEMPT"),
                ("created_at", "CREATED"), ("finished_at", "FINISHED")]
        return runs, _table([dict(r) for r in runs], cols)
    if args.command == "runs" and args.action == "show":
        run = await client.get_run(args.run_id)
        if run is None:
            raise RedflowError(f"run {args.run_id} not found")
        steps = await client.get_run_steps(args.run_id)
        data = {"run": run, "steps": steps}
        text = "\n".join(f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in run.items())
        text += "\n\nsteps:\n" + _table([dict(s) for s in steps], [("seq", "#"), ("name", "NAME"),
                                                                    ("status", "STATUS"), ("attempt", "ATTEMPT")])
        return data, text
    if args.command == "runs" and args.action == "cancel":
        canceled = await client.cancel_run(args.run_id, reason=args.reason)
        text = "canceled" if canceled else "not canceled (not found or already ended)"
        return {"run_id": args.run_id, "canceled": canceled}, text
    if args.command == "events" and args.action == "list":
        events = await client.list_events(ListEventsParams(name=args.name, limit=args.limit, cursor=args.cursor))
        cols = [("id", "ID"), ("name", "NAME"), ("fanout_status", "FANOUT"), ("delivery_count", "DELIVERED"),
                ("resumed_run_count", "RESUMED"), ("ts", "TIME")]
        rows = [{**e, "ts": _time(e.get("ts"))} for e in events]
        return events, _table(rows, cols)
    if args.command == "events" and args.action == "show":
        event = await client.get_event(args.event_id)
        if event is None:
            raise RedflowError(f"event {args.event_id} not found")
        return event, json.dumps(event, indent=2)
    if args.command == "workflows":
        metas = await client.list_workflows_meta()
        cols = [("name", "WORKFLOW"), ("queue", "QUEUE"), ("max_attempts", "MAX ATTEMPTS"), ("app", "APP")]
        return metas, _table([dict(m) for m in metas], cols)
    stats = await client.get_stats()
    text = _table([{"status": s, "runs": n} for s, n in stats["by_status"].items()], [("status", "STATUS"),
                                                                                      ("runs", "RUNS")])
    text += "\n\n" + _table([{"queue": q, **b} for q, b in stats["backlog"].items()],
                            [("queue", "QUEUE"), ("ready", "READY"), ("scheduled", "SCHEDULED")])
    return stats, text


async def _main(args: argparse.Namespace) -> int:
    client = create_client(url=args.url, prefix=args.prefix)
    try:
        data, text = await _run(args, client)
    finally:
        await client.close()
    print(json.dumps(data, indent=2, default=str) if args.json else text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["supervisor"]:
        from ..supervisor import main as supervisor_main

        return supervisor_main(args_list[1:])
    if args_list[:1] == ["dashboard"]:
        from ..dashboard import main as dashboard_main

        return dashboard_main(args_list[1:])
    args = _parser().parse_args(args_list)
    try:
        return asyncio.run(_main(args))
    except RedflowError as exc:
        print(f"redflow: {exc}", file=sys.stderr)
        return 1
