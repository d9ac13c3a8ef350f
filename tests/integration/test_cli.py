"""The redflow CLI on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from redflow import EventTrigger, RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow


async def _echo(ctx: WorkflowHandlerContext) -> object:
    return ctx.input


def _cli(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run([sys.executable, "-m", "redflow.cli", *args[:2], "--url", url, "--prefix", prefix,
                           *args[2:]] if args[0] in ("runs", "events") else
                          [sys.executable, "-m", "redflow.cli", args[0], "--url", url, "--prefix", prefix, *args[1:]],
                          capture_output=True, text=True, timeout=60, env=env)


async def test_cli_lists_shows_and_cancels(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, redis_url: str, prefix: str
) -> None:
    wf = define_workflow("cli-wf", handler=_echo, event=[EventTrigger(name="cli.event")], registry=registry)
    await make_worker()
    done = await client.enqueue_definition(wf, {"x": 1})
    await done.result(timeout_ms=10_000)
    await client.emit_event("cli.event", {"y": 2}, event_id="cli-evt")
    from datetime import datetime, timedelta

    later = await client.enqueue_definition(wf, None, run_at=datetime.now() + timedelta(hours=1))

    listed = json.loads(_cli(redis_url, prefix, "runs", "list", "--json").stdout)
    assert done.id in [r["id"] for r in listed]
    table = _cli(redis_url, prefix, "runs", "list", "--workflow", "cli-wf").stdout
    assert "WORKFLOW" in table and done.id in table
    shown = json.loads(_cli(redis_url, prefix, "runs", "show", done.id, "--json").stdout)
    assert shown["run"]["output"] == {"x": 1}
    assert json.loads(_cli(redis_url, prefix, "runs", "cancel", later.id, "--json").stdout)["canceled"] is True
    assert (await client.get_run(later.id))["status"] == "canceled"
    events = json.loads(_cli(redis_url, prefix, "events", "list", "--json").stdout)
    assert "cli-evt" in [e["id"] for e in events]
    assert json.loads(_cli(redis_url, prefix, "events", "show", "cli-evt", "--json").stdout)["data"] == {"y": 2}
    assert "cli-wf" in _cli(redis_url, prefix, "workflows").stdout
    stats = json.loads(_cli(redis_url, prefix, "stats", "--json").stdout)
    assert stats["by_status"]["canceled"] >= 1
    missing = _cli(redis_url, prefix, "runs", "show", "nope-p0")
    assert missing.returncode == 1 and "not found" in missing.stderr
