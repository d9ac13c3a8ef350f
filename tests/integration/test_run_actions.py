"""Operator actions on runs (issue 12 item 1) against a real server: retry, replay from a step,
bulk retry and cancel (with dry runs, interrupted and resumed), the failures view, explain_run."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from redflow import (
    NonRetriableError,
    RedflowClient,
    WorkflowHandlerContext,
    WorkflowRegistry,
    WorkflowRetryPolicy,
    define_workflow,
)
from redflow.client import actions as actions_module
from redflow.encoding import decode
from redflow.errors import ConfigurationError, InvalidRunStateError, RunFailedError, RunNotFoundError
from redflow.storage.keys import partition_of

from ..conftest import wait_until

FAST = WorkflowRetryPolicy(delay=10)


class Interrupted(Exception):
    pass


async def _status(client: RedflowClient, run_id: str) -> str | None:
    state = await client.get_run(run_id)
    return None if state is None else state["status"]


async def _failed(client: RedflowClient, run_id: str) -> None:
    await wait_until(lambda: _is(client, run_id, "failed"), what=f"run {run_id} fails")


async def _is(client: RedflowClient, run_id: str, status: str) -> bool:
    return await _status(client, run_id) == status


def _flaky_two_steps(registry: WorkflowRegistry, name: str, ran: Counter[str], healthy: dict[str, bool],
                     max_attempts: int = 2) -> Any:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def fetch() -> int:
            ran[f"fetch:{ctx.run.id}"] += 1
            return 41

        async def charge(value: int) -> int:
            ran[f"charge:{ctx.run.id}"] += 1
            if not healthy["ok"]:
                raise RuntimeError(f"card service down for run {ctx.run.id} (attempt {ctx.run.attempt})")
            return value + 1

        value = await ctx.step.run("fetch", fetch)
        return await ctx.step.run("charge", charge, value)

    return define_workflow(name, handler=handler, registry=registry, max_attempts=max_attempts, retries=FAST)


# --- retry_run -------------------------------------------------------------------------------------------


async def test_retry_run_runs_a_failed_run_again_keeping_its_completed_steps(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    ran: Counter[str] = Counter()
    healthy = {"ok": False}
    wf = _flaky_two_steps(registry, "act-retry", ran, healthy)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(RunFailedError):
        await handle.result(timeout_ms=10_000)
    failed = await client.get_run(handle.id)
    assert failed is not None and failed["attempt"] == 2 and failed["error"] is not None
    assert failed["error"]["step"] == "charge"  # the error names the step it escaped from

    healthy["ok"] = True
    again = await client.retry_run(handle.id)
    assert again.id == handle.id
    assert await again.result(timeout_ms=10_000) == 42
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "succeeded" and state["error"] is None
    assert state["attempt"] == 3 and state["max_attempts"] == 4  # a fresh budget of 2 attempts
    assert ran[f"fetch:{handle.id}"] == 1  # recorded in attempt 1, replayed since
    assert ran[f"charge:{handle.id}"] == 3
    attempts = await client.get_run_attempts(handle.id)
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "failed"), (2, "failed"), (3, "succeeded")]


async def test_retry_run_of_a_canceled_sleeping_run(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> str:
        await ctx.step.wait_for("nap", 300)
        return "woke"

    wf = define_workflow("act-retry-canceled", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: client.store.read_wait(handle.id), what="the sleep")
    assert await client.cancel_run(handle.id, reason="by mistake")
    assert await _status(client, handle.id) == "canceled"
    await client.retry_run(handle.id)
    assert await handle.result(timeout_ms=10_000) == "woke"
    state = await client.get_run(handle.id)
    assert state is not None and state["cancel_reason"] is None and state["cancel_requested_at"] is None


async def test_retry_run_refuses_what_it_cannot_retry_and_writes_nothing(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> int:
        return 1

    wf = define_workflow("act-retry-refused", handler=handler, registry=registry)
    with pytest.raises(RunNotFoundError, match="no-such-run"):
        await client.retry_run("no-such-run-p0")
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(InvalidRunStateError, match="is queued: only a failed or canceled run"):
        await client.retry_run(handle.id)
    await make_worker()
    assert await handle.result(timeout_ms=10_000) == 1
    before = await client.get_run(handle.id)
    with pytest.raises(InvalidRunStateError, match="is succeeded"):
        await client.retry_run(handle.id)
    assert await client.get_run(handle.id) == before


async def test_a_retried_run_passes_admission_again(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()

    async def handler(ctx: WorkflowHandlerContext) -> str:
        if ctx.input["mode"] == "fail":
            raise NonRetriableError("bad input")
        if ctx.input["mode"] == "block":
            await gate.wait()
        return ctx.input["mode"]

    wf = define_workflow("act-retry-mutex", handler=handler, registry=registry,
                         mutex=lambda input: f"account:{input['account']}")
    await make_worker(concurrency=4)
    failing = await client.enqueue_definition(wf, {"mode": "fail", "account": "a1"})
    await _failed(client, failing.id)
    blocker = await client.enqueue_definition(wf, {"mode": "block", "account": "a1"})
    await wait_until(lambda: _is(client, blocker.id, "running"), what="the blocker runs")
    await client.retry_run(failing.id)
    explained = await wait_until(lambda: _reason(client, failing.id, "held_mutex"), what="the retry is held")
    assert explained["details"] == {"mutex": "account:a1", "held_by": blocker.id, "attempt": 1, "max_attempts": 4}
    gate.set()
    assert await blocker.result(timeout_ms=10_000) == "block"
    with pytest.raises(RunFailedError, match="bad input"):
        await failing.result(timeout_ms=10_000)


async def _reason(client: RedflowClient, run_id: str, reason: str) -> Any:
    explained = await client.explain_run(run_id)
    return explained if explained["reason"] == reason else None


# --- replay_run ------------------------------------------------------------------------------------------


async def test_replay_from_a_middle_step_reuses_the_earlier_outputs(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    ran: Counter[str] = Counter()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def body(name: str) -> str:
            ran[name] += 1
            return f"{name}:{ctx.input['n']}:{ran[name]}"

        a = await ctx.step.run("a", body, "a")
        await ctx.step.wait_for("pause", 1)
        b = await ctx.step.run("b", body, "b")
        c = await ctx.step.run("c", body, "c")
        return [a, b, c]

    wf = define_workflow("act-replay", handler=handler, registry=registry)
    await make_worker()
    original = await client.enqueue_definition(wf, {"n": 1})
    assert await original.result(timeout_ms=10_000) == ["a:1:1", "b:1:1", "c:1:1"]

    replay = await client.replay_run(original.id, from_step="b", input={"n": 2})
    assert replay.id != original.id
    assert await replay.result(timeout_ms=10_000) == ["a:1:1", "b:2:2", "c:2:2"]
    assert ran == {"a": 1, "b": 2, "c": 2}  # step a's body did not run again
    state = await client.get_run(replay.id)
    assert state is not None and state["replayed_from"] == original.id and state["input"] == {"n": 2}
    steps = {s["name"]: s for s in await client.get_run_steps(replay.id)}
    assert steps["a"]["output"] == "a:1:1" and steps["a"]["attempt"] == 0  # copied, not run by this run
    assert steps["b"]["attempt"] == 1

    whole = await client.replay_run(original.id)  # from the start, with the original input
    assert await whole.result(timeout_ms=10_000) == ["a:1:2", "b:1:3", "c:1:3"]


async def test_replay_refuses_an_unknown_step_and_a_run_that_has_not_ended(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()

    async def handler(ctx: WorkflowHandlerContext) -> int:
        await ctx.step.run("first", lambda: 1)
        await gate.wait()
        return 1

    wf = define_workflow("act-replay-refused", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: client.get_run_steps(handle.id), what="the first step")
    with pytest.raises(InvalidRunStateError, match="is running: only an ended run can be replayed"):
        await client.replay_run(handle.id)
    gate.set()
    assert await handle.result(timeout_ms=10_000) == 1
    with pytest.raises(ConfigurationError, match=r"has no step 'second' to replay from \(its steps: first\)"):
        await client.replay_run(handle.id, from_step="second")
    with pytest.raises(RunNotFoundError):
        await client.replay_run("missing-p0")
    listed = await client.list_runs()
    assert [r["id"] for r in listed] == [handle.id]  # nothing half-created


# --- bulk actions ----------------------------------------------------------------------------------------


async def test_bulk_retry_interrupted_half_way_and_resumed(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: Counter[str] = Counter()
    healthy = {"ok": False}
    wf = _flaky_two_steps(registry, "act-bulk-retry", ran, healthy, max_attempts=1)
    other = _flaky_two_steps(registry, "act-bulk-other", ran, healthy, max_attempts=1)
    await make_worker(concurrency=20)
    handles = [await client.enqueue_definition(wf, None) for _ in range(30)]
    bystander = await client.enqueue_definition(other, None)
    for h in [*handles, bystander]:
        await _failed(client, h.id)
    healthy["ok"] = True

    query = {"workflow": "act-bulk-retry", "status": "failed"}
    dry = await client.retry_runs(query, dry_run=True)  # type: ignore[arg-type]
    assert (dry["matched"], dry["done"], dry["finished"]) == (30, 0, True)

    monkeypatch.setattr(actions_module, "BULK_BATCH", 5)
    batches = 0
    real_write = client.store.write_bulk_job

    async def interrupted_write(job_id: str, record: bytes) -> None:
        nonlocal batches
        await real_write(job_id, record)
        batches += 1
        if batches == 3:
            raise Interrupted  # the operator's process dies right after a batch was saved

    monkeypatch.setattr(client.store, "write_bulk_job", interrupted_write)
    with pytest.raises(Interrupted):
        await client.retry_runs(query, job_id="mass-retry-1")  # type: ignore[arg-type]
    saved = decode(await client.store.read_bulk_job("mass-retry-1") or b"{}")
    assert saved["done"] == 15 and saved["cursor"] is not None
    monkeypatch.setattr(client.store, "write_bulk_job", real_write)

    resumed = await client.retry_runs(query, job_id="mass-retry-1")  # type: ignore[arg-type]
    assert resumed["finished"] and resumed["job_id"] == "mass-retry-1"
    assert resumed["done"] == 30
    results = await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles))
    assert results == [42] * 30
    assert all(ran[f"charge:{h.id}"] == 2 for h in handles)  # each retried exactly once
    assert all(ran[f"fetch:{h.id}"] == 1 for h in handles)
    assert await _status(client, bystander.id) == "failed"  # another workflow: untouched
    again = await client.retry_runs(query, job_id="mass-retry-1")  # type: ignore[arg-type]
    assert again["finished"] and again["done"] == 30  # a finished job does nothing more


async def test_bulk_cancel_with_its_dry_run(client: RedflowClient, registry: WorkflowRegistry) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> None:
        return None

    later = datetime.now(UTC) + timedelta(hours=1)
    wf = define_workflow("act-bulk-cancel", handler=handler, registry=registry)
    keep = define_workflow("act-bulk-keep", handler=handler, registry=registry)
    doomed = await client.enqueue_many(wf, list(range(12)), run_at=later)
    kept = await client.enqueue_many(keep, list(range(3)), run_at=later)
    queued = await client.enqueue_definition(wf, "now")

    dry = await client.cancel_runs({"workflow": "act-bulk-cancel", "status": "scheduled"}, dry_run=True)
    assert (dry["matched"], dry["done"], dry["dry_run"]) == (12, 0, True)
    assert await _status(client, doomed[0].id) == "scheduled"
    done = await client.cancel_runs({"workflow": "act-bulk-cancel"}, reason="bad deploy")
    assert (done["matched"], done["done"], done["skipped"], done["finished"]) == (13, 13, 0, True)
    for h in [*doomed, queued]:
        state = await client.get_run(h.id)
        assert state is not None and state["status"] == "canceled" and state["cancel_reason"] == "bad deploy"
    assert {await _status(client, h.id) for h in kept} == {"scheduled"}


async def test_bulk_queries_are_checked_before_anything_changes(client: RedflowClient) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown bulk query keys \['wf'\]"):
        await client.retry_runs({"wf": "x"})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(ConfigurationError, match="runs that are 'succeeded' cannot be retried"):
        await client.retry_runs({"status": "succeeded"})
    with pytest.raises(ConfigurationError, match="runs that are 'failed' cannot be canceled"):
        await client.cancel_runs({"status": "failed"})
    with pytest.raises(ConfigurationError, match="created_after_ms must be epoch milliseconds"):
        await client.cancel_runs({"created_after_ms": "yesterday"})  # type: ignore[typeddict-item]


# --- failures view -------------------------------------------------------------------------------------


async def test_list_failures_groups_by_workflow_category_step_and_message_shape(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def payments(ctx: WorkflowHandlerContext) -> None:
        async def charge() -> None:
            raise RuntimeError(f"card {ctx.input} declined after {ctx.input * 7} ms")

        await ctx.step.run("charge", charge)

    async def emails(ctx: WorkflowHandlerContext) -> None:
        raise NonRetriableError(f"address {ctx.input!r} is invalid")

    pay = define_workflow("act-fail-pay", handler=payments, registry=registry, max_attempts=2, retries=FAST)
    mail = define_workflow("act-fail-mail", handler=emails, registry=registry, max_attempts=3)
    await make_worker(concurrency=10)
    runs = [await client.enqueue_definition(pay, n) for n in range(4)]
    runs += [await client.enqueue_definition(mail, f"user{n}@example") for n in range(3)]
    for h in runs:
        await _failed(client, h.id)

    groups = await client.list_failures()
    assert [(g["workflow"], g["count"], g["category"], g["step"]) for g in groups] == [
        ("act-fail-pay", 4, "exhausted", "charge"),
        ("act-fail-mail", 3, "non_retriable", None),
    ]
    pay_group = groups[0]
    assert pay_group["error_name"] == "RuntimeError" and pay_group["message"].startswith("card ")
    assert set(pay_group["sample_run_ids"]) <= {h.id for h in runs[:4]} and len(pay_group["sample_run_ids"]) == 4
    assert pay_group["first_seen_ms"] <= pay_group["last_seen_ms"]
    only_mail = await client.list_failures(workflow="act-fail-mail")
    assert [g["count"] for g in only_mail] == [3]
    with pytest.raises(ConfigurationError, match="limit must be between 1 and 10000"):
        await client.list_failures(limit=0)


# --- explain_run ---------------------------------------------------------------------------------------


async def test_explain_run_says_why_a_run_is_not_running(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def napper(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.wait_for("nap", "1h")

    async def listener(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.wait_for_event("hear", "order.paid", "o-1", "1h")

    async def flaky(ctx: WorkflowHandlerContext) -> None:
        raise RuntimeError("upstream 503")

    nap = define_workflow("act-explain-nap", handler=napper, registry=registry)
    listen = define_workflow("act-explain-listen", handler=listener, registry=registry)
    retrying = define_workflow("act-explain-retry", handler=flaky, registry=registry,
                               retries=WorkflowRetryPolicy(delay="1h"))
    # Defined in no worker's registry, so no worker claims from its queue.
    elsewhere = define_workflow("act-explain-elsewhere", handler=flaky, registry=WorkflowRegistry(), queue="nobody")
    with pytest.raises(RunNotFoundError):
        await client.explain_run("missing-p0")

    queued = await client.enqueue_definition(nap, None)
    first = await client.explain_run(queued.id)
    assert first["reason"] == "no_worker_for_queue" and first["details"]["ahead"] == 0
    assert first["message"] == "no live worker claims from queue 'default'; start one with that queue"

    gate = asyncio.Event()

    async def blocker(ctx: WorkflowHandlerContext) -> None:
        await gate.wait()

    slow = define_workflow("act-explain-slow", handler=blocker, registry=registry, queue="slow")
    await make_worker(queues=["slow"], concurrency=1)
    busy = [await client.enqueue_definition(slow, n) for n in range(3)]
    await wait_until(lambda: _is(client, busy[0].id, "running"), what="the slow worker is busy")
    # Ahead of a run are the runs before it in its partition's ready list (every list is claimed in parallel).
    parts = len(client.store.partitions)

    def where(run_id: str) -> str:
        return "queue 'slow'" + ("" if parts == 1 else
                                 f" (partition {partition_of(run_id)} of {parts}, claimed in parallel with the others)")

    same = partition_of(busy[1].id) == partition_of(busy[2].id)
    behind = await client.explain_run(busy[2].id)
    assert behind["reason"] == ("queued_behind" if same else "queued")
    assert behind["message"] == (f"queued behind 1 runs in {where(busy[2].id)}" if same
                                 else f"next to be claimed from {where(busy[2].id)}")
    assert (await client.explain_run(busy[1].id))["message"] == f"next to be claimed from {where(busy[1].id)}"
    running = await client.explain_run(busy[0].id)
    assert running["reason"] == "running" and "(attempt 1 of 3)" in running["message"]
    gate.set()

    await make_worker()
    parked = await client.enqueue_definition(elsewhere, None)
    stuck = await wait_until(lambda: _reason(client, parked.id, "no_worker_for_queue"), what="no worker")
    assert "no live worker claims from queue 'nobody'" in stuck["message"]

    sleeping = await wait_until(lambda: _reason(client, queued.id, "sleeping"), what="the sleep")
    assert sleeping["details"]["step"] == "nap" and "sleeping in step 'nap' until" in sleeping["message"]
    heard = await client.enqueue_definition(listen, None)
    waiting = await wait_until(lambda: _reason(client, heard.id, "waiting_event"), what="the event wait")
    assert waiting["details"]["event"] == "order.paid" and waiting["details"]["correlation_key"] == "o-1"
    retry = await client.enqueue_definition(retrying, None)
    delayed = await wait_until(lambda: _reason(client, retry.id, "retry_delay"), what="the retry delay")
    assert "attempt 1 failed (RuntimeError: upstream 503); attempt 2 starts at" in delayed["message"]
    assert await client.cancel_run(retry.id)
    ended = await client.explain_run(retry.id)
    assert ended["reason"] == "ended" and ended["message"].startswith("ended as canceled at ")
