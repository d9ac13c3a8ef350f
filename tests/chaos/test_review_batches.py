"""Review of the coalesced transitions (``batches.Coalescer``, ``finish_many.lua``, ``step_many.lua``):
tries to break "each batched run/step is decided exactly as the single script would decide it alone,
in submission order; a request is committed when submitted; a lost connection fails every caller of
the batch; nothing is lost, no recorded step runs twice, every run ends exactly once".

Every test uses a real server; the crash tests use real worker processes (this module is also the
worker: ``python -m tests.chaos.test_review_batches URL PREFIX CONCURRENCY LEASE_MS``). Nothing
sleeps to synchronise: waits are on conditions with deadlines.

Ends are counted on the done channels (``end_run`` publishes once per ending; nothing else does), so
"ends exactly once" is checked, not assumed. Step bodies log every execution (pid, time, nonce) and
return the nonce: a recorded step ran again exactly when an execution that is not a zombie's (a
worker woken by SIGCONT, whose writes the fence refuses) was logged after the recorded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from redflow import (
    RedflowClient,
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    start_worker,
    wait_for_input,
)
from redflow._redis.connection import Connection
from redflow._redis.errors import RedisError
from redflow.embedded import EmbeddedServer
from redflow.storage.codes import Code
from redflow.storage.records import ClaimedRun, StepRecord, encode_step
from redflow.storage.store import Store

from ..conftest import wait_until
from .proxy import FaultProxy
from .worker_procs import WorkerProcs

LONG = 600_000
TERMINAL = frozenset({"succeeded", "failed", "canceled"})


# --- shared helpers ---------------------------------------------------------------------------------


class Ends:
    """Counts the endings of runs from their done channels (PSUBSCRIBE on a connection of its own)."""

    def __init__(self, client: RedflowClient) -> None:
        self._client = client
        self._prefix = client.keys.done_channel_prefix()
        self.counts: Counter[str] = Counter()
        self.statuses: dict[str, list[str]] = defaultdict(list)
        self._conn: Connection | None = None

    async def start(self) -> Ends:
        self._conn = await self._client.redis.open_connection(on_push=self._push, deadline=False)
        await self._conn.execute("PSUBSCRIBE", self._prefix + "*")
        return self

    def _push(self, message: list[Any]) -> None:
        if message[0] != b"pmessage":
            return
        run_id = message[2].decode()[len(self._prefix):]
        self.counts[run_id] += 1
        self.statuses[run_id].append(message[3].split(b"\n", 1)[0].decode())

    async def settle(self) -> None:
        """Every message published before this call has been received (replies and pushes share the
        connection, in order)."""
        assert self._conn is not None
        await self._conn.execute("PING")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


async def _claim(store: Store, worker: str, queue: str, n: int) -> list[ClaimedRun]:
    code, _, runs = await store.claim(worker, [queue], n, 10)
    assert code is Code.OK
    return runs


def _line(name: str, position: int, output: str = "1") -> bytes:
    return encode_step(StepRecord(name=name, position=position, attempt=1, output=msgspec.Raw(output.encode())))


async def _statuses(client: RedflowClient, ids: list[str]) -> dict[str, str]:
    states = await asyncio.gather(*(client.get_run(i) for i in ids))
    return {i: (s or {}).get("status", "") for i, s in zip(ids, states, strict=True)}


async def _all_terminal(client: RedflowClient, ids: list[str]) -> bool:
    return all(s in TERMINAL for s in (await _statuses(client, ids)).values())


async def _nothing_held(client: RedflowClient) -> list[str]:
    """What a drained prefix must not keep: leases, owned runs, held runs, mutexes, ready runs."""
    r, k = client.redis, client.keys
    problems = []
    if n := await r.execute("HLEN", k.leases):
        problems.append(f"{n} leases left")
    if n := await r.execute("ZCARD", k.held):
        problems.append(f"{n} held runs left")
    if n := await r.execute("HLEN", k.mutexes):
        problems.append(f"{n} mutexes left")
    cursor = b"0"
    while True:
        cursor, found = await r.execute("SCAN", cursor, "MATCH", f"{k.base}:*", "COUNT", 1000)
        for key in found:
            name = key.decode()
            if ":owned:" in name and (n := await r.execute("SCARD", name)):
                problems.append(f"{name} holds {n} runs")
            if name.endswith(":ready") and (n := await r.execute("LLEN", name)):
                problems.append(f"{name} holds {n} runs")
        if cursor == b"0":
            break
    for status in ("running", "queued", "scheduled"):
        if n := await r.execute("ZLEXCOUNT", k.index, f"[s:{status}:", f"[s:{status}:\xff"):
            problems.append(f"{n} runs {status}")
    return problems


# --- 1. a step record must not be overtaken by a later write of the same run -------------------------
#
# StepApi records a step (record_step, coalesced: it leaves a few loop iterations after submission)
# and a parallel branch of the same handler suspends the run (suspend.lua, a direct call), or the
# handler fails while a step task it did not await records (retry.lua). The direct call waits for the
# run's batched records to be answered (Coalescer.settled), so the record is applied first and the
# step's body never runs a second time when the run wakes. Without that wait step_many.lua found the
# run no longer running (WRONG_STATUS), the output was dropped and the body ran again.

PARALLEL_WAITS = ["wait_for", "wait_for_event", "wait_for_input_in_step", "unawaited_step_then_retry"]


@pytest.mark.parametrize("wait", PARALLEL_WAITS)
async def test_a_step_that_returned_before_a_parallel_wait_is_kept(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: Any, wait: str,
) -> None:
    ran: Counter[str] = Counter()
    background: list[asyncio.Future[Any]] = []

    async def handler(ctx: WorkflowHandlerContext) -> Any:
        async def body() -> str:
            ran[ctx.run.id] += 1
            return "done"

        if wait == "unawaited_step_then_retry":
            if ctx.run.attempt == 1:
                background.append(asyncio.ensure_future(ctx.step.run("body", body)))
                raise RuntimeError("the handler fails while its step records")
            return await ctx.step.run("body", body)

        async def other() -> Any:
            if wait == "wait_for":
                return await ctx.step.wait_for("nap", 200)
            if wait == "wait_for_event":
                return await ctx.step.wait_for_event("ev", "never", "k", 200)

            async def ask() -> Any:
                if ctx.resume is None:
                    raise wait_for_input("a form, please")
                return ctx.resume.form

            return await ctx.step.run("ask", ask)

        first, _ = await asyncio.gather(ctx.step.run("body", body), other())
        return first

    wf = define_workflow(f"rb-par-{wait}", handler=handler, registry=registry, max_attempts=2)
    await make_worker(concurrency=2)
    handle = await client.enqueue_definition(wf, None)
    if wait == "wait_for_input_in_step":
        async def waiting() -> bool:
            return (await client.get_run(handle.id) or {}).get("status") not in ("queued", "running")

        await wait_until(waiting, what="the run waiting for input")
        assert await client.resume_run(handle.id, form={"ok": 1}) is not None
    assert await handle.result(timeout_ms=10_000) == "done"
    for task in background:
        with contextlib.suppress(BaseException):
            await task  # refused (LeaseLostError) while the bug lasts
    steps = {s["name"]: s for s in await client.get_run_steps(handle.id)}
    assert steps["body"]["status"] == "succeeded"
    assert ran[handle.id] == 1, f"the step body ran {ran[handle.id]} times"


async def test_a_record_submitted_before_a_suspend_is_decided_before_it(
    client: RedflowClient, registry: WorkflowRegistry,
) -> None:
    async def noop(ctx: WorkflowHandlerContext) -> None:
        return None

    wf = define_workflow("rb-order", handler=noop, registry=registry)
    store = client.store
    await store.heartbeat("w", LONG, LONG, False)
    run = await client.enqueue_definition(wf, None)
    [claimed] = await _claim(store, "w", "default", 1)
    # Same order as StepApi: the record is submitted first, the suspend is sent right after it.
    record = asyncio.ensure_future(store.record_step(run.id, claimed.token, _line("a", 1)))
    suspend = asyncio.ensure_future(store.suspend(run.id, claimed.token, "w", "default", "nap", 2, "sleep",
                                                  delay_ms=60_000))
    assert (await suspend)[0] is Code.OK
    assert await record == Code.OK
    assert [s["name"] for s in await client.get_run_steps(run.id)] == ["a", "nap"]


# --- 2. decisions of a batch in flight: cancel, lapsed lease ---------------------------------------


async def _proxied(proxy: FaultProxy, prefix: str) -> RedflowClient:
    via = create_client(url=proxy.url, prefix=prefix)
    await via.store.ensure_ready()
    return via


async def test_a_cancel_that_lands_while_a_batch_is_in_flight_decides_its_runs(
    client: RedflowClient, registry: WorkflowRegistry, prefix: str, proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch leaves the client, then cancels land before it (the proxy delays it): each canceled
    run ends canceled (not with the handler's output), the others succeed, each ends once, and every
    caller gets the reply finish.lua would have given it."""
    monkeypatch.setenv("REDFLOW_COMMAND_TIMEOUT_MS", "60000")

    async def noop(ctx: WorkflowHandlerContext) -> None:
        return None

    wf = define_workflow("rb-cancel", handler=noop, registry=registry)
    ends = await Ends(client).start()
    via = await _proxied(proxy, prefix)
    try:
        store = via.store
        await store.heartbeat("w", LONG, LONG, False)
        handles = [await client.enqueue_definition(wf, i) for i in range(8)]
        tokens = {r.id: r.token for r in await _claim(store, "w", "default", 8)}
        proxy.set_latency(1.5)
        sent = via.redis.counters.by_name["EVALSHA"]
        finishes = [asyncio.ensure_future(store.finish(h.id, tokens[h.id], "w", "succeeded", b'"out"', False, LONG,
                                                       "default")) for h in handles]
        await wait_until(lambda: via.redis.counters.by_name["EVALSHA"] > sent, what="the batch sent")
        assert via.redis.counters.by_name["EVALSHA"] == sent + 1  # one call for the eight
        canceled = [h.id for h in handles[::2]]
        assert all([await client.cancel_run(i, reason="late") for i in canceled])
        assert set((await _statuses(client, [h.id for h in handles])).values()) == {"running"}, (
            "precondition: the batch must still be on its way")
        replies = await asyncio.gather(*finishes)
        assert replies == [(Code.OK, "canceled" if h.id in canceled else "succeeded") for h in handles]
        for h in handles:
            state = await client.get_run(h.id)
            assert state is not None
            if h.id in canceled:
                assert state["status"] == "canceled" and state["error"]["kind"] == "canceled"
                assert state.get("output") is None
            else:
                assert state["status"] == "succeeded" and state["output"] == "out"
        await ends.settle()
        assert {h.id: ends.counts[h.id] for h in handles} == {h.id: 1 for h in handles}
        assert await _nothing_held(client) == []
    finally:
        ends.close()
        await via.close()


async def test_a_batch_that_arrives_after_its_lease_was_reaped_changes_nothing(
    client: RedflowClient, registry: WorkflowRegistry, prefix: str, proxy: FaultProxy, make_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker "w" lapses while its step records and finishes are on the wire (held by the proxy); a
    live worker reaps it and runs the runs itself. The late batches are refused whole (STALE per
    request): no foreign step record, the live worker's output kept, one end per run."""
    monkeypatch.setenv("REDFLOW_COMMAND_TIMEOUT_MS", "60000")

    async def live(ctx: WorkflowHandlerContext) -> str:
        return await ctx.step.run("s", lambda: "live")

    wf = define_workflow("rb-lapse", handler=live, registry=registry)
    ends = await Ends(client).start()
    via = await _proxied(proxy, prefix)
    try:
        store = via.store
        await store.heartbeat("w", 400, 400, False)
        handles = [await client.enqueue_definition(wf, i) for i in range(6)]
        tokens = {r.id: r.token for r in await _claim(store, "w", "default", 6)}
        assert len(tokens) == 6
        proxy.set_latency(4.0)
        steps = [asyncio.ensure_future(store.record_step(h.id, tokens[h.id], _line("s", 1, '"zombie"')))
                 for h in handles]
        finishes = [asyncio.ensure_future(store.finish(h.id, tokens[h.id], "w", "succeeded", b'"zombie"', False,
                                                       LONG, "default")) for h in handles]
        await make_worker(concurrency=6, lease_ms=1500)
        await wait_until(lambda: _all_terminal(client, [h.id for h in handles]), timeout_s=15,
                         what="the live worker finished the reaped runs")
        assert await asyncio.gather(*steps) == [Code.STALE] * 6
        assert await asyncio.gather(*finishes) == [(Code.STALE, "")] * 6
        for h in handles:
            assert await h.result(timeout_ms=1000) == "live"
            assert [s["output"] for s in await client.get_run_steps(h.id)] == ["live"]
        await ends.settle()
        assert {h.id: ends.counts[h.id] for h in handles} == {h.id: 1 for h in handles}
    finally:
        ends.close()
        await via.close()


# --- 3. everything one tick can hold, in a real worker -------------------------------------------------


@pytest.fixture
def script_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Sizes of every finish_many / step_many call and count of single calls, for any store."""
    seen: dict[str, list[int]] = defaultdict(list)
    many, steps, one, step_one = Store.finish_many, Store.record_steps, Store.finish_one, Store.record_step_one

    async def finish_many(self: Store, requests: Any) -> Any:
        seen["finish_many"].append(len(requests))
        return await many(self, requests)

    async def record_steps(self: Store, requests: Any) -> Any:
        seen["step_many"].append(len(requests))
        return await steps(self, requests)

    async def finish_one(self: Store, request: Any) -> Any:
        seen["finish_one"].append(len(request.payload))
        return await one(self, request)

    async def record_step_one(self: Store, request: Any) -> Any:
        seen["step_one"].append(len(request.line))
        return await step_one(self, request)

    monkeypatch.setattr(Store, "finish_many", finish_many)
    monkeypatch.setattr(Store, "record_steps", record_steps)
    monkeypatch.setattr(Store, "finish_one", finish_one)
    monkeypatch.setattr(Store, "record_step_one", record_step_one)
    return seen


BIG = 70_000  # over MAX_BYTES // 4: such a payload is sent alone


async def test_one_tick_of_every_kind_of_finish_in_a_real_worker(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: Any, script_calls: dict[str, list[int]],
) -> None:
    """Plain, big (alone), streaming, failing with an on_failure hook, a run whose capacity slot hands
    on to a held run on another queue (NEED_QUEUES, finished alone), parallel steps (gather) and big
    step records: all released in one tick. Each ends once with its own outcome, each stream gets its
    own end entry, each hook runs once, the held run runs, and the steps are all recorded once."""
    gates = {1: asyncio.Event(), 2: asyncio.Event()}
    at_gate: dict[int, set[str]] = {1: set(), 2: set()}
    hooks: Counter[str] = Counter()
    bodies: Counter[str] = Counter()

    async def wait_gate(run_id: str, n: int) -> None:
        at_gate[n].add(run_id)
        await gates[n].wait()

    async def plain(ctx: WorkflowHandlerContext) -> Any:
        async def small() -> str:
            bodies[f"{ctx.run.id}:small"] += 1
            return "s"

        async def big() -> str:
            bodies[f"{ctx.run.id}:big"] += 1
            return "b" * (BIG if ctx.input["big_step"] else 10)

        await wait_gate(ctx.run.id, 1)  # the step records of one tick
        a, b = await asyncio.gather(ctx.step.run("small", small), ctx.step.run("big", big))
        await wait_gate(ctx.run.id, 2)  # the finishes of one tick
        return {"i": ctx.input["i"], "pad": "x" * (BIG if ctx.input["big"] else 1), "steps": [a, len(b)]}

    async def streaming(ctx: WorkflowHandlerContext) -> int:
        assert ctx.stream is not None
        await ctx.stream.write({"v": ctx.input})
        await wait_gate(ctx.run.id, 2)
        return int(ctx.input)

    async def failing(ctx: WorkflowHandlerContext) -> None:
        await wait_gate(ctx.run.id, 2)
        raise ValueError(f"designed {ctx.input}")

    async def on_failure(ctx: Any) -> None:
        hooks[ctx.run.id] += 1

    async def capped(ctx: WorkflowHandlerContext) -> str:
        if ctx.input == "holder":
            await wait_gate(ctx.run.id, 2)
        return str(ctx.input)

    plain_wf = define_workflow("rb-plain", handler=plain, registry=registry)
    stream_wf = define_workflow("rb-stream", handler=streaming, registry=registry, stream=True)
    fail_wf = define_workflow("rb-fail", handler=failing, registry=registry, max_attempts=1, on_failure=on_failure)
    cap_wf = define_workflow("rb-cap", handler=capped, registry=registry, max_concurrency=1)
    ends = await Ends(client).start()
    try:
        worker = await make_worker(concurrency=40, queues=["default", "rb-other"])
        plains = [await client.enqueue_definition(plain_wf, {"i": i, "big": i % 3 == 0, "big_step": i % 4 == 1})
                  for i in range(12)]
        streams = [await client.enqueue_definition(stream_wf, i) for i in range(4)]
        fails = [await client.enqueue_definition(fail_wf, i) for i in range(4)]
        holder = await client.enqueue_definition(cap_wf, "holder")
        every = [*plains, *streams, *fails, holder]
        await wait_until(lambda: len(at_gate[1]) == len(plains) and len(at_gate[2]) == 9,
                         what="every handler at its gate")
        held = await client.run_by_name(cap_wf.name, "held", queue_override="rb-other")

        async def is_held() -> bool:
            return await client.redis.execute("ZCARD", client.keys.held) == 1

        await wait_until(is_held, what="the second capped run held")
        gates[1].set()
        await wait_until(lambda: len(at_gate[2]) == len(every), what="every handler at the second gate")
        gates[2].set()
        await wait_until(lambda: _all_terminal(client, [h.id for h in [*every, held]]), timeout_s=15,
                         what="every run ended")
        await wait_until(lambda: not worker.active, what="hooks done")
        for h in plains:
            i = plains.index(h)
            out = await h.result(timeout_ms=1000)
            assert out == {"i": i, "pad": "x" * (BIG if i % 3 == 0 else 1), "steps": ["s", BIG if i % 4 == 1 else 10]}
            assert (bodies[f"{h.id}:small"], bodies[f"{h.id}:big"]) == (1, 1)
            assert [s["name"] for s in await client.get_run_steps(h.id)] == ["small", "big"]
        for i, h in enumerate(streams):
            assert await h.result(timeout_ms=1000) == i
            entries = await client.redis.execute("XRANGE", client.keys.stream(h.id), "-", "+")
            assert len(entries) == 2 and entries[-1][1][:2] == [b"end", b"succeeded"], entries
        for h in fails:
            state = await client.get_run(h.id)
            assert state is not None and state["status"] == "failed"
            assert hooks[h.id] == 1
        assert await holder.result(timeout_ms=1000) == "holder"
        assert await held.result(timeout_ms=5000) == "held"
        await ends.settle()
        assert {h.id: ends.counts[h.id] for h in [*every, held]} == {h.id: 1 for h in [*every, held]}
        assert await _nothing_held(client) == []
        # The change was exercised: several requests per call, big ones alone (a big request also ends
        # the batch before it, so requests leave in submission order: the batches between them are small).
        assert max(script_calls["finish_many"]) >= 3, dict(script_calls)
        assert max(script_calls["step_many"]) >= 3, dict(script_calls)
        assert sum(1 for n in script_calls["finish_one"] if n > BIG) == 4, dict(script_calls)
        assert sum(1 for n in script_calls["step_one"] if n > BIG) == 3, dict(script_calls)
    finally:
        ends.close()


async def test_a_tick_over_the_batch_limits_is_split_and_every_request_decided(
    client: RedflowClient, registry: WorkflowRegistry, script_calls: dict[str, list[int]],
) -> None:
    """250 step records and 250 finishes in one tick (MAX_ITEMS 100), and finishes whose payloads add
    up past MAX_BYTES: split into calls, each request decided once, in order for one run."""
    async def noop(ctx: WorkflowHandlerContext) -> None:
        return None

    wf = define_workflow("rb-limits", handler=noop, registry=registry)
    store = client.store
    await store.heartbeat("w", LONG, LONG, False)
    n = 250
    handles = [await client.enqueue_definition(wf, i) for i in range(n + 6)]
    runs = []
    while len(runs) < n + 6:
        got = await _claim(store, "w", "default", 100)
        assert got
        runs += got
    runs = [r for r in runs if r.id in {h.id for h in handles}]
    assert len(runs) == n + 6
    small, big = runs[:n], runs[n:]
    codes = await asyncio.gather(*(store.record_step(r.id, r.token, _line(f"s{j}", j + 1))
                                   for r in small for j in range(2)))
    assert codes == [Code.OK] * (2 * n)
    assert sorted(script_calls["step_many"]) == [100, 100, 100, 100, 100]
    replies = await asyncio.gather(
        *(store.finish(r.id, r.token, "w", "succeeded", json.dumps(r.id).encode(), False, LONG, "default")
          for r in small),
        *(store.finish(r.id, r.token, "w", "succeeded", json.dumps("y" * 60_000).encode(), False, LONG, "default")
          for r in big),
    )
    assert replies == [(Code.OK, "succeeded")] * (n + 6)
    assert sum(script_calls["finish_many"]) + len(script_calls["finish_one"]) == n + 6
    # 100 + 100, then 50 small and five 60 KB payloads reach MAX_BYTES (a call of 55); the sixth is
    # the last of its group, alone.
    assert script_calls["finish_many"] == [100, 100, 55] and len(script_calls["finish_one"]) == 1
    for r in small[:: 25]:
        assert [s["name"] for s in await client.get_run_steps(r.id)] == ["s0", "s1"]
        assert (await client.get_run(r.id) or {})["output"] == r.id
    index = client.keys.index
    assert await client.redis.execute("ZLEXCOUNT", index, "[s:succeeded:", "(s:succeeded;") == n + 6
    assert await client.redis.execute("SCARD", client.keys.owned("w")) == 0


# --- 4. lost replies and frozen requests of batches, in a real worker --------------------------------


@pytest.mark.parametrize("fault", ["step reply lost", "finish reply lost", "finish request frozen"])
async def test_a_faulty_connection_under_a_batch_loses_nothing_and_repeats_nothing(
    client: RedflowClient, registry: WorkflowRegistry, prefix: str, proxy: FaultProxy, make_worker: Any,
    monkeypatch: pytest.MonkeyPatch, fault: str,
) -> None:
    """A worker behind the proxy releases a batch of step records or of finishes (failures with an
    on_failure hook) at once, and the batch's reply is dropped (it applied) or its request frozen (it
    never arrives; the command deadline gives up on it). Every caller hears the failure, the runs are
    handed back and run again: a recorded step is not run again, each run ends once, each hook runs
    once, nothing stays owned."""
    monkeypatch.setenv("REDFLOW_COMMAND_TIMEOUT_MS", "1000")
    gate = asyncio.Event()
    at_gate: set[str] = set()
    bodies: Counter[str] = Counter()
    hooks: Counter[str] = Counter()
    armed = {"on": True}

    async def handler(ctx: WorkflowHandlerContext) -> str:
        async def a() -> str:
            bodies[f"{ctx.run.id}:a"] += 1
            if armed["on"] and fault == "step reply lost":
                at_gate.add(ctx.run.id)
                await gate.wait()
            return f"a{ctx.input}"

        async def b() -> str:
            bodies[f"{ctx.run.id}:b"] += 1
            return "b"

        first = await ctx.step.run("a", a)
        second = await ctx.step.run("b", b)
        if fault != "step reply lost":
            if armed["on"]:
                at_gate.add(ctx.run.id)
                await gate.wait()
            raise ValueError(f"designed {first}{second}")
        return first + second

    async def hook(ctx: Any) -> None:
        hooks[ctx.run.id] += 1

    wf = define_workflow("rb-faulty", handler=handler, registry=registry, max_attempts=1, on_failure=hook)
    ends = await Ends(client).start()
    try:
        worker = await make_worker(url=proxy.url, concurrency=10, lease_ms=3000, blmove_timeout_sec=1.0,
                                   watchdog_stalled_for_ms=1000)
        heard: Counter[str] = Counter()
        store = worker.store
        for name in ("finish", "record_step"):
            def wrap(real: Any, name: str = name) -> Any:
                async def call(*args: Any) -> Any:
                    try:
                        return await real(*args)
                    except RedisError:
                        heard[name] += 1
                        raise
                return call
            setattr(store, name, wrap(getattr(store, name)))
        handles = [await client.enqueue_definition(wf, i) for i in range(6)]
        ids = [h.id for h in handles]
        await wait_until(lambda: len(at_gate) == len(handles), what="every run at the gate")
        if fault == "finish request frozen":
            proxy.freeze()
        else:
            proxy.drop_replies()
        armed["on"] = False
        gate.set()
        if fault == "step reply lost":
            async def a_recorded() -> bool:
                histories = await asyncio.gather(*(client.get_run_steps(i) for i in ids))
                return all(any(s["name"] == "a" for s in h) for h in histories)

            await wait_until(a_recorded, what="the batch of step records applied")
        elif fault == "finish reply lost":
            await wait_until(lambda: _failed(client, ids), what="the batch of finishes applied")
        if fault != "finish request frozen":
            proxy.cut()  # frozen: the command deadline gives up on the connection by itself
        await wait_until(lambda: _all_terminal(client, ids), timeout_s=20, what="every run ended")
        await wait_until(lambda: _ended_and_free(client, ids, hooks if fault != "step reply lost" else None),
                         timeout_s=20, what="hooks done and runs released")
        await ends.settle()
        assert {i: ends.counts[i] for i in ids} == {i: 1 for i in ids}
        # Every caller of the batch heard the failure (one batch: all six, whatever else failed too).
        assert heard["record_step" if fault == "step reply lost" else "finish"] >= len(ids), dict(heard)
        for i in ids:
            if fault == "step reply lost":
                assert bodies[f"{i}:a"] == 1, "a step whose record applied ran again"
                assert await client.get_run(i) is not None
                assert (await client.get_run(i) or {})["status"] == "succeeded"
            else:
                assert (bodies[f"{i}:a"], bodies[f"{i}:b"]) == (1, 1), "a recorded step ran again"
                assert (await client.get_run(i) or {})["status"] == "failed"
                assert hooks[i] == 1, f"on_failure ran {hooks[i]} times"
        assert await _nothing_held(client) == []
        await wait_until(lambda: worker.ready, timeout_s=10, what="the worker ready again")
    finally:
        ends.close()


async def _failed(client: RedflowClient, ids: list[str]) -> bool:
    return set((await _statuses(client, ids)).values()) == {"failed"}


async def _ended_and_free(client: RedflowClient, ids: list[str], hooks: Counter[str] | None) -> bool:
    if hooks is not None and any(hooks[i] == 0 for i in ids):
        return False
    return await client.redis.execute("HLEN", client.keys.leases) == 0


# --- 5. worker stop while finishes and step records are pending ----------------------------------------


@pytest.mark.parametrize("grace_ms", [0, 5000])
async def test_a_worker_stopping_while_its_batches_are_pending(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: Any, grace_ms: int,
) -> None:
    """stop() is called in the very tick the finishes (and step records) are submitted. With a grace
    period the runs end by this worker; without one they are cut: whatever was submitted is committed
    and the hand-back that follows it is refused, the rest is handed back and run by another worker.
    Either way: one end per run, each step body once, the output that was recorded."""
    gate = asyncio.Event()
    at_gate: set[str] = set()
    bodies: Counter[str] = Counter()
    stopping: dict[str, Any] = {}

    async def handler(ctx: WorkflowHandlerContext) -> list[str]:
        async def s() -> str:
            bodies[ctx.run.id] += 1
            return "s"

        at_gate.add(ctx.run.id)
        await gate.wait()  # already open when another worker runs it again
        if not ctx.input["steps"]:
            return ["plain"]
        return [await ctx.step.run("s", s)]

    wf = define_workflow("rb-stop", handler=handler, registry=registry)
    ends = await Ends(client).start()
    try:
        first = await make_worker(concurrency=20)
        store = first.store
        submit_finish, submit_step = store._finishes.submit, store._steps.submit

        def stop_now() -> None:
            if "task" not in stopping:
                stopping["task"] = asyncio.ensure_future(first.stop(grace_period_ms=grace_ms))

        def finish_then_stop(request: Any) -> Any:
            fut = submit_finish(request)
            stop_now()
            return fut

        def step_then_stop(request: Any) -> Any:
            fut = submit_step(request)
            stop_now()
            return fut

        store._finishes.submit = finish_then_stop  # type: ignore[method-assign]
        store._steps.submit = step_then_stop  # type: ignore[method-assign]
        handles = [await client.enqueue_definition(wf, {"steps": i % 2 == 0}) for i in range(10)]
        ids = [h.id for h in handles]
        await wait_until(lambda: len(at_gate) == len(handles), what="every run at the gate")
        gate.set()  # every handler wakes in the same loop iteration: their submissions share it
        await wait_until(lambda: "task" in stopping, what="stop called")
        await asyncio.wait_for(stopping["task"], 20)
        second = await make_worker(concurrency=20)
        await wait_until(lambda: _all_terminal(client, ids), timeout_s=20, what="every run ended")
        await ends.settle()
        assert {i: ends.counts[i] for i in ids} == {i: 1 for i in ids}
        for h, i in zip(handles, ids, strict=True):
            out = await h.result(timeout_ms=1000)
            assert out in (["s"], ["plain"])
            if out == ["s"]:
                recorded = [s["output"] for s in await client.get_run_steps(i)]
                assert recorded == ["s"]
                assert bodies[i] == 1, "the step ran again after its record was committed"
        assert await _nothing_held(client) == []
        await second.stop(grace_period_ms=1000)
    finally:
        ends.close()


# --- 6. worker processes killed or paused mid-drain, and a server restart -----------------------------
#
# The workload of the worker processes (this module run as __main__): runs of 4 steps (the last two in
# parallel), failures with an on_failure hook, parents each waiting on a child on another queue, runs
# of a workflow with max_concurrency 2 spread over two queues (hand-ons to a queue the finish was not
# given: the NEED_QUEUES path).

proc_registry = WorkflowRegistry()
_proc_client: RedflowClient | None = None


async def _log(key: str, entry: str) -> None:
    """RPUSH that outlasts a server restart (a repeat after a lost reply is told apart by its nonce)."""
    assert _proc_client is not None
    for attempt in range(100):
        try:
            await _proc_client.redis.execute("RPUSH", f"{_proc_client.prefix}:t:{key}", entry)
            return
        except RedisError:
            if attempt == 99:
                raise
            await asyncio.sleep(0.1)


async def _exec(run_id: str, step: str) -> str:
    nonce = uuid.uuid4().hex[:10]
    await _log(f"exec:{run_id}:{step}", f"{os.getpid()}|{time.time():.6f}|{nonce}")
    await asyncio.sleep(0.004 + (hash(nonce) % 8) / 1000)
    return nonce


def _body(ctx: WorkflowHandlerContext, step: str) -> Any:
    async def run() -> str:
        return await _exec(ctx.run.id, step)

    return ctx.step.run(step, run)


async def p_steps(ctx: WorkflowHandlerContext) -> list[str]:
    a = await _body(ctx, "s1")
    b = await _body(ctx, "s2")
    c, d = await asyncio.gather(_body(ctx, "s3"), _body(ctx, "s4"))
    return [a, b, c, d]


async def p_fail(ctx: WorkflowHandlerContext) -> None:
    await _body(ctx, "s1")
    raise ValueError("designed failure")


async def p_hook(ctx: Any) -> None:
    await _log(f"hook:{ctx.run.id}", f"{os.getpid()}|{time.time():.6f}|{uuid.uuid4().hex[:10]}")


async def p_parent(ctx: WorkflowHandlerContext) -> list[Any]:
    a = await _body(ctx, "s1")
    kid = await ctx.step.run_workflow("kid", "rbp-kid", None)
    return [a, kid]


async def p_kid(ctx: WorkflowHandlerContext) -> list[str]:
    return [await _body(ctx, "k1")]


async def p_capped(ctx: WorkflowHandlerContext) -> list[str]:
    return [await _body(ctx, "c1")]


define_workflow("rbp-steps", handler=p_steps, registry=proc_registry)
define_workflow("rbp-fail", handler=p_fail, registry=proc_registry, max_attempts=1, on_failure=p_hook)
define_workflow("rbp-parent", handler=p_parent, registry=proc_registry)
define_workflow("rbp-kid", handler=p_kid, registry=proc_registry, queue="rbp-kids")
define_workflow("rbp-capped", handler=p_capped, registry=proc_registry, max_concurrency=2)
define_workflow("rbp-mutex", handler=p_capped, registry=proc_registry, mutex=lambda i: f"m{i % 2}")
PROC_QUEUES = ["default", "rbp-kids", "rbp-cap"]


async def _worker_main(url: str, prefix: str, concurrency: int, lease_ms: int) -> None:
    global _proc_client
    _proc_client = create_client(url=url, prefix=prefix)
    worker = await start_worker(StartWorkerOptions(
        app="rb-proc", url=url, prefix=prefix, registry=proc_registry, concurrency=concurrency,
        lease_ms=lease_ms, grace_period_ms=3000, queues=PROC_QUEUES, blmove_timeout_sec=1.0,
        watchdog_stalled_for_ms=1000,
    ))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()
    await _proc_client.close()


class Procs(WorkerProcs):
    def __init__(self, url: str, prefix: str, logs: Path) -> None:
        super().__init__("tests.chaos.test_review_batches", url, prefix, logs)

    async def spawn(self, concurrency: int = 16, lease_ms: int = 1500) -> subprocess.Popen[str]:
        return await self.start(str(concurrency), str(lease_ms))


@pytest.fixture
def procs_factory(tmp_path: Path, prefix: str) -> Any:
    made: list[Procs] = []

    def make(url: str) -> Procs:
        p = Procs(url, prefix, tmp_path)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


async def _enqueue_workload(client: RedflowClient, n: int) -> dict[str, str]:
    """Run id -> designed status, for ``n`` top-level runs (and a child per parent, found later):
    step runs (the last two steps in parallel), failures with on_failure, parents of a child on another
    queue, runs of a max_concurrency 2 workflow and of a mutex, on two queues (hand-ons to a queue
    the finish was not given: NEED_QUEUES)."""
    designed: dict[str, str] = {}
    for i in range(n):
        kind = i % 7
        if kind == 6:
            h = await client.run_by_name("rbp-mutex", i, queue_override="rbp-cap" if i % 2 else None)
        elif kind in (0, 1):
            h = await client.run_by_name("rbp-steps", i)
        elif kind == 2:
            h = await client.run_by_name("rbp-fail", i)
        elif kind == 3:
            h = await client.run_by_name("rbp-parent", i)
        else:
            h = await client.run_by_name("rbp-capped", i, queue_override="rbp-cap" if kind == 5 else None)
        designed[h.id] = "failed" if kind == 2 else "succeeded"
    return designed


async def _ended(client: RedflowClient) -> int:
    index = client.keys.index
    total = 0
    for status in TERMINAL:
        total += await client.redis.execute("ZLEXCOUNT", index, f"[s:{status}:", f"[s:{status}:\xff")
    return int(total)


async def _check_workload(client: RedflowClient, designed: dict[str, str], ends: Ends,
                          zombie: tuple[int, float] | None = None, dead: int | None = None) -> list[str]:
    """The invariants of the drained workload; returns the violations. ``zombie``: (pid, woken at) of a
    worker paused and woken; ``dead``: pid of a worker killed (an on_failure it ran may run again
    once, if it died before recording that the hook ran)."""
    r, p = client.redis, client.prefix
    problems: list[str] = []
    runs = dict(designed)
    for run_id in list(designed):
        state = await client.get_run(run_id)
        if state and state["workflow"] == "rbp-parent" and state["status"] == "succeeded":
            kid = state["output"][1]
            steps = await client.get_run_steps(run_id)
            kid_ids = [s.get("child_run_id") for s in steps if s["name"] == "kid"]
            if kid_ids and kid_ids[0]:
                runs[kid_ids[0]] = "succeeded"
            if kid is None:
                problems.append(f"parent {run_id} has no child output")
    await ends.settle()
    for run_id, want in runs.items():
        state = await client.get_run(run_id)
        if state is None:
            problems.append(f"{run_id} lost")
            continue
        if state["status"] != want:
            problems.append(f"{run_id} ({state['workflow']}) is {state['status']}, designed {want}")
        if ends.counts[run_id] != 1:
            problems.append(f"{run_id} ended {ends.counts[run_id]} times ({ends.statuses[run_id]})")
        steps = await client.get_run_steps(run_id)
        recorded = {s["name"]: s for s in steps if s["status"] == "succeeded" and "kind" not in s}
        for name, step in recorded.items():
            nonce = step["output"]
            entries = await r.execute("LRANGE", f"{p}:t:exec:{run_id}:{name}", 0, -1)
            log = [e.split("|") for e in dict.fromkeys(x.decode() for x in entries)]
            if nonce not in [e[2] for e in log]:
                problems.append(f"{run_id}/{name}: recorded output {nonce} from no logged execution")
                continue
            for pid, ts, other in log:
                if other == nonce or float(ts) * 1000 <= step["finished_at"] + 1:
                    continue  # the recorded execution, or one that started before it returned
                if zombie is not None and int(pid) == zombie[0] and float(ts) >= zombie[1]:
                    continue  # a zombie's own replay: its record is refused by the fence
                problems.append(f"{run_id}/{name}: ran again ({other} by {pid} at {ts}) after the recorded "
                                f"execution {nonce} returned at {step['finished_at']} (executions {log}, "
                                f"zombie {zombie})")
        recorded = {name: step["output"] for name, step in recorded.items()}
        if state["status"] == "succeeded" and state["workflow"] == "rbp-parent":
            kid_out = state["output"][1]
            if state["output"][0] != recorded.get("s1") or kid_out != (await client.get_run(
                    next(s for s in steps if s["name"] == "kid")["child_run_id"]) or {}).get("output"):
                problems.append(f"{run_id}: output {state['output']} is not its recorded step and child")
        if state["status"] == "succeeded" and state["workflow"] in ("rbp-steps", "rbp-kid", "rbp-capped", "rbp-mutex"):
            expected = [recorded.get(n) for n in {"rbp-steps": ["s1", "s2", "s3", "s4"], "rbp-kid": ["k1"],
                                                  "rbp-capped": ["c1"], "rbp-mutex": ["c1"]}[state["workflow"]]]
            if state["output"] != expected:
                problems.append(f"{run_id}: output {state['output']} is not its recorded steps {expected}")
        if state["workflow"] == "rbp-fail":
            entries = await r.execute("LRANGE", f"{p}:t:hook:{run_id}", 0, -1)
            calls = [e.split("|") for e in dict.fromkeys(x.decode() for x in entries)]
            if not calls:
                problems.append(f"{run_id}: on_failure never ran")
            survivors = [c for c in calls if int(c[0]) not in (dead, zombie[0] if zombie else None)]
            if len(calls) > 1 and len(survivors) > 1:
                problems.append(f"{run_id}: on_failure ran {len(calls)} times ({calls})")
    problems += await _nothing_held(client)
    return problems


async def _drain(client: RedflowClient, total_at_least: int, timeout_s: float) -> None:
    async def done() -> bool:
        if await _ended(client) < total_at_least:
            return False
        # Failed runs keep their lease until their on_failure ran (all of them, once drained).
        return total_at_least < ALL_RUNS or await client.redis.execute("HLEN", client.keys.leases) == 0

    await wait_until(done, timeout_s=timeout_s, interval_s=0.02, what=f"{total_at_least} runs ended")


WORKLOAD = 182  # top-level runs; a seventh are parents with a child each
ALL_RUNS = WORKLOAD + WORKLOAD // 7


@pytest.mark.timeout(90)
async def test_a_worker_sigkilled_mid_drain_loses_nothing_and_repeats_no_recorded_step(
    client: RedflowClient, procs_factory: Any, redis_url: str,
) -> None:
    client.registry = proc_registry
    ends = await Ends(client).start()
    try:
        procs = procs_factory(redis_url)
        first = await procs.spawn()
        designed = await _enqueue_workload(client, WORKLOAD)
        await _drain(client, WORKLOAD // 3, timeout_s=20)
        first.kill()  # SIGKILL, mid-drain: batches in flight or about to leave
        first.wait()
        assert await _ended(client) < WORKLOAD, "the drain ended before the kill: nothing tested"
        await procs.spawn()
        await _drain(client, ALL_RUNS, timeout_s=25)
        problems = await _check_workload(client, designed, ends, dead=first.pid)
        assert problems == [], "\n".join(problems[:30])
    finally:
        ends.close()


@pytest.mark.timeout(90)
async def test_a_worker_sigstopped_mid_drain_is_fenced_when_it_wakes(
    client: RedflowClient, procs_factory: Any, redis_url: str,
) -> None:
    """One of two workers is frozen (SIGSTOP) with batches pending, the other reaps it and drains;
    woken (SIGCONT) after its runs were taken, its pending step records and finishes are refused:
    every run ends once, no recorded step ran again except the zombie's own refused replays."""
    client.registry = proc_registry
    ends = await Ends(client).start()
    try:
        procs = procs_factory(redis_url)
        paused, other = await procs.spawn(), await procs.spawn()
        designed = await _enqueue_workload(client, WORKLOAD)
        await _drain(client, WORKLOAD // 3, timeout_s=20)
        paused.send_signal(signal.SIGSTOP)

        async def reaped() -> bool:
            cursor, keys = b"0", []
            while True:
                cursor, found = await client.redis.execute("SCAN", cursor, "MATCH",
                                                           f"{client.keys.base}:owned:*:{paused.pid}:*")
                keys += found
                if cursor == b"0":
                    break
            return all(n == 0 for n in await asyncio.gather(*(client.redis.execute("SCARD", k) for k in keys)))

        await wait_until(reaped, timeout_s=15, what="the paused worker's runs taken back")
        woke_at = time.time()
        paused.send_signal(signal.SIGCONT)
        await _drain(client, ALL_RUNS, timeout_s=25)
        problems = await _check_workload(client, designed, ends, zombie=(paused.pid, woke_at))
        assert problems == [], "\n".join(problems[:30])
        assert other.poll() is None and paused.poll() is None
    finally:
        ends.close()


@pytest.mark.timeout(90)
async def test_a_server_restart_mid_drain_loses_nothing_and_repeats_no_recorded_step(
    tmp_path: Path, prefix: str, procs_factory: Any,
) -> None:
    """The server is restarted (SIGTERM, AOF kept: no data lost) while a worker process drains: the
    batches on its connections fail, the scripts are gone (NOSCRIPT: sent again with EVAL), the runs
    are handed back and each ends once. The worker reaches the server through a proxy that refuses it
    until the ends are counted on a new subscription (endings published just before the shutdown may
    never reach the old one: runs already ended then may count 0, never 2)."""
    server = EmbeddedServer(data_dir=tmp_path / "data", appendonly=True).start()
    proxy = await FaultProxy("127.0.0.1", server.port).start()
    client = create_client(url=server.url, prefix=prefix)
    client.registry = proc_registry
    ends = await Ends(client).start()
    try:
        procs = procs_factory(proxy.url)
        await procs.spawn()
        designed = await _enqueue_workload(client, WORKLOAD)
        await _drain(client, WORKLOAD // 3, timeout_s=20)
        proxy.refuse = True  # the worker's reconnects wait until the server is back and counted
        server.stop()
        server.start()
        with contextlib.suppress(RedisError):  # the client's connection went with the server
            await client.redis.execute("PING")
        assert await client.redis.execute("SCRIPT", "EXISTS", client.store.scripts.scripts["finish_many"].sha) == [0]
        index = client.keys.index
        ended_before = set()
        for status in TERMINAL:
            for member in await client.redis.execute("ZRANGEBYLEX", index, f"[s:{status}:", f"[s:{status}:\xff"):
                ended_before.add(member.decode().rsplit(":", 1)[1])
        assert 0 < len(ended_before) < WORKLOAD, "the restart did not come mid-drain"
        before = ends
        before.close()
        ends = await Ends(client).start()
        proxy.refuse = False
        await _drain(client, ALL_RUNS, timeout_s=30)
        await ends.settle()
        again = sorted(i for i in ended_before if ends.counts[i])
        assert again == [], f"runs ended before the restart ended again: {again}"
        for i in ended_before:
            assert before.counts[i] <= 1
            ends.counts[i] = 1  # counted above: at most once, before the restart
        problems = await _check_workload(client, designed, ends)
        assert problems == [], "\n".join(problems[:30])
    finally:
        ends.close()
        await client.close()
        await proxy.close()
        server.stop()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_worker_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
