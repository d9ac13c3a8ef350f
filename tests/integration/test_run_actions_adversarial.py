"""Adversarial tests of the operator actions (retry_run, replay_run, bulk retry/cancel, explain_run)
against a real server: races with workers, cancellation, the reaper and retention; waits that were
canceled and retried; hooks; admission after a retry; attempt budgets; replays; bad input.

Tests marked ``xfail(strict=True)`` reproduce a bug; their reason names it."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from redflow import (
    ListRunsParams,
    NonRetriableError,
    PayloadEncodingError,
    RedflowClient,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    WorkflowRegistry,
    WorkflowRetryPolicy,
    define_workflow,
    wait_for_input,
)
from redflow.encoding import decode
from redflow.errors import ConfigurationError, InvalidRunStateError, RunFailedError, RunNotFoundError

from ..conftest import wait_until
from ..partitioned import count, every, keys_of, partitions, pin_spread, total, union

pytestmark = pytest.mark.timeout(60)

FAST = WorkflowRetryPolicy(delay=10)
FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01: every retention deadline is before it
TERMINAL = ("succeeded", "failed", "canceled")


async def _state(client: RedflowClient, run_id: str) -> dict[str, Any]:
    state = await client.get_run(run_id)
    assert state is not None, f"run {run_id} is gone"
    return dict(state)


async def _status(client: RedflowClient, run_id: str) -> str | None:
    state = await client.get_run(run_id)
    return None if state is None else state["status"]


async def _is(client: RedflowClient, run_id: str, *statuses: str) -> bool:
    return await _status(client, run_id) in statuses


async def _until(client: RedflowClient, run_id: str, *statuses: str, timeout_s: float = 15) -> dict[str, Any]:
    await wait_until(lambda: _is(client, run_id, *statuses), timeout_s=timeout_s,
                     what=f"run {run_id} is {'/'.join(statuses)}")
    return await _state(client, run_id)


async def _attempts(client: RedflowClient, run_id: str) -> list[tuple[int, str]]:
    return [(a["attempt"], a["status"]) for a in await client.get_run_attempts(run_id)]


async def _attempt_records(client: RedflowClient, run_id: str) -> dict[str, Any]:
    """The raw `attempts` hash entries of one run, field -> decoded record."""
    raw = await client.redis.execute("HGETALL", keys_of(client, run_id).attempts)
    pairs = dict(zip(raw[::2], raw[1::2], strict=True))
    return {k.decode(): decode(v) for k, v in pairs.items() if k.decode().startswith(run_id + ":")}


async def _key_snapshot(client: RedflowClient) -> dict[str, Any]:
    """Every key under the test's prefix with a size, so a refused call can be shown to write nothing."""
    out: dict[str, Any] = {}
    cursor = b"0"
    while True:
        cursor, keys = await client.redis.execute("SCAN", cursor, "MATCH", f"{client.prefix}:*", "COUNT", 1000)
        for key in keys:
            kind = (await client.redis.execute("TYPE", key)).decode()
            size: Any = None
            if kind == "hash":
                size = await client.redis.execute("HGETALL", key)
            elif kind == "zset":
                size = await client.redis.execute("ZRANGE", key, 0, -1, "WITHSCORES")
            elif kind == "list":
                size = await client.redis.execute("LRANGE", key, 0, -1)
            elif kind == "string":
                size = await client.redis.execute("GET", key)
            elif kind == "set":
                size = sorted(await client.redis.execute("SMEMBERS", key))
            out[key.decode()] = (kind, size)
        if cursor in (b"0", 0, "0"):
            break
    # the worker's heartbeat and bell tokens move on their own
    return {k: v for k, v in out.items() if not k.endswith((":workers", ":bell", ":leader", ":epoch"))}


async def _admission_leftovers(client: RedflowClient) -> tuple[int, int, int]:
    """(mutexes held, held members, running runs of any workflow), over every partition."""
    mutexes = await total(client, lambda k: ("HLEN", k.mutexes))
    held = await total(client, lambda k: ("ZCARD", k.held))
    running = sum(int(n) for values in await every(client, lambda k: ("HVALS", k.running)) for n in values)
    return mutexes, held, running


def _always_failing(registry: WorkflowRegistry, name: str, ran: Counter[str], max_attempts: int = 1,
                    **options: Any) -> Any:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        ran[ctx.run.id] += 1
        if ctx.input and ctx.input.get("heal"):
            return "healed"
        raise RuntimeError(f"boom {ctx.run.attempt}")

    return define_workflow(name, handler=handler, registry=registry, max_attempts=max_attempts, retries=FAST,
                           **options)


# --- races ---------------------------------------------------------------------------------------------------


async def test_two_concurrent_retries_of_one_run_requeue_it_once(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    ran: Counter[str] = Counter()
    wf = _always_failing(registry, "adv-double-retry", ran)
    handle = await client.enqueue_definition(wf, None)
    await make_worker()
    await _until(client, handle.id, "failed")
    outcomes = await asyncio.gather(*(client.retry_run(handle.id) for _ in range(5)), return_exceptions=True)
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, InvalidRunStateError)]
    assert len(ok) == 1 and len(refused) == 4, outcomes
    await wait_until(lambda: _attempts_are(client, handle.id, [(1, "failed"), (2, "failed")]), what="one retry")
    state = await _state(client, handle.id)
    assert state["attempt"] == 2 and state["max_attempts"] == 2 and ran[handle.id] == 2


async def _attempts_are(client: RedflowClient, run_id: str, expected: list[tuple[int, str]]) -> bool:
    return await _attempts(client, run_id) == expected and await _is(client, run_id, *TERMINAL)


async def test_a_retry_call_repeated_after_a_lost_reply_is_refused_not_doubled(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    ran: Counter[str] = Counter()
    wf = _always_failing(registry, "adv-lost-reply", ran)
    handle = await client.enqueue_definition(wf, None)
    assert await client.cancel_run(handle.id)
    header = await client.store.read_header(handle.id)
    assert header is not None
    # The first call reached the server but its reply was lost: the caller calls again.
    assert (await client.store.requeue(handle.id, header))[0].name == "OK"
    before = await _key_snapshot(client)
    with pytest.raises(InvalidRunStateError, match="is queued: only a failed or canceled run"):
        await client.retry_run(handle.id)
    assert await _key_snapshot(client) == before
    assert (await _state(client, handle.id))["max_attempts"] == 1  # budget granted once, not twice


async def test_retry_run_while_the_worker_is_retrying_the_run_itself_is_refused(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    attempts: Counter[str] = Counter()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        attempts[ctx.run.id] += 1
        raise RuntimeError("flaky")

    wf = define_workflow("adv-self-retry", handler=handler, registry=registry, max_attempts=3,
                         retries=WorkflowRetryPolicy(delay="1h"))
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _is(client, handle.id, "scheduled"), what="the worker's own retry delay")
    before = await _key_snapshot(client)
    with pytest.raises(InvalidRunStateError, match="is scheduled"):
        await client.retry_run(handle.id)
    assert await _key_snapshot(client) == before
    # cancel it during the delay, then retry: a fresh budget after the one failed attempt
    assert await client.cancel_run(handle.id)
    await client.retry_run(handle.id)
    await wait_until(lambda: _is(client, handle.id, "scheduled"), what="the retried run's own retry delay")
    state = await _state(client, handle.id)
    assert (state["attempt"], state["max_attempts"]) == (2, 4)
    assert await _attempts(client, handle.id) == [(1, "failed"), (2, "failed")]


async def test_retry_then_cancel_then_retry_before_any_worker_runs_it(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    ran: Counter[str] = Counter()
    wf = _always_failing(registry, "adv-retry-cancel", ran)
    handle = await client.enqueue_definition(wf, None)
    assert await client.cancel_run(handle.id, reason="first")  # canceled before any attempt
    for n in range(3):
        await client.retry_run(handle.id)
        assert await client.cancel_run(handle.id, reason=f"again {n}")
    state = await _state(client, handle.id)
    assert state["status"] == "canceled" and state["attempt"] == 0 and state["cancel_reason"] == "again 2"
    assert await client.get_run_attempts(handle.id) == []  # no attempt ever started
    await client.retry_run(handle.id)
    await make_worker()
    await _until(client, handle.id, "failed")
    assert ran[handle.id] == 1
    assert await _attempts(client, handle.id) == [(1, "failed")]
    assert (await _state(client, handle.id))["cancel_reason"] is None


async def test_retry_run_racing_retention_cleanup(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = asyncio.Event()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        if ctx.run.attempt > 1:
            await gate.wait()  # the retried attempt runs while retention sweeps
        raise NonRetriableError("boom")

    wf = define_workflow("adv-retention", handler=handler, registry=registry)
    kept = await client.enqueue_definition(wf, None)
    gone = await client.enqueue_definition(wf, None)
    await make_worker()
    await _until(client, kept.id, "failed")
    await _until(client, gone.id, "failed")

    # A retried run leaves the retention schedule: a cleanup right after it does not touch it.
    await client.retry_run(kept.id)
    assert await client.redis.execute("ZSCORE", keys_of(client, kept.id).expiry, kept.id) is None
    deleted = await client.cleanup_expired_runs_now(reference_time_ms=FAR_FUTURE_MS)
    assert deleted == 1 and await client.get_run(gone.id) is None  # only the other failed run went
    await _until(client, kept.id, "running")
    assert await client.cleanup_expired_runs_now(reference_time_ms=FAR_FUTURE_MS) == 0
    gate.set()
    await wait_until(lambda: _attempts_are(client, kept.id, [(1, "failed"), (2, "failed")]), what="retried")
    assert await client.redis.execute("ZSCORE", keys_of(client, kept.id).expiry, kept.id) is not None  # again

    # Cleanup between retry_run's read and its script: refused as not found, nothing resurrected.
    real = client.store.requeue

    async def cleanup_first(run_id: str, header: Any, token: str = "") -> Any:
        assert await client.cleanup_expired_runs_now(reference_time_ms=FAR_FUTURE_MS) == 1
        return await real(run_id, header, token)

    monkeypatch.setattr(client.store, "requeue", cleanup_first)
    with pytest.raises(RunNotFoundError):
        await client.retry_run(kept.id)
    assert await client.get_run(kept.id) is None
    assert await union(client, lambda k: ("LRANGE", k.ready("default"), 0, -1)) == set()
    assert await total(client, lambda k: ("HLEN", k.runs)) == 0
    assert await total(client, lambda k: ("ZCARD", k.index)) == 0


# --- retrying a run canceled in the middle of a durable wait --------------------------------------------------


async def _waiters(client: RedflowClient) -> list[bytes]:
    """Event waiters of every partition."""
    return [m for members in await every(client, lambda k: ("ZRANGE", k.waiters, 0, -1)) for m in members]


async def test_retry_of_a_run_canceled_while_waiting_for_an_event_resolves_once(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    seen: list[Any] = []

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        got = await ctx.step.wait_for_event("hear", "adv.paid", ctx.input["order"], "1h")
        seen.append((ctx.run.attempt, got and got["data"]))
        return got and got["data"]

    wf = define_workflow("adv-event-retry", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, {"order": "o-1"})
    await wait_until(lambda: _waiters(client), what="the event wait")
    assert await client.cancel_run(handle.id)
    assert await _waiters(client) == []  # the canceled wait left nothing an event could resolve
    assert await client.store.read_wait(handle.id) is None
    await client.emit_event("adv.paid", {"n": "too-early"}, correlation_key="o-2")  # another key: ignored later

    await client.retry_run(handle.id)
    explained = await wait_until(lambda: _reason(client, handle.id, "waiting_event"), what="waiting again")
    assert explained["details"]["event"] == "adv.paid" and explained["details"]["correlation_key"] == "o-1"
    assert len(await _waiters(client)) == 1
    await client.emit_event("adv.paid", {"n": 1}, correlation_key="o-1")
    assert await handle.result(timeout_ms=10_000) == {"n": 1}
    await client.emit_event("adv.paid", {"n": 2}, correlation_key="o-1")  # nothing is waiting any more
    assert await _waiters(client) == []
    assert seen == [(2, {"n": 1})]
    state = await _state(client, handle.id)
    assert state["status"] == "succeeded" and state["attempt"] == 2
    hear = [s for s in await client.get_run_steps(handle.id) if s["name"] == "hear"]
    assert [s["status"] for s in hear][-1] == "succeeded"


async def test_retry_of_a_run_canceled_mid_sleep_keeps_its_deadline_and_leaves_no_timer_behind(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    woke: list[int] = []

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.wait_for("nap", 400)
        woke.append(ctx.run.attempt)
        return "woke"

    wf = define_workflow("adv-sleep-retry", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    sleeping = await wait_until(lambda: _reason(client, handle.id, "sleeping"), what="the sleep")
    deadline = sleeping["details"]["until_ms"]
    sched = keys_of(client, handle.id).scheduled("default")
    assert await client.redis.execute("ZSCORE", sched, handle.id) is not None
    assert await client.cancel_run(handle.id)
    assert await client.redis.execute("ZSCORE", sched, handle.id) is None  # no timer left to wake it
    assert await client.store.read_wait(handle.id) is None
    await client.retry_run(handle.id)
    again = await wait_until(lambda: _reason(client, handle.id, "sleeping", "ended"), what="the retried run")
    if again["reason"] == "sleeping":
        assert again["details"]["until_ms"] == deadline  # the sleep's deadline is the one first recorded
    assert await handle.result(timeout_ms=10_000) == "woke"
    assert woke == [2]
    assert await client.redis.execute("ZCARD", sched) == 0
    naps = [s for s in await client.get_run_steps(handle.id) if s["name"] == "nap"]
    assert naps[-1]["status"] == "succeeded"


async def test_retry_of_a_run_canceled_while_waiting_for_input(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    calls: Counter[str] = Counter()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def prepare() -> str:
            calls["prepare"] += 1
            return "draft"

        async def approve() -> bool:
            calls["approve"] += 1
            if ctx.resume is None:
                raise wait_for_input("Approve?")
            return bool(ctx.resume.form["ok"])

        draft = await ctx.step.run("prepare", prepare)
        return {"draft": draft, "ok": await ctx.step.run("approve", approve), "attempt": ctx.run.attempt}

    wf = define_workflow("adv-input-retry", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _reason(client, handle.id, "waiting_input"), what="the input wait")
    assert await client.cancel_run(handle.id)
    assert await client.resume_run(handle.id, form={"ok": True}) is None  # canceled: nothing to resume
    await client.retry_run(handle.id)
    await wait_until(lambda: _reason(client, handle.id, "waiting_input"), what="waiting for input again")
    resumed = await client.resume_run(handle.id, form={"ok": True})
    assert resumed is not None
    assert await handle.result(timeout_ms=10_000) == {"draft": "draft", "ok": True, "attempt": 2}
    assert await client.resume_run(handle.id, form={"ok": False}) is None  # a second answer changes nothing
    assert calls == {"prepare": 1, "approve": 3}
    assert (await _state(client, handle.id))["status"] == "succeeded"


async def _reason(client: RedflowClient, run_id: str, *reasons: str) -> Any:
    explained = await client.explain_run(run_id)
    return explained if explained["reason"] in reasons else None


def _parent_and_child(registry: WorkflowRegistry, name: str, gate: asyncio.Event, started: list[str],
                      child_fails: dict[str, bool] | None = None) -> tuple[Any, Any]:
    async def child(ctx: WorkflowHandlerContext) -> Any:
        started.append(ctx.run.id)
        await gate.wait()
        if child_fails and child_fails["fail"]:
            raise NonRetriableError("child broke")
        return f"child-of-{ctx.input}"

    child_wf = define_workflow(f"{name}-child", handler=child, registry=registry, max_attempts=1)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        got = await ctx.step.run_workflow("kid", child_wf, ctx.run.id)
        return {"child": got, "attempt": ctx.run.attempt}

    return define_workflow(name, handler=parent, registry=registry, max_attempts=1), child_wf


async def test_retry_of_a_parent_whose_child_the_cascade_canceled_starts_a_new_child(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    started: list[str] = []
    parent_wf, _ = _parent_and_child(registry, "adv-cascade", gate, started)
    await make_worker(concurrency=4)
    parent = await client.enqueue_definition(parent_wf, None)
    await wait_until(lambda: len(started) == 1, what="the first child runs")
    await wait_until(lambda: _reason(client, parent.id, "waiting_child"), what="the parent waits")
    first_child = started[0]
    assert await client.cancel_run(parent.id, reason="operator")
    await _until(client, first_child, "canceled")
    assert await _cascade_done(client)
    with pytest.raises(InvalidRunStateError, match=r"its parent run .* was canceled"):
        await client.retry_run(first_child)  # the parent is canceled: its child may not run again

    await client.retry_run(parent.id)
    await wait_until(lambda: len(started) == 2, what="the retried parent starts a new child")
    second_child = started[1]
    assert second_child != first_child
    waiting = await wait_until(lambda: _reason(client, parent.id, "waiting_child"), what="the parent waits again")
    assert waiting["details"]["child_run_id"] == second_child

    # The old child stays canceled: it was canceled with its parent, whose retry started a new one.
    with pytest.raises(InvalidRunStateError, match="was canceled with its parent run"):
        await client.retry_run(first_child)
    gate.set()
    result = await parent.result(timeout_ms=10_000)
    assert result == {"child": f"child-of-{parent.id}", "attempt": 2}
    kid = [s for s in await client.get_run_steps(parent.id) if s["name"] == "kid"]
    assert kid[-1]["child_run_id"] == second_child and kid[-1]["status"] == "succeeded"
    assert await _waiters(client) == []


async def test_a_pending_cancel_cascade_does_not_cancel_the_children_of_the_retried_run(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    started: list[str] = []
    parent_wf, _ = _parent_and_child(registry, "adv-stale-cascade", gate, started)
    # Another process holds the leadership (of every partition), so this worker runs no cascades until
    # it is released.
    await client.store.ensure_ready()
    for part in partitions(client):
        await client.redis.execute("SET", part.keys.leader, "elsewhere:1", "PX", 60_000)
    await make_worker(concurrency=4)
    parent = await client.enqueue_definition(parent_wf, None)
    await wait_until(lambda: len(started) == 1, what="the first child runs")
    await wait_until(lambda: _reason(client, parent.id, "waiting_child"), what="the parent waits")
    # The canceling client dies right after cancel.lua: the cascade is left for the leader.
    code, outcome = await client.store.cancel(parent.id, "operator", client.retention_ms)
    assert (code.name, outcome) == ("OK", "canceled")
    assert await client.redis.execute("ZSCORE", keys_of(client, parent.id).cascade, parent.id) is not None

    await client.retry_run(parent.id)  # the operator changed their mind
    await wait_until(lambda: len(started) == 2, what="the retried parent starts a new child")
    await wait_until(lambda: _reason(client, parent.id, "waiting_child"), what="the retried parent waits")
    for part in partitions(client):  # this worker leads and finishes the cascade
        await client.redis.execute("DEL", part.keys.leader)
    await wait_until(lambda: _cascade_done(client), what="the cascade is finished")
    gate.set()
    assert (await _state(client, started[1]))["status"] != "canceled"
    assert (await parent.result(timeout_ms=10_000))["attempt"] == 2


async def _cascade_done(client: RedflowClient) -> bool:
    return await total(client, lambda k: ("ZCARD", k.cascade)) == 0


async def test_retry_of_a_child_whose_parent_already_ended_does_not_resume_the_parent(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    gate.set()
    started: list[str] = []
    fails = {"fail": True}
    parent_wf, _ = _parent_and_child(registry, "adv-orphan", gate, started, fails)
    await make_worker(concurrency=4)
    parent = await client.enqueue_definition(parent_wf, None)
    with pytest.raises(RunFailedError, match="child broke"):
        await parent.result(timeout_ms=10_000)
    child = started[0]
    parent_before = await _state(client, parent.id)
    parent_steps = await client.get_run_steps(parent.id)

    fails["fail"] = False
    await client.retry_run(child)
    assert await client.wait_for_result(child, timeout_ms=10_000) == f"child-of-{parent.id}"
    # end_run of the child resumes waiting parents in the same script: had it resumed this one, the
    # parent would no longer be failed now.
    assert await _state(client, parent.id) == parent_before
    assert await client.get_run_steps(parent.id) == parent_steps

    await client.retry_run(parent.id)  # the parent's next attempt starts its own child
    assert (await parent.result(timeout_ms=10_000)) == {"child": f"child-of-{parent.id}", "attempt": 2}
    assert len(started) == 3 and started[2] != child  # child attempt 1, its retry, the parent's new child


# --- on_failure hooks ------------------------------------------------------------------------------------------


async def test_on_failure_runs_once_per_failure_across_retries(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    hooks: list[tuple[int, str]] = []
    hook_gate = asyncio.Event()
    mode = {"fail": True}

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        if mode["fail"]:
            raise NonRetriableError(f"bad {ctx.run.attempt}")
        return ctx.run.attempt

    async def on_failure(ctx: Any) -> None:
        await hook_gate.wait()
        hooks.append((ctx.run.attempt, str(ctx.error)))

    wf = define_workflow("adv-hook", handler=handler, registry=registry, on_failure=on_failure, max_attempts=2)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    pending = await wait_until(lambda: _reason(client, handle.id, "hook_pending"), what="the hook is pending")
    assert pending["status"] == "failed"
    before = await _key_snapshot(client)
    with pytest.raises(InvalidRunStateError, match="on_failure hook has not finished"):
        await client.retry_run(handle.id)
    assert await _key_snapshot(client) == before
    hook_gate.set()
    await wait_until(lambda: _reason(client, handle.id, "ended"), what="the hook is done")
    assert [a for a, _ in hooks] == [1]

    await client.retry_run(handle.id)  # fails again: the hook runs for this second failure, once
    await wait_until(lambda: len(hooks) == 2, what="the second hook")
    await wait_until(lambda: _reason(client, handle.id, "ended"), what="the second hook is done")
    assert [a for a, _ in hooks] == [1, 2] and "bad 2" in hooks[1][1]

    mode["fail"] = False
    await client.retry_run(handle.id)
    assert await handle.result(timeout_ms=10_000) == 3
    assert len(hooks) == 2  # a success runs no hook
    assert await _attempts(client, handle.id) == [(1, "failed"), (2, "failed"), (3, "succeeded")]
    assert (await _state(client, handle.id))["error"] is None


# --- admission after a retry ----------------------------------------------------------------------------------


async def test_retried_runs_respect_max_concurrency_and_leave_no_slot_behind(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    live = {"now": 0, "max": 0}
    healthy = {"ok": False}

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        live["now"] += 1
        live["max"] = max(live["max"], live["now"])
        try:
            await asyncio.sleep(0.02)
            if not healthy["ok"]:
                raise NonRetriableError("down")
            return ctx.input
        finally:
            live["now"] -= 1

    wf = define_workflow("adv-capacity", handler=handler, registry=registry, max_concurrency=2)
    await make_worker(concurrency=10)
    failed = [await client.enqueue_definition(wf, n) for n in range(6)]
    for h in failed:
        await _until(client, h.id, "failed")
    assert live["max"] <= 2
    live["max"] = 0
    healthy["ok"] = True
    fresh = [await client.enqueue_definition(wf, 100 + n) for n in range(3)]
    result = await client.retry_runs({"workflow": "adv-capacity"})
    assert result["done"] == 6
    outputs = await asyncio.gather(*(h.result(timeout_ms=15_000) for h in [*failed, *fresh]))
    assert outputs == [*range(6), 100, 101, 102]
    assert live["max"] <= 2, f"{live['max']} runs of a max_concurrency=2 workflow ran at once"
    assert await _admission_leftovers(client) == (0, 0, 0)


async def test_a_retried_mutex_run_releases_its_mutex_whether_it_fails_or_is_canceled(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    holders: list[str] = []
    live = {"now": 0, "max": 0}

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        live["now"] += 1
        live["max"] = max(live["max"], live["now"])
        holders.append(ctx.run.id)
        try:
            if ctx.input["mode"] == "block":
                await gate.wait()
            if ctx.input["mode"] == "fail":
                raise NonRetriableError("no")
            return ctx.input["mode"]
        finally:
            live["now"] -= 1

    wf = define_workflow("adv-mutex", handler=handler, registry=registry, mutex=lambda i: f"acct:{i['acct']}")
    await make_worker(concurrency=6)
    failing = await client.enqueue_definition(wf, {"mode": "fail", "acct": "a"})
    await _until(client, failing.id, "failed")
    assert await _admission_leftovers(client) == (0, 0, 0)

    blocker = await client.enqueue_definition(wf, {"mode": "block", "acct": "a"})
    await _until(client, blocker.id, "running")
    await client.retry_run(failing.id)
    await wait_until(lambda: _reason(client, failing.id, "held_mutex"), what="the retry waits for the mutex")
    assert await client.cancel_run(failing.id)  # canceled while held: it leaves the held set
    assert await _admission_leftovers(client) == (1, 0, 1)
    await client.retry_run(failing.id)
    await wait_until(lambda: _reason(client, failing.id, "held_mutex"), what="held again")
    gate.set()
    assert await blocker.result(timeout_ms=10_000) == "block"
    await _until(client, failing.id, "failed")
    assert await _admission_leftovers(client) == (0, 0, 0)
    assert live["max"] == 1
    other = await client.enqueue_definition(wf, {"mode": "ok", "acct": "a"})
    assert await other.result(timeout_ms=10_000) == "ok"  # the mutex is free for anyone
    assert await _attempts(client, failing.id) == [(1, "failed"), (2, "failed")]


async def test_retried_runs_drain_at_their_throttle_rate(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    starts: dict[str, list[int]] = {}
    healthy = {"ok": False}
    loop = asyncio.get_running_loop()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        starts.setdefault(ctx.run.id, []).append(int(loop.time() * 1000))
        if not healthy["ok"]:
            raise NonRetriableError("down")
        return ctx.input

    period = 600
    wf = define_workflow("adv-throttle", handler=handler, registry=registry,
                         throttle=WorkflowRateLimitOptions(key=lambda i: "all", limit=2, period=period))
    await make_worker(concurrency=10)
    runs = [await client.enqueue_definition(wf, n) for n in range(6)]
    for h in runs:
        await _until(client, h.id, "failed")
    healthy["ok"] = True
    result = await client.retry_runs({"workflow": "adv-throttle", "status": "failed"})
    assert result["done"] == 6
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in runs)) == list(range(6))
    retried = sorted(s[1] for s in starts.values())
    # 2 per window of 600 ms: the 5th and 6th retried runs start at least two windows after the first
    assert retried[-1] - retried[0] >= 2 * period - 100, retried
    assert await _admission_leftovers(client) == (0, 0, 0)
    assert await client.redis.execute("ZCARD", client.keys.held) == 0


async def test_a_retried_run_over_its_rate_limit_fails_as_rate_limited_without_running(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    ran: Counter[int] = Counter()
    hooks: list[str] = []

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        ran[ctx.run.attempt] += 1
        raise NonRetriableError("first try fails")

    async def on_failure(ctx: Any) -> None:
        hooks.append(type(ctx.error).__name__)

    wf = define_workflow("adv-rate", handler=handler, registry=registry, on_failure=on_failure,
                         rate_limit=WorkflowRateLimitOptions(key=lambda i: "all", limit=1, period="1h"))
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _reason(client, handle.id, "ended"), what="the first failure and its hook")
    await client.retry_run(handle.id)  # the budget of 1 per hour is spent: refused at admission
    await wait_until(lambda: len(hooks) == 2, what="the rate-limit hook")
    await wait_until(lambda: _reason(client, handle.id, "ended"), what="the second hook is done")
    state = await _state(client, handle.id)
    assert state["status"] == "failed" and state["error"]["kind"] == "rate_limited"
    assert ran == {1: 1}  # the handler never ran for the retried attempt
    assert hooks == ["NonRetriableError", "RateLimitExceededError"]
    assert await _attempts(client, handle.id) == [(1, "failed"), (2, "failed")]
    assert state["attempt"] == 2
    assert await _admission_leftovers(client) == (0, 0, 0)


# --- the attempt budget ---------------------------------------------------------------------------------------


async def test_each_retry_gets_a_fresh_budget_and_attempt_records_are_never_overwritten(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    ran: Counter[str] = Counter()
    wf = _always_failing(registry, "adv-budget", ran, max_attempts=2)
    worker = await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await _until(client, handle.id, "failed")
    await worker.stop()
    records: list[dict[str, Any]] = [await _attempt_records(client, handle.id)]
    for expected_max in (4, 6):
        await client.retry_run(handle.id)
        # canceled before it starts: the cancel must not overwrite the record of the last attempt
        assert await client.cancel_run(handle.id)
        assert await _attempt_records(client, handle.id) == records[-1]
        await client.retry_run(handle.id)
        worker = await make_worker()
        await wait_until(lambda m=expected_max: _attempts_are(
            client, handle.id, [(a, "failed") for a in range(1, m + 1)]), what=f"{expected_max} attempts")
        state = await _state(client, handle.id)
        assert (state["attempt"], state["max_attempts"]) == (expected_max, expected_max)
        now = await _attempt_records(client, handle.id)
        for field, record in records[-1].items():
            assert now[field] == record, f"attempt record {field} was overwritten"
        records.append(now)
        await worker.stop()
    assert ran[handle.id] == 6
    traces = await client.get_run_attempts(handle.id)
    assert [t["attempt"] for t in traces] == [1, 2, 3, 4, 5, 6]
    assert [t["error"]["message"] for t in traces] == [f"boom {n}" for n in range(1, 7)]
    assert all(t["started_at"] <= t["finished_at"] for t in traces)
    assert [t["started_at"] for t in traces] == sorted(t["started_at"] for t in traces)


@pytest.mark.xfail(strict=True, reason="minor: the default backoff after an operator retry grows from the run's "
                   "total attempt number (retries.py default_backoff_ms(run.attempt)), not from the fresh budget")
async def test_the_default_backoff_restarts_with_the_fresh_budget(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        raise RuntimeError("transient")

    wf = define_workflow("adv-backoff", handler=handler, registry=registry, max_attempts=2)  # default backoff
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    first = await _delay_after_failure(client, handle.id, 1)
    await _until(client, handle.id, "failed")
    await client.retry_run(handle.id)
    again = await _delay_after_failure(client, handle.id, 3)
    assert first < 400, first  # 250 ms + jitter after attempt 1
    assert again < 400, f"after an operator retry the first automatic retry waits {again} ms"


async def _delay_after_failure(client: RedflowClient, run_id: str, attempt: int) -> int:
    """How long the worker's own retry of ``attempt`` waits (its due time minus the attempt's end)."""
    state = await wait_until(lambda: _scheduled_after(client, run_id, attempt), what=f"attempt {attempt} fails")
    record = (await _attempt_records(client, run_id))[f"{run_id}:{attempt}"]
    return int(state["available_at"]) - int(record["t1"])


async def _scheduled_after(client: RedflowClient, run_id: str, attempt: int) -> Any:
    state = await _state(client, run_id)
    return state if state["status"] == "scheduled" and state["attempt"] == attempt else None


# --- replay_run -----------------------------------------------------------------------------------------------


async def test_replay_after_child_event_sleep_and_input_steps_reuses_them_all(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    bodies: Counter[str] = Counter()

    async def kid(ctx: WorkflowHandlerContext) -> Any:
        bodies["kid"] += 1
        return {"kid": ctx.input}

    kid_wf = define_workflow("adv-replay-kid", handler=kid, registry=registry)

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def ask() -> Any:
            bodies["ask"] += 1
            if ctx.resume is None:
                raise wait_for_input("ok?")
            return ctx.resume.form

        async def tail(n: Any) -> Any:
            bodies["tail"] += 1
            return {"tail": n, "run": ctx.run.id}

        child = await ctx.step.run_workflow("child", kid_wf, ctx.input["n"])
        event = await ctx.step.wait_for_event("paid", "adv.replay.paid", "k1", "1h")
        await ctx.step.wait_for("nap", 20)
        form = await ctx.step.run("ask", ask)
        end = await ctx.step.run("tail", tail, ctx.input["n"])
        return {"child": child, "event": event and event["data"], "form": form, "tail": end}

    wf = define_workflow("adv-replay-waits", handler=handler, registry=registry)
    await make_worker(concurrency=4)
    original = await client.enqueue_definition(wf, {"n": 1})
    await wait_until(lambda: _reason(client, original.id, "waiting_event"), what="the event wait")
    await client.emit_event("adv.replay.paid", {"amount": 5}, correlation_key="k1")
    await wait_until(lambda: _reason(client, original.id, "waiting_input"), what="the input wait")
    assert await client.resume_run(original.id, form={"yes": True}) is not None
    first = await original.result(timeout_ms=10_000)
    assert first["child"] == {"kid": 1} and first["event"] == {"amount": 5} and first["form"] == {"yes": True}
    runs_before = {r["id"] for r in await client.list_runs()}
    assert bodies == {"kid": 1, "ask": 2, "tail": 1}

    replay = await client.replay_run(original.id, from_step="tail", input={"n": 2})
    out = await replay.result(timeout_ms=10_000)
    assert out == {"child": {"kid": 1}, "event": {"amount": 5}, "form": {"yes": True},
                   "tail": {"tail": 2, "run": replay.id}}
    assert bodies == {"kid": 1, "ask": 2, "tail": 2}  # only the tail ran again; no child, no wait
    assert {r["id"] for r in await client.list_runs()} == runs_before | {replay.id}  # no new child run
    steps = {s["name"]: s for s in await client.get_run_steps(replay.id)}
    assert [steps[n]["attempt"] for n in ("child", "paid", "nap", "ask")] == [0, 0, 0, 0]
    assert steps["tail"]["attempt"] == 1
    assert await _waiters(client) == []
    # the replay of the replay, from the event step: the child is reused, the event is waited for anew
    again = await client.replay_run(replay.id, from_step="paid")
    await wait_until(lambda: _reason(client, again.id, "waiting_event"), what="the replay of the replay waits")
    assert len(await _waiters(client)) == 1
    assert (await _state(client, again.id))["replayed_from"] == replay.id
    await client.emit_event("adv.replay.paid", {"amount": 7}, correlation_key="k1")
    await wait_until(lambda: _reason(client, again.id, "waiting_input"), what="it asks for input again")
    await client.resume_run(again.id, form={"yes": False})
    out = await again.result(timeout_ms=10_000)
    assert out["child"] == {"kid": 1} and out["event"] == {"amount": 7} and out["form"] == {"yes": False}
    assert out["tail"] == {"tail": 2, "run": again.id}
    assert bodies["kid"] == 1
    # the originals are untouched by their replays
    assert (await _state(client, original.id))["status"] == "succeeded"
    assert await client.wait_for_result(original.id, timeout_ms=1000) == first


async def test_a_replay_is_not_resumed_by_the_original_child_and_does_not_resolve_the_original_wait(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    kids: list[str] = []

    async def kid(ctx: WorkflowHandlerContext) -> Any:
        kids.append(ctx.run.id)
        await gate.wait()
        return ctx.input

    kid_wf = define_workflow("adv-replay-slow-kid", handler=kid, registry=registry, max_attempts=1)

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.run("prep", lambda: "prep")
        return await ctx.step.run_workflow("child", kid_wf, ctx.run.id, timeout_ms=300)

    wf = define_workflow("adv-replay-timeout", handler=handler, registry=registry, max_attempts=1)
    await make_worker(concurrency=6)
    original = await client.enqueue_definition(wf, None)
    with pytest.raises(RunFailedError, match="did not finish in time"):
        await original.result(timeout_ms=10_000)
    old_kid = kids[0]
    await _until(client, old_kid, "canceled")  # the parent stopped waiting and canceled it

    replay = await client.replay_run(original.id, from_step="child")
    await wait_until(lambda: len(kids) == 2, what="the replay starts its own child")
    new_kid = kids[1]
    waiting = await wait_until(lambda: _reason(client, replay.id, "waiting_child"), what="the replay waits")
    assert waiting["details"]["child_run_id"] == new_kid
    # The original's child was canceled with its parent's wait: it cannot run again beside the replay's.
    with pytest.raises(InvalidRunStateError, match="was canceled with its parent run"):
        await client.retry_run(old_kid)
    gate.set()
    assert await replay.result(timeout_ms=10_000) == replay.id  # resumed by its own child only
    assert len(kids) == 2
    assert (await _state(client, original.id))["status"] == "failed"  # never resumed either
    assert await _waiters(client) == []


async def test_replay_refuses_bad_from_step_and_queue_and_writes_nothing(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run("only", lambda: 1)

    wf = define_workflow("adv-replay-bad", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await handle.result(timeout_ms=10_000)
    before = await _key_snapshot(client)
    for bad in (5, "", "ONLY", None.__class__):
        with pytest.raises(ConfigurationError):
            await client.replay_run(handle.id, from_step=bad)  # type: ignore[arg-type]
    for queue in ("", "   ", 7):
        with pytest.raises(ConfigurationError, match="queue names must be non-empty strings"):
            await client.replay_run(handle.id, queue=queue)  # type: ignore[arg-type]
    with pytest.raises(RunNotFoundError):
        await client.replay_run(handle.id + "x")
    for bad_input in (float("nan"), {"n": float("inf")}, object()):
        with pytest.raises(PayloadEncodingError, match="input of workflow 'adv-replay-bad'"):
            await client.replay_run(handle.id, input=bad_input)
    assert await _key_snapshot(client) == before


async def test_replay_refuses_a_queue_name_that_no_script_can_name(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        return 1

    wf = define_workflow("adv-replay-newline", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await handle.result(timeout_ms=10_000)
    before = await _key_snapshot(client)
    try:
        replay = await client.replay_run(handle.id, queue="a\nb")
    except ConfigurationError:
        assert await _key_snapshot(client) == before
        return
    # it was created: show what that costs — the run cannot be canceled
    await client.cancel_run(replay.id)


async def test_replay_while_retention_deletes_the_original_creates_nothing(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        await ctx.step.run("a", lambda: 1)
        await ctx.step.run("b", lambda: 2)
        raise NonRetriableError("x")

    wf = define_workflow("adv-replay-retention", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await _until(client, handle.id, "failed")
    real = client.store.replay

    async def deleted_meanwhile(*args: Any) -> Any:
        assert await client.cleanup_expired_runs_now(reference_time_ms=FAR_FUTURE_MS) == 1
        return await real(*args)

    monkeypatch.setattr(client.store, "replay", deleted_meanwhile)
    with pytest.raises(RunNotFoundError, match="removed by retention while replaying"):
        await client.replay_run(handle.id, from_step="b")
    assert await total(client, lambda k: ("HLEN", k.runs)) == 0
    assert await total(client, lambda k: ("HLEN", k.steps)) == 0  # no copied history left behind
    assert await total(client, lambda k: ("ZCARD", k.index)) == 0
    assert await total(client, lambda k: ("LLEN", k.ready("default"))) == 0


# --- what else a retry touches: streams, queue order ----------------------------------------------------------


async def test_read_stream_of_a_retried_run_sees_the_retried_attempt(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    mode = {"fail": True}

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        assert ctx.stream is not None
        await ctx.stream.write({"attempt": ctx.run.attempt})
        if mode["fail"]:
            raise NonRetriableError("first attempt fails")
        return "ok"

    wf = define_workflow("adv-stream", handler=handler, registry=registry, stream=True)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await _until(client, handle.id, "failed")
    mode["fail"] = False
    await client.retry_run(handle.id)
    assert await handle.result(timeout_ms=10_000) == "ok"
    assert [r["attempt"] for r in await client.get_run_stream(handle.id)] == [1, 2]
    reader = await client.read_stream(handle.id, block_ms=200)
    assert reader is not None
    seen = [chunk.record["value"]["attempt"] async for chunk in reader]
    assert seen == [1, 2]


async def test_a_run_canceled_while_queued_keeps_its_place_when_retried(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    """As docs/run-actions.md says: its ready-list entry was never removed (removing it would scan the
    list), so it is claimed from there, once, and explain_run counts from that place."""
    order: list[Any] = []

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        order.append(ctx.input)

    wf = define_workflow("adv-order", handler=handler, registry=registry)
    await client.store.ensure_ready()
    pin_spread(client, -1)  # one ready list's order: all three in one partition (siblings claim apart)
    first = await client.enqueue_definition(wf, "first")
    others = [await client.enqueue_definition(wf, n) for n in ("second", "third")]
    assert await client.cancel_run(first.id)
    await client.retry_run(first.id)
    explained = await client.explain_run(first.id)
    await make_worker(concurrency=1, claim_batch_size=1)
    for h in [first, *others]:
        await client.wait_for_result(h.id, timeout_ms=10_000)
    assert order == ["first", "second", "third"], order  # each ran once
    assert explained["details"]["ahead"] == 0


# --- bad input ------------------------------------------------------------------------------------------------


async def test_bad_run_ids_and_bulk_queries_write_nothing(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    ran: Counter[str] = Counter()
    wf = _always_failing(registry, "adv-bad-input", ran)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await _until(client, handle.id, "failed")
    before = await _key_snapshot(client)
    for action in (client.retry_run, client.explain_run, client.replay_run):
        for bad in ("", "nope-p0", handle.id + " ", 123, 1.5, "a\nb", None, ["x"]):
            with pytest.raises((RunNotFoundError, ConfigurationError)):
                await action(bad)  # type: ignore[operator]
    for query in ([], "failed", {"status": "succeeded"}, {"status": 5}, {"workflow": ""}, {"queue": 3},
                  {"created_before_ms": -1}, {"created_after_ms": True}, {"wf": "x"}):
        with pytest.raises(ConfigurationError):
            await client.retry_runs(query, job_id="bad-job")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            await client.cancel_runs(query, job_id="bad-job")  # type: ignore[arg-type]
    assert await _key_snapshot(client) == before
    job = await client.retry_runs({"workflow": "adv-bad-input"}, job_id="kept-job")
    with pytest.raises(ConfigurationError, match="bulk job 'kept-job' is a retry"):
        await client.cancel_runs({"workflow": "adv-bad-input"}, job_id="kept-job")
    with pytest.raises(ConfigurationError, match="bulk job 'kept-job' is a retry"):
        await client.retry_runs({"workflow": "adv-bad-input", "status": "failed"}, job_id="kept-job")
    assert job["done"] == 1
    await _until(client, handle.id, "failed")
    assert await _attempts(client, handle.id) == [(1, "failed"), (2, "failed")]


async def test_a_non_string_run_id_is_refused_with_an_error_that_says_so(client: RedflowClient) -> None:
    for bad in (None, 123, ["x"], b"x-p0"):
        with pytest.raises((TypeError, ConfigurationError), match="run id"):
            await client.retry_run(bad)  # type: ignore[arg-type]


# --- explain_run on every state -------------------------------------------------------------------------------

DOCUMENTED_REASONS = {
    "queued", "queued_behind", "no_worker_for_queue", "admitting", "held_capacity", "held_mutex", "throttled",
    "sleeping", "waiting_event", "waiting_child", "waiting_input", "retry_delay", "deferred_no_worker", "run_at",
    "running", "cancel_requested", "worker_lost", "hook_pending", "ended",
}


async def _explain_everything(client: RedflowClient) -> dict[str, str]:
    ids = [r["id"] for r in await client.list_runs(ListRunsParams(limit=500))]
    out = {}
    for run_id in ids:
        explained = await client.explain_run(run_id)
        assert explained["reason"] in DOCUMENTED_REASONS, explained
        assert explained["message"] and "attempt" in explained["details"] and "max_attempts" in explained["details"]
        out[run_id] = explained["reason"]
    return out


async def _fake_worker_claims(client: RedflowClient, registry: WorkflowRegistry, lease_ms: int) -> tuple[Any, Any]:
    """A worker process that claims two runs and then dies: one started, one claimed for admission."""

    async def handler(ctx: WorkflowHandlerContext) -> None:
        return None

    plain = define_workflow("adv-explain-plain", handler=handler, registry=registry, queue="fq")
    guarded = define_workflow("adv-explain-guarded", handler=handler, registry=registry, queue="fq",
                              mutex=lambda i: "m")
    await client.sync_registry(registry)
    started = await client.enqueue_definition(plain, None)
    admitting = await client.enqueue_definition(guarded, None)
    assert (await client.explain_run(started.id))["reason"] == "no_worker_for_queue"
    claimed = []
    for store in {client.store.of(started.id), client.store.of(admitting.id)}:  # a worker claims in each partition
        await store.heartbeat("fake-worker", lease_ms, lease_ms, False)
        code, _, runs = await store.claim("fake-worker", ["fq"], 10, 10)
        assert code.name == "OK"
        claimed += runs
    assert sorted(c.kind for c in claimed) == ["admit", "run"]
    return started, admitting


async def test_explain_run_of_runs_claimed_by_a_worker_that_died(client: RedflowClient,
                                                                 registry: WorkflowRegistry) -> None:
    started, admitting = await _fake_worker_claims(client, registry, lease_ms=400)
    assert (await client.explain_run(started.id))["reason"] == "running"
    explained = await client.explain_run(admitting.id)
    assert explained["reason"] == "admitting" and explained["details"]["worker_id"] == "fake-worker"
    lost = await wait_until(lambda: _reason(client, started.id, "worker_lost"), what="the lease lapses")
    assert lost["details"]["worker_id"] == "fake-worker"
    assert lost["details"]["worker_lease_until_ms"] is not None
    reasons = await _explain_everything(client)
    assert reasons[started.id] == "worker_lost"


async def test_explain_run_of_an_admission_claimed_run_of_a_dead_worker_says_it_is_lost(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    started, admitting = await _fake_worker_claims(client, registry, lease_ms=300)
    await wait_until(lambda: _reason(client, started.id, "worker_lost"), what="the lease lapses")
    assert (await client.explain_run(admitting.id))["reason"] == "worker_lost"


async def test_explain_run_never_raises_on_any_state(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    stuck = asyncio.Event()

    async def blocked(ctx: WorkflowHandlerContext) -> Any:
        await gate.wait()
        return "done"

    async def uncancelable(ctx: WorkflowHandlerContext) -> Any:
        try:
            await gate.wait()
        except asyncio.CancelledError:
            await stuck.wait()  # a handler slow to stop: its run stays cancel-requested meanwhile
            raise

    async def napper(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.wait_for("nap", "1h")

    async def listener(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.wait_for_event("hear", "adv.explain", "k", "1h")

    async def asker(ctx: WorkflowHandlerContext) -> Any:
        async def ask() -> Any:
            if ctx.resume is None:
                raise wait_for_input("why?")
            return ctx.resume.form

        return await ctx.step.run("ask", ask)

    async def failing(ctx: WorkflowHandlerContext) -> Any:
        raise RuntimeError("upstream 503")

    async def hook(ctx: Any) -> None:
        await gate.wait()

    cap = define_workflow("adv-ex-cap", handler=blocked, registry=registry, max_concurrency=1)
    mutexed = define_workflow("adv-ex-mutex", handler=blocked, registry=registry, mutex=lambda i: "one")
    throttled = define_workflow("adv-ex-throttle", handler=blocked, registry=registry,
                                throttle=WorkflowRateLimitOptions(key=lambda i: "t", limit=1, period="1h"))
    stubborn_wf = define_workflow("adv-ex-stubborn", handler=uncancelable, registry=registry)
    nap = define_workflow("adv-ex-nap", handler=napper, registry=registry)
    listen = define_workflow("adv-ex-listen", handler=listener, registry=registry)
    ask = define_workflow("adv-ex-ask", handler=asker, registry=registry)
    parent_wf = define_workflow("adv-ex-parent", handler=lambda ctx: ctx.step.run_workflow("kid", cap, None),
                                registry=registry)
    retrying = define_workflow("adv-ex-retry", handler=failing, registry=registry,
                               retries=WorkflowRetryPolicy(delay="1h"))
    hooked = define_workflow("adv-ex-hook", handler=failing, registry=registry, on_failure=hook, max_attempts=1)
    nodef = define_workflow("adv-ex-nodef", handler=blocked, registry=WorkflowRegistry(), queue="nodef")
    later = define_workflow("adv-ex-later", handler=blocked, registry=registry)
    async def one(ctx: WorkflowHandlerContext) -> int:
        return 1

    done = define_workflow("adv-ex-done", handler=one, registry=registry)
    await client.sync_registry(registry)

    expected: dict[str, set[str]] = {}
    await make_worker(concurrency=30)
    await make_worker(concurrency=2, queues=["nodef"], registry=WorkflowRegistry())

    async def expect(handle: Any, *reasons: str) -> None:
        await wait_until(lambda: _reason_in(client, handle.id, reasons), what=f"{handle.id} is {reasons}")
        expected[handle.id] = set(reasons)

    c1 = await client.enqueue_definition(cap, 1)
    await expect(c1, "running")
    c2 = await client.enqueue_definition(cap, 2)
    await expect(c2, "held_capacity")
    m1 = await client.enqueue_definition(mutexed, 1)
    await expect(m1, "running")
    m2 = await client.enqueue_definition(mutexed, 2)
    await expect(m2, "held_mutex")
    t1 = await client.enqueue_definition(throttled, 1)
    await expect(t1, "running")
    t2 = await client.enqueue_definition(throttled, 2)
    await expect(t2, "throttled")
    t3 = await client.enqueue_definition(throttled, 3)
    await expect(t3, "throttled")
    s1 = await client.enqueue_definition(stubborn_wf, None)
    await wait_until(lambda: _reason_in(client, s1.id, ("running",)), what="the stubborn run runs")
    await client.cancel_run(s1.id)
    await expect(s1, "cancel_requested")
    await expect(await client.enqueue_definition(nap, None), "sleeping")
    await expect(await client.enqueue_definition(listen, None), "waiting_event")
    await expect(await client.enqueue_definition(ask, None), "waiting_input")
    await expect(await client.enqueue_definition(parent_wf, None), "waiting_child")
    await expect(await client.enqueue_definition(retrying, None), "retry_delay")
    await expect(await client.enqueue_definition(hooked, None), "hook_pending")
    await expect(await client.enqueue_definition(nodef, None), "deferred_no_worker")
    await expect(await client.enqueue_definition(later, None, run_at=datetime.now(UTC) + timedelta(hours=1)),
                 "run_at")
    finished = await client.enqueue_definition(done, None)
    await finished.result(timeout_ms=10_000)
    await expect(finished, "ended")
    # a retried run waiting for the mutex, one retried and canceled again
    failed_mutex = await client.enqueue_definition(mutexed, 3)
    await client.cancel_run(failed_mutex.id)
    await client.retry_run(failed_mutex.id)
    await expect(failed_mutex, "held_mutex")

    reasons = await _explain_everything(client)
    for run_id, allowed in expected.items():
        assert reasons[run_id] in allowed, (run_id, reasons[run_id], allowed)
    assert {"held_capacity", "held_mutex", "throttled", "cancel_requested", "sleeping", "waiting_event",
            "waiting_input", "waiting_child", "retry_delay", "hook_pending", "deferred_no_worker", "run_at",
            "ended", "running"} <= set(reasons.values())
    stuck.set()
    gate.set()
    await _until(client, s1.id, "canceled")
    await _until(client, m2.id, "succeeded")
    await _explain_everything(client)


async def _reason_in(client: RedflowClient, run_id: str, reasons: tuple[str, ...]) -> bool:
    return (await client.explain_run(run_id))["reason"] in reasons


# --- bulk actions ---------------------------------------------------------------------------------------------


async def test_bulk_cancel_of_running_and_queued_runs(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    canceled: list[str] = []

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        try:
            await gate.wait()
        except asyncio.CancelledError:
            canceled.append(ctx.run.id)
            raise

    wf = define_workflow("adv-bulk-cancel-running", handler=handler, registry=registry)
    await make_worker(concurrency=8, claim_batch_size=1)  # every free slot is filled at once
    runs = [await client.enqueue_definition(wf, n) for n in range(12)]
    await wait_until(lambda: _count_status(client, "running", 8), what="8 runs running, 4 queued")
    dry = await client.cancel_runs({"workflow": "adv-bulk-cancel-running"}, dry_run=True)
    assert dry["matched"] == 12 and dry["done"] == 0
    result = await client.cancel_runs({"workflow": "adv-bulk-cancel-running"}, reason="incident 7")
    assert (result["matched"], result["done"], result["skipped"]) == (12, 12, 0)
    for h in runs:
        state = await _until(client, h.id, "canceled")
        assert state["cancel_reason"] == "incident 7"
    assert len(canceled) == 8  # the running handlers were stopped, the queued ones never started
    again = await client.cancel_runs({"workflow": "adv-bulk-cancel-running"})
    assert again["matched"] == 0
    assert await _admission_leftovers(client) == (0, 0, 0)


async def test_bulk_retry_by_queue_touches_only_that_queue_and_skips_what_it_may_not_retry(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    ran: Counter[str] = Counter()
    hook_gate = asyncio.Event()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        ran[ctx.run.id] += 1
        raise NonRetriableError("no")

    async def hook(ctx: Any) -> None:
        if ctx.input == "hooked":
            await hook_gate.wait()

    wf = define_workflow("adv-bulk-queues", handler=handler, registry=registry, on_failure=hook)
    await make_worker(queues=["qa", "qb"], concurrency=10)
    in_a = [await client.enqueue_definition(wf, n, queue_override="qa") for n in range(5)]
    in_b = [await client.enqueue_definition(wf, n, queue_override="qb") for n in range(3)]
    held = await client.enqueue_definition(wf, "hooked", queue_override="qa")
    for h in [*in_a, *in_b]:
        await wait_until(lambda h=h: _reason(client, h.id, "ended"), what="failed and hooked")
    await wait_until(lambda: _reason(client, held.id, "hook_pending"), what="a hook that is still running")
    result = await client.retry_runs({"queue": "qa", "status": "failed"})
    assert (result["matched"], result["done"], result["skipped"]) == (6, 5, 1)  # the pending hook is skipped
    for h in in_a:
        await wait_until(lambda h=h: _attempts_are(client, h.id, [(1, "failed"), (2, "failed")]), what="retried")
    assert all(ran[h.id] == 1 for h in in_b)
    assert all([await _attempts(client, h.id) == [(1, "failed")] for h in in_b])
    hook_gate.set()
    await wait_until(lambda: _reason(client, held.id, "ended"), what="the last hook")
    assert ran[held.id] == 1


async def _count_status(client: RedflowClient, status: str, n: int) -> bool:
    return (await client.get_stats())["by_status"][status] == n


@pytest.mark.timeout(240)
async def test_bulk_cancel_and_retry_of_ten_thousand_runs_stay_bounded_per_batch(
    client: RedflowClient, registry: WorkflowRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redflow.client import actions as actions_module

    async def handler(ctx: WorkflowHandlerContext) -> None:
        return None

    n = 10_000
    wf = define_workflow("adv-bulk-10k", handler=handler, registry=registry, max_attempts=2)
    later = datetime.now(UTC) + timedelta(hours=1)
    handles = await client.enqueue_many(wf, list(range(n)), run_at=later)
    assert len(handles) == n
    counters = client.redis.counters
    per_batch: list[int] = []
    job_sizes: list[int] = []
    real_write = client.store.write_bulk_job
    mark = {"at": counters.commands}

    async def measured_write(job_id: str, record: bytes) -> None:
        per_batch.append(counters.commands - mark["at"])
        job_sizes.append(len(record))
        await real_write(job_id, record)
        mark["at"] = counters.commands

    monkeypatch.setattr(client.store, "write_bulk_job", measured_write)
    batch = actions_module.BULK_BATCH

    mark["at"] = counters.commands
    canceled = await client.cancel_runs({"workflow": "adv-bulk-10k"})
    assert (canceled["matched"], canceled["done"], canceled["skipped"]) == (n, n, 0)
    assert await _count_status(client, "canceled", n)
    # One batch: a page of the index (one range read per partition, a second one each after a status
    # whose pages ran out), one HMGET of headers per partition at most, then per run its header, the
    # cancel script, its children and the end of its (empty) cascade, and with several partitions
    # the check for its end's hand-off to a parent in another partition (one ZMSCORE).
    parts = count(client)
    per_partition = 3 * parts
    per_run = 4 if parts == 1 else 5
    assert len(per_batch) >= n // batch and max(per_batch) <= per_run * batch + per_partition + 10, per_batch
    assert max(job_sizes) < 1000

    per_batch.clear()
    job_sizes.clear()
    mark["at"] = counters.commands
    retried = await client.retry_runs({"workflow": "adv-bulk-10k", "status": "canceled"})
    assert (retried["matched"], retried["done"], retried["skipped"]) == (n, n, 0)
    assert await _count_status(client, "queued", n)
    assert max(per_batch) <= 2 * batch + per_partition + 10, per_batch  # per run: its header, the requeue
    assert max(job_sizes) < 1000
    assert await total(client, lambda k: ("LLEN", k.ready("default"))) >= n  # over every partition
    sample = await client.get_run(handles[n // 2].id)
    assert sample is not None and sample["max_attempts"] == 2 and sample["attempt"] == 0


# --- more: bulk retry of a canceled family, canceled steps, input forms in replays ----------------------------


async def test_bulk_retry_of_a_canceled_family_does_not_run_the_old_child_again(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    started: list[str] = []
    parent_wf, _ = _parent_and_child(registry, "adv-family", gate, started)
    await make_worker(concurrency=4)
    parent = await client.enqueue_definition(parent_wf, None)
    await wait_until(lambda: _reason(client, parent.id, "waiting_child"), what="the parent waits for its child")
    canceled = await client.cancel_runs({})
    assert canceled["done"] >= 1
    await _until(client, started[0], "canceled")
    gate.set()
    retried = await client.retry_runs({"status": "canceled"})
    assert retried["matched"] == 2
    assert (await parent.result(timeout_ms=10_000))["attempt"] == 2
    await wait_until(lambda: _all_ended(client, started), what="every child ended")
    assert len(started) == 2, f"the child workflow ran {len(started)} times for one retried parent"


async def _all_ended(client: RedflowClient, ids: list[str]) -> bool:
    return all([await _is(client, i, *TERMINAL) for i in ids])


async def test_a_step_canceled_in_flight_runs_again_after_a_retry(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()
    bodies: Counter[str] = Counter()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def first() -> str:
            bodies["first"] += 1
            return "one"

        async def slow() -> str:
            bodies["slow"] += 1
            if bodies["slow"] == 1:
                await gate.wait()
            return "two"

        return [await ctx.step.run("first", first), await ctx.step.run("slow", slow)]

    wf = define_workflow("adv-canceled-step", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: bodies["slow"] == 1, what="the slow step runs")
    assert await client.cancel_run(handle.id)
    await _until(client, handle.id, "canceled")
    steps = {s["name"]: s["status"] for s in await client.get_run_steps(handle.id)}
    assert steps == {"first": "succeeded", "slow": "canceled"}
    await client.retry_run(handle.id)
    assert await handle.result(timeout_ms=10_000) == ["one", "two"]
    assert bodies == {"first": 1, "slow": 2}
    assert await _attempts(client, handle.id) == [(1, "canceled"), (2, "succeeded")]


async def test_a_replay_after_an_answered_input_keeps_the_form(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def approve() -> bool:
            if ctx.resume is None:
                raise wait_for_input("approve?")
            return bool(ctx.resume.form["ok"])

        async def ship() -> str:
            assert ctx.resume is not None, "no form in this step"
            return f"shipped, note: {ctx.resume.form['note']}"

        await ctx.step.run("approve", approve)
        return await ctx.step.run("ship", ship)

    wf = define_workflow("adv-replay-form", handler=handler, registry=registry, max_attempts=1)
    await make_worker()
    original = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _reason(client, original.id, "waiting_input"), what="the input wait")
    await client.resume_run(original.id, form={"ok": True, "note": "fragile"})
    assert await original.result(timeout_ms=10_000) == "shipped, note: fragile"
    replay = await client.replay_run(original.id, from_step="ship")
    assert await replay.result(timeout_ms=10_000) == "shipped, note: fragile"


async def test_retry_run_keeps_one_live_run_per_idempotency_key(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    sent: Counter[str] = Counter()
    healthy = {"ok": False}

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        if not healthy["ok"]:
            raise NonRetriableError("smtp down")
        sent[ctx.input["user"]] += 1
        return "sent"

    wf = define_workflow("adv-idem", handler=handler, registry=registry)
    await make_worker()
    first = await client.enqueue_definition(wf, {"user": "u1"}, idempotency_key="welcome:u1")
    await _until(client, first.id, "failed")
    healthy["ok"] = True
    second = await client.enqueue_definition(wf, {"user": "u1"}, idempotency_key="welcome:u1")
    assert second.id != first.id  # a failed run does not hold its key
    assert await second.result(timeout_ms=10_000) == "sent"
    try:
        await client.retry_run(first.id)
    except InvalidRunStateError:
        pass  # refused: the key belongs to a run that succeeded
    else:
        await client.wait_for_result(first.id, timeout_ms=10_000)
    assert sent["u1"] == 1, "the welcome mail went out twice for one idempotency key"
