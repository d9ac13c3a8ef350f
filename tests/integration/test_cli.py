"""The redflow CLI on real data."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from typing import Any

from redflow import (
    CronTrigger,
    EventTrigger,
    RedflowClient,
    WorkflowHandlerContext,
    WorkflowRegistry,
    define_workflow,
)

from ..conftest import wait_until


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


# --- the operator commands (issue 12 item 3) -------------------------------------------------------------


def _sh(argv: list[str] | str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, shell=isinstance(argv, str))


async def _run_cli(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, off the event loop (the test's worker keeps running meanwhile)."""
    argv = [sys.executable, "-m", "redflow.cli", *args, "--url", url, "--prefix", prefix]
    return await asyncio.to_thread(_sh, argv)


async def _json(url: str, prefix: str, *args: str) -> Any:
    done = await _run_cli(url, prefix, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_cli_operator_commands_on_real_runs(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, redis_url: str, prefix: str
) -> None:
    healthy = {"ok": False}
    ran: list[str] = []

    async def charge(ctx: WorkflowHandlerContext) -> object:
        async def fetch() -> int:
            ran.append("fetch")
            return 41

        async def pay(value: int) -> int:
            ran.append("pay")
            if not healthy["ok"]:
                raise RuntimeError("card service down")
            return value + 1

        value = await ctx.step.run("fetch", fetch)
        return await ctx.step.run("pay", pay, value)

    define_workflow("cli-charge", handler=charge, registry=registry, max_attempts=1)
    define_workflow("cli-echo", handler=_echo, cron=[CronTrigger("0 3 * * *", timezone="UTC", id="nightly")],
                    event=[EventTrigger(name="cli.ping")], registry=registry)
    await make_worker()

    started = await _json(redis_url, prefix, "runs", "start", "cli-echo", "--input", '{"a": 1}', "--wait")
    assert started["output"] == {"a": 1}
    failed_id = (await _json(redis_url, prefix, "runs", "start", "cli-charge"))["run_id"]
    await wait_until(lambda: _status(client, failed_id, "failed"), what="the charge fails")

    shown = await _run_cli(redis_url, prefix, "runs", "show", failed_id)
    assert shown.returncode == 0, shown.stderr
    assert "status    failed  (attempt 1 of 1)" in shown.stdout
    assert "why       ended as failed at " in shown.stdout
    assert "RuntimeError: card service down (kind error, step 'pay')" in shown.stdout
    assert "Traceback (most recent call last):" in shown.stdout  # the stack, as lines
    assert any(line.split()[:3] == ["2", "pay", "run"] for line in shown.stdout.splitlines())

    explained = await _json(redis_url, prefix, "runs", "explain", failed_id)
    assert explained["reason"] == "ended"
    groups = await _json(redis_url, prefix, "failures")
    assert [(g["workflow"], g["step"], g["count"]) for g in groups] == [("cli-charge", "pay", 1)]
    assert "card service down" in (await _run_cli(redis_url, prefix, "failures")).stdout

    healthy["ok"] = True
    assert (await _json(redis_url, prefix, "runs", "retry", failed_id))["retried"] is True
    await wait_until(lambda: _status(client, failed_id, "succeeded"), what="the retry succeeds")
    attempts = await _json(redis_url, prefix, "runs", "attempts", failed_id)
    assert [a["status"] for a in attempts] == ["failed", "succeeded"]
    assert ran.count("fetch") == 1

    replay = await _json(redis_url, prefix, "runs", "replay", failed_id, "--from-step", "pay")
    await wait_until(lambda: _status(client, replay["run_id"], "succeeded"), what="the replay succeeds")
    assert ran.count("fetch") == 1 and ran.count("pay") == 3

    later = datetime.now() + timedelta(hours=1)
    for n in range(3):
        await client.run_by_name("cli-echo", n, run_at=later)
    dry = await _run_cli(redis_url, prefix, "runs", "cancel", "--workflow", "cli-echo", "--status", "scheduled",
                         "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip() == "3 runs match; nothing canceled (dry run)"
    bulk = await _json(redis_url, prefix, "runs", "cancel", "--workflow", "cli-echo", "--status", "scheduled")
    assert (bulk["done"], bulk["finished"]) == (3, True)

    emitted = await _json(redis_url, prefix, "events", "emit", "cli.ping", "--data", '{"p": 1}', "--id", "ping-1")
    assert emitted["event_id"] == "ping-1" and len(emitted["run_ids"]) == 1
    crons = await _run_cli(redis_url, prefix, "cron", "list")
    assert "nightly" in crons.stdout and "0 3 * * *" in crons.stdout
    workers = await _json(redis_url, prefix, "workers")
    assert [w["alive"] for w in workers] == [True] and workers[0]["queues"] == ["default"]
    await wait_until(lambda: _leader_listed(redis_url, prefix), what="the leader is listed")


async def _leader_listed(url: str, prefix: str) -> bool:
    return any(w["leader"] for w in await _json(url, prefix, "workers"))


async def _status(client: RedflowClient, run_id: str, status: str) -> bool:
    state = await client.get_run(run_id)
    return state is not None and state["status"] == status


async def test_cli_exit_codes_and_one_line_errors(client: RedflowClient, redis_url: str, prefix: str) -> None:
    for args in (["runs", "show", "nope-p0"], ["runs", "retry", "nope-p0"], ["runs", "replay", "nope-p0"],
                 ["runs", "explain", "nope-p0"], ["runs", "attempts", "nope-p0"], ["runs", "cancel", "nope-p0"],
                 ["events", "show", "nope"]):
        missing = await _run_cli(redis_url, prefix, *args)
        assert missing.returncode == 1, (args, missing.stdout, missing.stderr)
        assert "not found" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, args
    bad_json = await _run_cli(redis_url, prefix, "runs", "start", "cli-echo", "--input", "{oops")
    assert bad_json.returncode == 2 and "--input is not valid JSON" in bad_json.stderr
    no_target = await _run_cli(redis_url, prefix, "runs", "retry")
    assert no_target.returncode == 2 and "needs a RUN_ID" in no_target.stderr
    bad_url = await asyncio.to_thread(_sh, [sys.executable, "-m", "redflow.cli", "stats", "--url", "http://x"])
    assert bad_url.returncode == 2 and "unsupported Redis URL scheme" in bad_url.stderr
    assert "Traceback" not in bad_url.stderr
    from redflow.embedded import free_port

    unreachable = await asyncio.to_thread(
        _sh, [sys.executable, "-m", "redflow.cli", "stats", "--url", f"redis://127.0.0.1:{free_port()}"]
    )
    assert unreachable.returncode == 3 and "cannot reach the server" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


async def test_cli_output_piped_into_head(
    client: RedflowClient, registry: WorkflowRegistry, redis_url: str, prefix: str
) -> None:
    wf = define_workflow("cli-many", handler=_echo, registry=registry)
    await client.enqueue_many(wf, list(range(300)))
    piped = await asyncio.to_thread(
        _sh, f"{sys.executable} -m redflow.cli runs list --limit 300 --url {redis_url} --prefix {prefix} | head -n 2"
    )
    assert len(piped.stdout.splitlines()) == 2
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr
