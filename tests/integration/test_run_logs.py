"""Run outcome logs (issue 13 item 1): one structured line per outcome, and Redis outages that log
once, not per failed command."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, WorkflowRetryPolicy, define_workflow
from redflow.errors import RunFailedError
from redflow.observability.logs import JsonFormatter, OutageLog

from ..conftest import wait_until


def _run_lines(caplog: pytest.LogCaptureFixture, run_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "redflow.runs" and getattr(r, "redflow", {}).get("run_id") == run_id]


def _lines_when(caplog: pytest.LogCaptureFixture, run_id: str, n: int) -> list[logging.LogRecord] | None:
    lines = _run_lines(caplog, run_id)
    return lines if len(lines) >= n else None


async def test_a_failing_run_logs_one_failure_line_with_its_fields(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="redflow.runs")

    async def handler(ctx: WorkflowHandlerContext) -> None:
        async def charge() -> None:
            raise ValueError("card 4242 declined")

        await ctx.step.run("charge", charge)

    wf = define_workflow("logs-failing", handler=handler, registry=registry, max_attempts=2,
                         retries=WorkflowRetryPolicy(delay=10))
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(RunFailedError):
        await handle.result(timeout_ms=10_000)
    # The worker logs right after its write; result() may wake first.
    lines = await wait_until(lambda: _lines_when(caplog, handle.id, 2), what="two outcome lines")
    assert [(r.levelname, r.redflow["outcome"]) for r in lines] == [("INFO", "retried"), ("WARNING", "failed")]
    failed = lines[1]
    fields: dict[str, Any] = failed.redflow  # type: ignore[attr-defined]
    keys = ("workflow", "queue", "attempt", "max_attempts", "error_kind", "error_name", "step")
    assert {k: fields[k] for k in keys} == {
        "workflow": "logs-failing", "queue": "default", "attempt": 2, "max_attempts": 2, "error_kind": "error",
        "error_name": "ValueError", "step": "charge",
    }
    assert fields["duration_ms"] >= 0
    assert f"run {handle.id} of workflow 'logs-failing' failed for good (attempt 2/2" in failed.getMessage()
    assert "ValueError [error]: card 4242 declined" in failed.getMessage()
    assert lines[0].redflow["delay_ms"] == 10  # type: ignore[attr-defined]
    as_json = json.loads(JsonFormatter().format(failed))
    assert as_json["run_id"] == handle.id and as_json["outcome"] == "failed" and as_json["level"] == "WARNING"


async def test_successes_log_at_debug_unless_asked(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG, logger="redflow.runs")

    async def handler(ctx: WorkflowHandlerContext) -> int:
        return 1

    wf = define_workflow("logs-ok", handler=handler, registry=registry)
    await make_worker()
    quiet = await client.enqueue_definition(wf, None)
    assert await quiet.result(timeout_ms=10_000) == 1
    lines = await wait_until(lambda: _lines_when(caplog, quiet.id, 1), what="the success line")
    assert [r.levelname for r in lines] == ["DEBUG"]
    monkeypatch.setenv("REDFLOW_LOG_SUCCESSES", "1")
    loud = await client.enqueue_definition(wf, None)
    assert await loud.result(timeout_ms=10_000) == 1
    lines = await wait_until(lambda: _lines_when(caplog, loud.id, 1), what="the success line")
    assert [r.levelname for r in lines] == ["INFO"]
    # The logger at INFO: asked-for successes are still logged.
    caplog.set_level(logging.INFO, logger="redflow.runs")
    at_info = await client.enqueue_definition(wf, None)
    assert await at_info.result(timeout_ms=10_000) == 1
    lines = await wait_until(lambda: _lines_when(caplog, at_info.id, 1), what="the success line at INFO")
    assert [r.levelname for r in lines] == ["INFO"]


def test_an_outage_logs_when_it_starts_a_summary_and_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="redflow.test")
    outage = OutageLog(logging.getLogger("redflow.test"), "Redis at 127.0.0.1:1", summary_s=0.0)
    outage.succeeded()  # nothing was down: nothing to say
    assert caplog.records == []
    for _ in range(50):
        outage.failed(ConnectionRefusedError("refused"))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "Redis at 127.0.0.1:1 is unreachable: refused"
    assert all(m.startswith("Redis at 127.0.0.1:1 still unreachable after") for m in messages[1:])
    caplog.clear()
    outage = OutageLog(logging.getLogger("redflow.test"), "Redis", summary_s=3600)
    for _ in range(1000):
        outage.failed(ConnectionRefusedError("refused"))
    outage.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[1].startswith("Redis is back after ")
    assert "(1000 failed attempts)" in messages[1]
