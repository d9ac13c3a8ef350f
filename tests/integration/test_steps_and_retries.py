"""Durable steps, retries, retry policies and on_failure against a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import (
    NonRetriableError,
    OutputSerializationError,
    RedflowClient,
    RetryAfterError,
    RunFailedError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    WorkflowRetryPolicy,
    define_workflow,
)

from ..conftest import wait_until

FAST = WorkflowRetryPolicy(delay=10)


async def test_step_body_runs_once_while_attempt_runs_twice(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    body_calls: list[int] = []
    attempts: list[int] = []

    async def charge(amount: int) -> dict:
        body_calls.append(amount)
        return {"charged": amount, "tuple": (1, 2)}

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        attempts.append(ctx.run.attempt)
        receipt = await ctx.step.run("charge", charge, 10)
        assert receipt["tuple"] == [1, 2]  # JSON round trip on the first run too
        if ctx.run.attempt == 1:
            raise RuntimeError("transient")
        return receipt

    wf = define_workflow("step-once", handler=handler, retries=FAST, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == {"charged": 10, "tuple": [1, 2]}
    assert attempts == [1, 2]
    assert body_calls == [10]
    state = await client.get_run(handle.id)
    assert state is not None and state["attempt"] == 2


async def test_duplicate_step_name_rejected(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    async def one() -> int:
        return 1

    async def handler(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.run("same", one)
        await ctx.step.run("same", one)

    wf = define_workflow("dup-step", handler=handler, max_attempts=3, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(RunFailedError, match="duplicate step name 'same'") as info:
        await handle.result(timeout_ms=10_000)
    assert info.value.error["kind"] == "duplicate_step"
    state = await client.get_run(handle.id)
    assert state is not None and state["attempt"] == 1  # not retried: it would fail the same way


async def test_signal_injection_and_step_timeout(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    seen: dict[str, Any] = {}

    async def with_signal(x: int, *, signal: asyncio.Event) -> int:
        seen["signal"] = signal
        return x

    async def with_kwargs(x: int, **kwargs: Any) -> int:
        seen["kwargs"] = sorted(kwargs)
        return x

    async def plain(x: int) -> int:
        return x

    async def hangs(*, signal: asyncio.Event) -> None:
        seen["hang_signal"] = signal
        await asyncio.sleep(30)

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        a = await ctx.step.run("a", with_signal, 1)
        b = await ctx.step.run("b", with_kwargs, 2)
        c = await ctx.step.run("c", plain, 3)
        await ctx.step.run("hang", hangs, timeout_ms=100)
        return [a, b, c]

    wf = define_workflow("signals", handler=handler, max_attempts=1, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(RunFailedError, match="timed out after 100 ms") as info:
        await handle.result(timeout_ms=10_000)
    assert info.value.error["kind"] == "timeout"
    assert isinstance(seen["signal"], asyncio.Event)
    assert seen["kwargs"] == ["signal"]
    assert seen["hang_signal"].is_set()


async def test_non_json_output_fails_without_retry(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    attempts: list[int] = []

    async def bad_step() -> object:
        return object()

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        attempts.append(ctx.run.attempt)
        return await ctx.step.run("bad-step", bad_step)

    async def bad_output(ctx: WorkflowHandlerContext) -> Any:
        return {1, 2, 3j}

    wf = define_workflow("bad-step-output", handler=handler, max_attempts=3, registry=registry)
    wf2 = define_workflow("bad-workflow-output", handler=bad_output, max_attempts=3, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(RunFailedError) as info:
        await handle.result(timeout_ms=10_000)
    assert info.value.error["kind"] == "serialization"
    assert "step 'bad-step'" in info.value.error["message"] and handle.id in info.value.error["message"]
    assert attempts == [1]
    handle2 = await client.enqueue_definition(wf2, None)
    with pytest.raises(RunFailedError) as info2:
        await handle2.result(timeout_ms=10_000)
    assert info2.value.error["kind"] == "serialization"
    assert "bad-workflow-output" in info2.value.error["message"]
    assert OutputSerializationError.kind == "serialization"


async def test_max_attempts_counts_first_attempt_and_on_failure_once(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    attempts: list[int] = []
    failures: list[tuple[str, str, int]] = []

    async def handler(ctx: WorkflowHandlerContext) -> None:
        attempts.append(ctx.run.attempt)
        raise RuntimeError(f"attempt {ctx.run.attempt}")

    async def on_failure(ctx: Any) -> None:
        # The failure is durable before the hook runs.
        state = await client.get_run(ctx.run.id)
        failures.append((state["status"], str(ctx.error), ctx.run.attempt))

    wf = define_workflow(
        "exhaust", handler=handler, max_attempts=3, retries=FAST, on_failure=on_failure, registry=registry
    )
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    with pytest.raises(RunFailedError, match="attempt 3"):
        await handle.result(timeout_ms=10_000)
    await wait_until(lambda: failures, what="on_failure")
    await asyncio.sleep(0.2)
    assert attempts == [1, 2, 3]
    assert failures == [("failed", "attempt 3", 3)]


async def test_retry_policy_sync_and_async_callables(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    seen: list[tuple[int, int]] = []

    async def handler(ctx: WorkflowHandlerContext) -> int:
        if ctx.run.attempt < 3:
            raise RuntimeError("retry me")
        return ctx.run.attempt

    def delay(ctx: Any) -> str:
        seen.append((ctx.run.attempt, ctx.run.next_attempt))
        return "20ms"

    async def should_retry(ctx: Any) -> bool:
        return "retry me" in str(ctx.error)

    policy = WorkflowRetryPolicy(max_attempts=4, delay=delay, should_retry=should_retry)
    wf = define_workflow("policy", handler=handler, max_attempts=1, retries=policy, registry=registry)
    assert wf.max_attempts == 4  # retries.max_attempts wins
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == 3
    assert seen == [(1, 2), (2, 3)]

    async def never(ctx: Any) -> bool:
        return False

    calls: list[int] = []

    async def failing(ctx: WorkflowHandlerContext) -> None:
        calls.append(ctx.run.attempt)
        raise RuntimeError("no retry wanted")

    wf2 = define_workflow(
        "policy-no", handler=failing, retries=WorkflowRetryPolicy(max_attempts=5, should_retry=never),
        registry=registry,
    )
    with pytest.raises(RunFailedError):
        await (await client.enqueue_definition(wf2, None)).result(timeout_ms=10_000)
    assert calls == [1]


async def test_non_retriable_and_retry_after(client: RedflowClient, registry: WorkflowRegistry, make_worker) -> None:
    calls: list[int] = []

    async def handler(ctx: WorkflowHandlerContext) -> None:
        calls.append(ctx.run.attempt)
        raise NonRetriableError("stop now")

    timings: list[float] = []

    async def later(ctx: WorkflowHandlerContext) -> str:
        timings.append(asyncio.get_running_loop().time())
        if ctx.run.attempt == 1:
            raise RetryAfterError("come back", "300ms")
        return "ok"

    wf = define_workflow("non-retriable", handler=handler, max_attempts=5, registry=registry)
    wf2 = define_workflow("retry-after", handler=later, max_attempts=2, registry=registry)
    await make_worker()
    with pytest.raises(RunFailedError) as info:
        await (await client.enqueue_definition(wf, None)).result(timeout_ms=10_000)
    assert info.value.error["kind"] == "non_retriable" and calls == [1]
    assert await (await client.enqueue_definition(wf2, None)).result(timeout_ms=10_000) == "ok"
    assert timings[1] - timings[0] >= 0.25


async def test_default_backoff_is_exponential_with_jitter() -> None:
    from redflow.retries import default_backoff_ms

    firsts = {default_backoff_ms(1) for _ in range(50)}
    assert min(firsts) >= 250 and max(firsts) <= 312 and len(firsts) > 1
    assert 1000 <= default_backoff_ms(3) <= 1250
    assert default_backoff_ms(30) <= 37_500


async def test_step_cache_survives_replay_after_handback(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    body: list[str] = []

    async def first() -> str:
        body.append("first")
        return "one"

    async def block() -> str:
        started.set()
        await release.wait()
        return "two"

    async def handler(ctx: WorkflowHandlerContext) -> list[str]:
        a = await ctx.step.run("first", first)
        b = await ctx.step.run("block", block)
        return [a, b]

    wf = define_workflow("handback", handler=handler, registry=registry)
    w1 = await make_worker()
    handle = await client.enqueue_definition(wf, None)
    await asyncio.wait_for(started.wait(), 10)
    await w1.stop(grace_period_ms=50)  # hands the run back at once
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "queued" and state["attempt"] == 1
    release.set()
    await make_worker()
    assert await handle.result(timeout_ms=10_000) == ["one", "two"]
    assert body == ["first"]
    state = await client.get_run(handle.id)
    assert state is not None and state["attempt"] == 1


async def test_sync_step_runs_in_a_thread_with_its_timeout(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    import threading
    import time

    threads: list[str] = []

    def blocking(x: int) -> int:
        threads.append(threading.current_thread().name)
        return x + 1

    def too_slow() -> None:
        time.sleep(0.5)

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        value = await ctx.step.run("sync", blocking, 1)
        await ctx.step.run("slow", too_slow, timeout_ms=50)
        return value

    wf = define_workflow("sync-steps", handler=handler, max_attempts=1, registry=registry)
    await make_worker()
    with pytest.raises(RunFailedError, match="timed out after 50 ms"):
        await (await client.enqueue_definition(wf, None)).result(timeout_ms=10_000)
    assert threads and threads[0] != threading.main_thread().name


async def test_attempt_traces_of_a_run_with_a_retry(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def one() -> int:
        return 1

    async def handler(ctx: WorkflowHandlerContext) -> str:
        await ctx.step.run("first", one)
        if ctx.run.attempt == 1:
            raise RuntimeError("flaky")
        await ctx.step.run("second", one)
        return "ok"

    wf = define_workflow("traced", handler=handler, retries=FAST, registry=registry)
    await make_worker()
    handle = await client.enqueue_definition(wf, None)
    assert await handle.result(timeout_ms=10_000) == "ok"
    traces = await client.get_run_attempts(handle.id)
    assert [(t["attempt"], t["status"]) for t in traces] == [(1, "failed"), (2, "succeeded")]
    assert traces[0]["error"]["message"] == "flaky" and traces[1]["output"] == "ok"
    assert [s["name"] for s in traces[0]["steps"]] == ["first"]
    assert [s["name"] for s in traces[1]["steps"]] == ["second"]  # "first" was replayed, not re-run
    assert traces[0]["started_at"] <= traces[0]["finished_at"] <= traces[1]["started_at"]
    assert [s["name"] for s in await client.get_run_steps(handle.id)] == ["first", "second"]
