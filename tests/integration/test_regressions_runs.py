"""Regressions of the run state machine: runs never stuck, resurrected or left unresumed.

Each test drives the real engine against a real server; each failed on the engine before the shared
transition helpers (lib/transitions.lua) and the executor's settle-before-drop rule.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import (
    CanceledError,
    RedflowClient,
    RedflowError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    WorkflowRetryPolicy,
    define_workflow,
)
from redflow.storage.codes import Code

from ..conftest import wait_until
from ..partitioned import keys_of, sibling_of, store_of


async def _status(client: RedflowClient, run_id: str) -> str | None:
    state = await client.get_run(run_id)
    return None if state is None else state["status"]


async def _reaches(client: RedflowClient, run_id: str, status: str, timeout_s: float = 10.0) -> None:
    async def check() -> bool:
        return await _status(client, run_id) == status

    await wait_until(check, timeout_s=timeout_s, what=f"run {run_id} {status}")


async def test_cancel_while_a_failure_becomes_a_retry_ends_the_run_canceled(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    deciding = asyncio.Event()
    release = asyncio.Event()

    async def should_retry(ctx: Any) -> bool:
        deciding.set()
        await release.wait()  # the cancel lands while the failure is being turned into a retry
        return True

    async def handler(ctx: WorkflowHandlerContext) -> None:
        raise RuntimeError("boom")

    wf = define_workflow("cancel-in-retry", handler=handler, max_attempts=5,
                         retries=WorkflowRetryPolicy(should_retry=should_retry, delay=0), registry=registry)
    worker = await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await asyncio.wait_for(deciding.wait(), 10)
    assert await client.cancel_run(handle.id) is True
    # The request reaches the worker while the policy is still deciding.
    runner = sibling_of(worker, handle.id)  # the sibling of the run's partition runs it
    await wait_until(lambda: runner.active[handle.id].cancel_requested, what="cancel request delivered")
    release.set()
    await _reaches(client, handle.id, "canceled")
    with pytest.raises(CanceledError):
        await handle.result(timeout_ms=5000)


async def test_internal_executor_error_hands_the_run_back(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redflow.worker import executor

    real = executor.StepApi
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("internal bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(executor, "StepApi", flaky)

    async def handler(ctx: WorkflowHandlerContext) -> str:
        return "ok"

    wf = define_workflow("internal-error", handler=handler, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=15_000) == "ok"
    assert calls["n"] >= 2


async def test_cancel_reaches_an_admitted_first_attempt(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    started = asyncio.Event()
    steps_after_cancel: list[int] = []
    canceled = asyncio.Event()

    async def handler(ctx: WorkflowHandlerContext) -> None:
        started.set()
        for i in range(200):
            if canceled.is_set():
                steps_after_cancel.append(i)
            await ctx.step.run(f"s{i}", asyncio.sleep, 0.02)

    wf = define_workflow("mutexed", handler=handler, mutex=lambda i: "one", registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await asyncio.wait_for(started.wait(), 10)
    assert await client.cancel_run(handle.id) is True
    canceled.set()
    await _reaches(client, handle.id, "canceled", timeout_s=5)
    assert len(steps_after_cancel) <= 1


async def test_cancel_during_admission_does_not_resurrect_the_run(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    async def handler(ctx: WorkflowHandlerContext) -> None:
        return None

    wf = define_workflow("admitted", handler=handler, mutex=lambda i: "k", registry=registry)
    store = client.store
    handle = await client.enqueue_definition(wf, None)
    await store.heartbeat("w", 60_000, 60_000, False)
    # Admission is registered by a worker's start; do what it does for this workflow.
    await client.redis.execute("HSET", client.keys.admission, "admitted", "{}")
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    assert [r.kind for r in runs] == ["admit"]
    assert await client.cancel_run(handle.id) is True
    code, _ = await store.admit(handle.id, runs[0].token, "w", "default", "admitted", None, None, False, 60_000, "k")
    assert code is Code.CANCELED
    assert await _status(client, handle.id) == "canceled"
    assert await client.redis.execute("HGET", client.keys.leases, handle.id) is None


async def test_reaper_ends_a_cancel_requested_run_canceled_without_on_failure(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("reaped-cancel", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)  # claims and reaps are the run's partition's
    await store.heartbeat("w", 60_000, 60_000, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    assert [r.id for r in runs] == [handle.id]
    assert await client.cancel_run(handle.id) is True  # requested: w holds it
    await client.redis.execute("ZADD", store.keys.workers, 0, "w")  # w dies
    leader = (await store.heartbeat("boss", 60_000, 60_000, True)).leader
    code, _, crashed, _ = await store.reap(leader, "w", 1, 60_000, 10)  # 1 lapse would fail it as crashed
    assert code is Code.OK and crashed == 0
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "canceled"
    _, _, again = await store.claim("boss", ["default"], 10, 10)
    assert again == []  # no on_failure hook is handed out for a canceled run


async def _noop(ctx: WorkflowHandlerContext) -> None:
    return None


async def test_three_lapses_across_separate_resumes_do_not_crash_a_healthy_run(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("long-lived", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)
    leader = (await store.heartbeat("boss", 60_000, 60_000, True)).leader
    for n in range(4):
        wid = f"w{n}"
        await store.heartbeat(wid, 60_000, 60_000, False)
        _, _, runs = await store.claim(wid, ["default"], 1, 10)
        assert [r.id for r in runs] == [handle.id]
        await client.redis.execute("ZADD", store.keys.workers, 0, wid)  # the worker dies ...
        code, _, crashed, _ = await store.reap(leader, wid, 3, 60_000, 10)
        assert code is Code.OK and crashed == 0
        # ... and the next one makes progress: the run suspends for a moment and is resumed.
        await store.heartbeat(f"{wid}b", 60_000, 60_000, False)
        _, _, runs = await store.claim(f"{wid}b", ["default"], 1, 10)
        code, _, _ = await store.suspend(handle.id, runs[0].token, f"{wid}b", "default", f"nap{n}", n + 1, "sleep",
                                         delay_ms=0)
        assert code is Code.OK
    assert await _status(client, handle.id) in ("scheduled", "queued")


async def test_parent_resumes_when_its_child_is_rate_limited(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    from redflow import WorkflowRateLimitOptions

    child = define_workflow("limited-child", handler=_noop, registry=registry,
                            rate_limit=WorkflowRateLimitOptions(key=lambda i: "all", limit=1, period="1h"))

    async def parent(ctx: WorkflowHandlerContext) -> str:
        try:
            await ctx.step.run_workflow("child", child, ctx.input)
        except RedflowError as exc:
            return f"child failed: {type(exc).__name__}"
        return "child ran"

    p = define_workflow("limited-parent", handler=parent, registry=registry)
    await make_worker()
    first = await client.enqueue_definition(p, 1)
    assert await first.result(timeout_ms=10_000) == "child ran"
    second = await client.enqueue_definition(p, 2)  # its child is over the rate limit
    assert (await second.result(timeout_ms=10_000)).startswith("child failed")


async def test_parent_resumes_when_its_child_is_debounced(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    from redflow import WorkflowDebounceOptions

    async def child_handler(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    child = define_workflow("debounced-child", handler=child_handler, registry=registry,
                            debounce=WorkflowDebounceOptions(key=lambda i: "k", period="100ms"))

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("child", child, ctx.input)

    p = define_workflow("debounce-parent", handler=parent, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(p, {"n": 1})
    assert await handle.result(timeout_ms=10_000) == {"n": 1}


async def test_two_parents_sharing_a_child_through_an_idempotency_key_both_resume(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()

    async def child_handler(ctx: WorkflowHandlerContext) -> str:
        await gate.wait()
        return "shared"

    child = define_workflow("shared-child", handler=child_handler, registry=registry)
    waiting: list[str] = []

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        waiting.append(ctx.run.id)
        return await ctx.step.run_workflow("child", child, None, idempotency_key="one-child")

    p = define_workflow("sharing-parent", handler=parent, registry=registry)
    await make_worker(concurrency=5)
    a = await client.enqueue_definition(p, 1)
    b = await client.enqueue_definition(p, 2)

    async def both_suspended() -> bool:
        return [await _status(client, a.id), await _status(client, b.id)] == ["scheduled", "scheduled"]

    await wait_until(both_suspended, what="both parents waiting")
    gate.set()
    assert await a.result(timeout_ms=10_000) == "shared"
    assert await b.result(timeout_ms=10_000) == "shared"


async def test_parent_resumes_when_the_reaper_fails_its_child_as_crashed(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    child = define_workflow("doomed-child", handler=_noop, queue="elsewhere", registry=registry)

    async def parent(ctx: WorkflowHandlerContext) -> str:
        try:
            await ctx.step.run_workflow("child", child, None)
        except RedflowError as exc:
            return f"child ended: {exc}"
        return "child ran"

    p = define_workflow("crash-parent", handler=parent, registry=registry)
    await make_worker(queues=["default"])
    handle = await client.enqueue_definition(p, None)
    store = store_of(client, handle.id)  # the child is created in its parent's partition
    leader = (await store.heartbeat("boss", 60_000, 60_000, True)).leader

    async def child_id() -> str | None:
        kids = await store.children_of(handle.id)
        return kids[0] if kids else None

    kid = await wait_until(child_id, what="child created")
    for n in range(3):  # the child's worker dies three times in a row
        wid = f"dying{n}"
        await store.heartbeat(wid, 60_000, 60_000, False)
        _, _, runs = await store.claim(wid, ["elsewhere"], 1, 10)
        assert [r.id for r in runs] == [kid]
        await client.redis.execute("ZADD", store.keys.workers, 0, wid)
        await store.reap(leader, wid, 3, 60_000, 10)
    assert await _status(client, kid) == "failed"
    assert (await handle.result(timeout_ms=10_000)).startswith("child ended")


@pytest.mark.parametrize("limit", ["max_concurrency", "mutex"])
async def test_held_run_on_another_queue_is_released(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, limit: str
) -> None:
    gate = asyncio.Event()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input == "first":
            await gate.wait()
        return ctx.input

    options: dict[str, Any] = {"max_concurrency": 1} if limit == "max_concurrency" else {"mutex": lambda i: "m"}
    wf = define_workflow(f"held-{limit}", handler=handler, registry=registry, **options)
    await make_worker(queues=["default", "other"], concurrency=5)
    first = await client.enqueue_definition(wf, "first")
    await wait_until(lambda: _status(client, first.id), what="first claimed")

    async def running() -> bool:
        return await _status(client, first.id) == "running"

    await wait_until(running, what="first running")
    second = await client.run_by_name(wf.name, "second", queue_override="other")

    async def held() -> bool:
        return bool(await client.redis.execute("ZCARD", client.keys.held))

    await wait_until(held, what="second held")
    gate.set()
    assert await first.result(timeout_ms=5000) == "first"
    assert await second.result(timeout_ms=5000) == "second"


async def test_throttled_runs_start_in_fifo_order_with_bounded_admission_calls(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redflow import WorkflowRateLimitOptions
    from redflow.storage.store import Store

    order: list[int] = []
    admits = {"n": 0}
    real_admit = Store.admit

    async def counting(self: Store, *args: Any, **kwargs: Any) -> Any:
        admits["n"] += 1
        return await real_admit(self, *args, **kwargs)

    monkeypatch.setattr(Store, "admit", counting)

    async def handler(ctx: WorkflowHandlerContext) -> int:
        order.append(ctx.input)
        return int(ctx.input)

    wf = define_workflow("fifo-throttle", handler=handler, registry=registry,
                         throttle=WorkflowRateLimitOptions(key=lambda i: "k", limit=4, period="300ms"))
    handles = [await client.enqueue_definition(wf, n) for n in range(24)]
    await make_worker(concurrency=30)
    assert await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles)) == list(range(24))
    assert order == list(range(24)), "throttled runs start in the order they were enqueued"
    # Each run is admitted once or twice (joining the queue, then reaching its head), plus one
    # call per window the head waits out: never a stampede of every waiting run per window.
    assert admits["n"] <= 2 * 24 + 10, admits["n"]


async def test_cancel_cascade_is_finished_by_the_engine_when_the_client_dies(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    gate = asyncio.Event()

    async def child_handler(ctx: WorkflowHandlerContext) -> None:
        await gate.wait()

    child = define_workflow("cascade-child", handler=child_handler, queue="kids", registry=registry)

    async def parent(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.run_workflow("a", child, 1)

    p = define_workflow("cascade-parent", handler=parent, registry=registry)
    handle = await client.enqueue_definition(p, None)
    worker = await make_worker(queues=["default"])

    async def child_id() -> str | None:
        kids = await client.store.children_of(handle.id)
        return kids[0] if kids else None

    kid = await wait_until(child_id, what="child created")
    await worker.stop(grace_period_ms=0)
    # A client cancels the parent and dies before it walks the descendants: only the script ran.
    code, _ = await client.store.cancel(handle.id, "", client.retention_ms)
    assert code is Code.OK and await _status(client, kid) == "queued"
    assert await client.cancel_run(handle.id) is False  # a second cancel has nothing left to cancel
    await make_worker(queues=["default"])  # a leader finishes the cascade
    await _reaches(client, kid, "canceled")

    async def cascade_done() -> bool:  # the leader marks it done after canceling the child
        return await client.redis.execute("ZCARD", keys_of(client, handle.id).cascade) == 0

    await wait_until(cascade_done, what="cascade marked done")


async def test_no_child_starts_for_a_parent_whose_cancel_was_requested(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    child = define_workflow("late-child", handler=_noop, registry=registry)
    p = define_workflow("late-parent", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(p, None)
    store = store_of(client, handle.id)
    await store.heartbeat("w", 60_000, 60_000, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    assert [r.id for r in runs] == [handle.id]
    assert await client.cancel_run(handle.id) is True  # requested: the parent is running on w
    with pytest.raises(CanceledError):
        await client.run_by_name(child.name, None, parent_run_id=handle.id)
    assert await store.children_of(handle.id) == []


async def _hook_settled(client: RedflowClient, run_id: str) -> bool:
    import msgspec

    k = keys_of(client, run_id)
    raw = await client.redis.execute("HGET", k.runs, run_id)  # wire names: s status, h hook pending
    lease = await client.redis.execute("HGET", k.leases, run_id)
    header = msgspec.msgpack.decode(raw) if raw else {}
    return header.get("s") == "failed" and "h" not in header and lease is None


async def test_on_failure_runs_once_when_recording_it_ran_fails_once(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redflow._redis.errors import ConnectionClosedError
    from redflow.storage.store import Store

    calls: list[str] = []
    real = Store.hook_done
    lost = {"n": 0}

    async def lossy(self: Store, *args: Any, **kwargs: Any) -> Any:
        if lost["n"] == 0:
            lost["n"] += 1
            raise ConnectionClosedError("connection cut")  # the request never reached the server
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "hook_done", lossy)

    async def handler(ctx: WorkflowHandlerContext) -> None:
        raise RuntimeError("fails for good")

    async def on_failure(ctx: Any) -> None:
        calls.append(ctx.run.id)

    wf = define_workflow("hooked", handler=handler, max_attempts=1, on_failure=on_failure, registry=registry)
    await make_worker(lease_ms=1500)
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: _hook_settled(client, handle.id), timeout_s=15, what="on_failure recorded")
    assert calls == [handle.id]


async def test_on_failure_claimed_by_a_worker_without_the_definition_is_deferred_not_skipped(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redflow.worker import executor

    monkeypatch.setattr(executor, "UNKNOWN_WORKFLOW_DEFER_MS", 100)
    calls: list[str] = []

    async def on_failure(ctx: Any) -> None:
        calls.append(ctx.run.id)

    wf = define_workflow("hook-elsewhere", handler=_noop, on_failure=on_failure, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)
    await store.heartbeat("w", 60_000, 60_000, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    code, status = await store.finish(handle.id, runs[0].token, "w", "failed", b'{"message":"x"}', True, 60_000,
                                      "default")
    assert (code, status) == (Code.OK, "failed")
    await client.redis.execute("ZADD", store.keys.workers, 0, "w")  # w dies before running on_failure
    leader = (await store.heartbeat("boss", 60_000, 60_000, True)).leader
    await store.reap(leader, "w", 3, 60_000, 10)
    # A worker of an older build, without this workflow, claims the hook first.
    stranger = await make_worker(registry=WorkflowRegistry())

    async def deferred() -> bool:
        return await client.redis.execute("ZSCORE", store.keys.scheduled("default"), handle.id) is not None

    await wait_until(deferred, what="hook deferred by the worker without the definition")
    await stranger.stop(grace_period_ms=0)
    await make_worker()
    await wait_until(lambda: calls, what="on_failure ran on a worker with the definition")
    await wait_until(lambda: _hook_settled(client, handle.id), what="on_failure recorded")
    assert calls == [handle.id]


async def test_a_delayed_event_of_a_parent_canceled_meanwhile_starts_no_child(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    from datetime import UTC, datetime, timedelta

    from redflow import EventTrigger

    parent = define_workflow("delayed-parent", handler=_noop, registry=registry)
    define_workflow("delayed-sub", handler=_noop, queue="subs", event=[EventTrigger(name="later")], registry=registry)
    await make_worker(queues=["idle"])  # registers the subscription and delivers due events as leader
    handle = await client.enqueue_definition(parent, None)
    store = store_of(client, handle.id)
    await store.heartbeat("w", 60_000, 60_000, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    assert [r.id for r in runs] == [handle.id]
    result = await client.emit_event_detailed("later", {"x": 1}, parent_run_id=handle.id,
                                              emit_at=datetime.now(UTC) + timedelta(milliseconds=300))
    assert await client.cancel_run(handle.id) is True

    async def delivered() -> Any:
        event = await client.get_event(result["event_id"])
        return event if event and event["fanout_status"] != "pending" else None

    event = await wait_until(delivered, what="the delayed event came due")
    assert event["fanout_status"] == "failed" and event["delivery_count"] == 0
    assert [d["status"] for d in event["deliveries"]] == ["failed"]
    assert await store.children_of(handle.id) == []


async def test_no_step_is_recorded_for_a_failed_run_whose_hook_is_pending(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    from redflow.storage.records import StepRecord, encode_step

    wf = define_workflow("late-step", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)
    await store.heartbeat("w", 60_000, 60_000, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    assert await store.finish(handle.id, runs[0].token, "w", "failed", b'{"message":"x"}', True, 60_000,
                              "default") == (Code.OK, "failed")
    line = encode_step(StepRecord(name="late", position=1, attempt=1))
    assert await store.record_step(handle.id, runs[0].token, line) is Code.WRONG_STATUS
    assert await store.read_steps(handle.id) == []


async def test_a_redis_error_under_a_step_hands_the_run_back_without_using_an_attempt(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redflow._redis.errors import CommandTimeoutError
    from redflow.storage.store import Store

    real = Store.record_step
    failures = {"n": 0}

    async def flaky(self: Store, *args: Any, **kwargs: Any) -> Any:
        if failures["n"] == 0:
            failures["n"] += 1
            raise CommandTimeoutError("no reply from the server")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "record_step", flaky)

    async def handler(ctx: WorkflowHandlerContext) -> int:
        await ctx.step.run("one", asyncio.sleep, 0)
        return ctx.run.attempt

    wf = define_workflow("infra-error", handler=handler, max_attempts=1, registry=registry)
    await make_worker(lease_ms=1500)
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=15_000) == 1  # not failed: max_attempts=1 was not spent
