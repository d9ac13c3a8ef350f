"""Review of ca87f28 (running runs leave the status index; each workflow's running runs are counted in
the ``running`` hash; running runs are listed from the ``leases`` hash): tries to break "every change
of a run's status changes the count exactly once, so the count of each workflow is the number of its
running headers, and listing running runs gives each running run once".

The invariant is audited on atomic snapshots (one read-only EVAL reads runs, running, index and
leases together), taken continuously while real workers (in this process, or as processes of this
module: ``python -m tests.chaos.test_review_running_counts URL PREFIX LEASE_MS``) drive a workload
that goes through every script that changes a status: claim (run, admit, hook, promotion), admit
(throttle, rate limit, mutex), suspend (sleep, child, event, input), retry, release, reap, finish,
finish_many, cancel, requeue (operator retry, bulk retry), replay, debounce. Faults: SIGKILL and
SIGSTOP of worker processes, lost replies and cut connections (fault proxy), a server restart.
Nothing sleeps to synchronise: waits are on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from redflow import (
    ListRunsParams,
    RedflowClient,
    SearchRunsParams,
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
    start_worker,
    wait_for_input,
)
from redflow._redis.errors import RedisError
from redflow.embedded import EmbeddedServer
from redflow.storage.codes import Code
from redflow.storage.keys import tag
from redflow.storage.records import CronRecord, decode_header
from redflow.types import WorkflowDebounceOptions, WorkflowRateLimitOptions, WorkflowRetryPolicy

from ..conftest import wait_until
from .proxy import FaultProxy
from .worker_procs import WorkerProcs

TERMINAL = frozenset({"succeeded", "failed", "canceled"})

# --- the atomic audit ------------------------------------------------------------------------------

SNAPSHOT = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('ZRANGE', KEYS[3], 0, -1), redis.call('HKEYS', KEYS[4])}
"""


async def snapshot(client: RedflowClient) -> tuple[dict[str, Any], dict[str, int], set[bytes], set[str]]:
    k = client.keys
    runs, running, index, leases = await client.redis.execute(
        "EVAL", SNAPSHOT, 4, k.runs, k.running, k.index, k.leases)
    headers = {runs[i].decode(): decode_header(runs[i + 1]) for i in range(0, len(runs), 2)}
    counts = {running[i].decode(): int(running[i + 1]) for i in range(0, len(running), 2)}
    return headers, counts, set(index), {x.decode() for x in leases}


def violations(headers: dict[str, Any], counts: dict[str, int], index: set[bytes], leases: set[str]) -> list[str]:
    out: list[str] = []
    running = Counter(h.workflow for h in headers.values() if h.status == "running")
    if counts != dict(running):
        out.append(f"running counts {counts} != running headers {dict(running)}")
    out += [f"count of {w!r} is {n}" for w, n in counts.items() if n <= 0]
    expected: set[bytes] = set()
    for run_id, h in headers.items():
        if h.status == "running":
            if run_id not in leases:
                out.append(f"running run {run_id} ({h.workflow}) holds no lease: it is never listed")
            continue
        expected.add(f"s:{h.status}:{run_id}".encode())
        expected.add(f"ws:{tag(h.workflow)}{h.status}:{run_id}".encode())
    if index != expected:
        extra, missing = sorted(index - expected)[:5], sorted(expected - index)[:5]
        out.append(f"index disagrees with the headers: extra {extra}, missing {missing}")
    return out


async def audit(client: RedflowClient) -> list[str]:
    return violations(*await snapshot(client))


class Auditor:
    """Audits atomic snapshots in a loop until stopped; keeps the first violations seen."""

    def __init__(self, client: RedflowClient) -> None:
        self.client = client
        self.found: list[str] = []
        self.snapshots = 0
        self.saw_running = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Auditor:
        self._task = asyncio.ensure_future(self._loop())
        return self

    async def _loop(self) -> None:
        while True:
            try:
                shot = await snapshot(self.client)
            except (RedisError, OSError, ConnectionError):
                await asyncio.sleep(0.05)
                continue
            self.snapshots += 1
            self.saw_running += sum(1 for h in shot[0].values() if h.status == "running")
            if not self.found:
                self.found = violations(*shot)
            await asyncio.sleep(0.01)

    async def stop(self) -> list[str]:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.found


async def listed_running(client: RedflowClient, workflow: str | None = None, limit: int = 3,
                         sort: str = "desc") -> list[str]:
    """Every running run by cursor pages of ``limit``."""
    out: list[str] = []
    cursor = None
    while True:
        page = await client.list_runs(ListRunsParams(status="running", workflow=workflow, limit=limit,
                                                     cursor=cursor, sort=sort))  # type: ignore[arg-type]
        if not page:
            return out
        out += [r["id"] for r in page]
        cursor = page[-1]["cursor"]


# --- the workload: every script that changes a status -----------------------------------------------

RC = WorkflowRegistry()
RC_QUEUES = ["default", "rc-kids", "rc-cap"]


async def w_steps(ctx: WorkflowHandlerContext) -> int:
    a = await ctx.step.run("a", lambda: 1)
    await ctx.step.wait_for("nap", 30)  # suspend (sleep), then claim's promotion
    b = await ctx.step.run("b", lambda: 2)
    return a + b


async def w_flaky(ctx: WorkflowHandlerContext) -> str:
    if ctx.run.attempt == 1:
        raise ValueError("first attempt fails")  # retry.lua
    return "ok"


async def w_fail(ctx: WorkflowHandlerContext) -> None:
    raise ValueError("designed")


async def w_hook(ctx: Any) -> None:
    return None


async def w_parent(ctx: WorkflowHandlerContext) -> Any:
    return await ctx.step.run_workflow("kid", "rc-kid", ctx.input)  # suspend (child), resume_waiter


async def w_kid(ctx: WorkflowHandlerContext) -> Any:
    return await ctx.step.run("k", lambda: ctx.input)


async def w_quick(ctx: WorkflowHandlerContext) -> Any:
    return await ctx.step.run("q", lambda: ctx.input)


async def w_event(ctx: WorkflowHandlerContext) -> Any:
    got = await ctx.step.wait_for_event("e", "rc-ev", f"k{ctx.input}", 400)
    return None if got is None else got["id"]


async def w_input(ctx: WorkflowHandlerContext) -> Any:
    if ctx.resume is None:
        raise wait_for_input("more please")
    return "resumed"


async def w_slow(ctx: WorkflowHandlerContext) -> None:
    for i in range(40):
        await ctx.step.run(f"s{i}", lambda i=i: i)
        await asyncio.sleep(0.01)


define_workflow("rc-steps", handler=w_steps, registry=RC)
define_workflow("rc-flaky", handler=w_flaky, registry=RC, retries=WorkflowRetryPolicy(max_attempts=3, delay=20))
define_workflow("rc-fail", handler=w_fail, registry=RC, max_attempts=1, on_failure=w_hook)
define_workflow("rc-parent", handler=w_parent, registry=RC)
define_workflow("rc-kid", handler=w_kid, registry=RC, queue="rc-kids")
define_workflow("rc-capped", handler=w_quick, registry=RC, max_concurrency=2)
define_workflow("rc-mutex", handler=w_quick, registry=RC, mutex=lambda i: f"m{i % 2}")
define_workflow("rc-throttle", handler=w_quick, registry=RC,
                throttle=WorkflowRateLimitOptions(key=lambda i: "t", limit=4, period=150))
define_workflow("rc-rate", handler=w_quick, registry=RC, max_attempts=1,
                rate_limit=WorkflowRateLimitOptions(key=lambda i: "r", limit=2, period=60_000))
define_workflow("rc-event", handler=w_event, registry=RC)
define_workflow("rc-input", handler=w_input, registry=RC)
define_workflow("rc-slow", handler=w_slow, registry=RC)
define_workflow("rc-debounced", handler=w_quick, registry=RC,
                debounce=WorkflowDebounceOptions(key=lambda i: f"d{i % 2}", period=20))
# Names built to collide with the member encoding: ':' and 'running' inside, one a prefix of another.
define_workflow("a:running", handler=w_slow, registry=RC)
define_workflow("a:running:", handler=w_slow, registry=RC, max_concurrency=3)
define_workflow("running", handler=w_quick, registry=RC)
define_workflow("5:a", handler=w_quick, registry=RC)


async def enqueue_workload(client: RedflowClient, rounds: int) -> list[str]:
    ids: list[str] = []
    for i in range(rounds):
        for name, queue in (("rc-steps", None), ("rc-flaky", None), ("rc-fail", None), ("rc-parent", None),
                            ("rc-capped", None), ("rc-capped", "rc-cap"), ("rc-mutex", None),
                            ("rc-mutex", "rc-cap"), ("rc-throttle", None), ("rc-rate", None),
                            ("rc-event", None), ("rc-input", None), ("rc-slow", None),
                            ("a:running", None), ("a:running:", None), ("running", None), ("5:a", None)):
            ids.append((await client.run_by_name(name, i, queue_override=queue)).id)
        for j in range(3):  # debounce.lua: the later calls move the bound run
            ids.append((await client.enqueue_definition(RC.get("rc-debounced"), i + j)).id)
    return list(dict.fromkeys(ids))


async def statuses(client: RedflowClient, ids: list[str]) -> dict[str, str]:
    headers = await client.store.read_headers(ids)
    return {i: (h.status if h else "gone") for i, h in zip(ids, headers, strict=True)}


async def drive(client: RedflowClient, ids: list[str], timeout_s: float) -> None:
    """Pokes the waiting runs (events, inputs, cancels, operator retries) until every run has ended
    and nothing holds a lease."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    poked: set[str] = set()
    retried: set[str] = set()
    inputs = 0
    while True:
        st = await statuses(client, ids)
        headers = dict(zip(ids, await client.store.read_headers(ids), strict=True))
        for run_id, h in headers.items():
            if h is None or run_id in poked:
                continue
            if h.workflow == "rc-event" and h.status == "scheduled":
                poked.add(run_id)
                with contextlib.suppress(RedisError):
                    await client.emit_event("rc-ev", {"n": 1}, correlation_key=f"k{h.attempt and 0}")
                    await client.emit_event("rc-ev", {"n": 1}, correlation_key=f"k{len(poked) % 3}")
            elif h.workflow == "rc-input" and h.status == "scheduled":
                poked.add(run_id)
                inputs += 1
                if inputs % 2:
                    await client.resume_run(run_id, {"x": 1})
                else:
                    await client.cancel_run(run_id, reason="review")
            elif h.workflow in ("rc-slow", "a:running") and h.status == "running" and len(poked) % 3 == 0:
                poked.add(run_id)
                await client.cancel_run(run_id, reason="while running")
        # Operator retries of ended runs (requeue.lua), once each, while the rest still runs.
        for run_id, s in st.items():
            h = headers[run_id]
            if s == "failed" and run_id not in retried and h is not None and not h.hook_pending and not h.owner \
                    and h.workflow in ("rc-fail", "rc-rate"):
                retried.add(run_id)
                with contextlib.suppress(Exception):
                    await client.retry_run(run_id)
        if all(s in TERMINAL for s in st.values()) and await client.redis.execute("HLEN", client.keys.leases) == 0:
            return
        if loop.time() > deadline:
            left = Counter(f"{headers[i].workflow}:{s}" for i, s in st.items() if s not in TERMINAL and headers[i])
            raise AssertionError(f"the workload did not drain: {left}")
        await asyncio.sleep(0.02)


# --- worker processes ------------------------------------------------------------------------------


async def _worker_main(url: str, prefix: str, lease_ms: int) -> None:
    worker = await start_worker(StartWorkerOptions(
        app="rc-proc", url=url, prefix=prefix, registry=RC, concurrency=12, lease_ms=lease_ms,
        grace_period_ms=2000, queues=RC_QUEUES, blmove_timeout_sec=1.0, watchdog_stalled_for_ms=1000,
    ))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()


class Procs(WorkerProcs):
    def __init__(self, url: str, prefix: str, logs: Path) -> None:
        super().__init__("tests.chaos.test_review_running_counts", url, prefix, logs)

    async def spawn(self, lease_ms: int = 1200) -> subprocess.Popen[str]:
        return await self.start(str(lease_ms))


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


async def some_running(client: RedflowClient, n: int = 3) -> bool:
    return sum(int(x) for x in await client.redis.execute("HVALS", client.keys.running)) >= n


async def ended(client: RedflowClient, ids: list[str]) -> int:
    return sum(1 for s in (await statuses(client, ids)).values() if s in TERMINAL)


async def final_checks(client: RedflowClient) -> None:
    assert await audit(client) == []
    assert await client.redis.execute("HLEN", client.keys.running) == 0
    assert await listed_running(client) == []
    assert (await client.get_stats())["by_status"]["running"] == 0


# --- 1. every status-changing script, in one worker, audited continuously ----------------------------


@pytest.mark.timeout(60)
async def test_every_transition_keeps_the_counts_exact(client: RedflowClient, make_worker: Any) -> None:
    client.registry = RC
    auditor = Auditor(client).start()
    try:
        first = await make_worker(registry=RC, concurrency=10, queues=RC_QUEUES, lease_ms=2000)
        ids = await enqueue_workload(client, 3)
        await wait_until(lambda: some_running(client, 2), what="runs running")
        listed = await listed_running(client, limit=2)
        assert len(listed) == len(set(listed))
        await first.stop(grace_period_ms=0)  # release.lua: the runs it holds go back to their queues
        assert await audit(client) == []
        await make_worker(registry=RC, concurrency=10, queues=RC_QUEUES, lease_ms=2000)
        await drive(client, ids, timeout_s=35)
        replayed = [(await client.replay_run(i)).id for i in ids[:6]]
        await client.retry_runs({"workflow": "rc-fail"})
        ids += replayed
        await drive(client, ids, timeout_s=15)
        found = await auditor.stop()
        assert auditor.saw_running > 0 and auditor.snapshots > 10
        assert found == [], "\n".join(found)
        await final_checks(client)
    finally:
        await auditor.stop()


# --- 2. worker processes SIGKILLed and SIGSTOPped mid-drain ----------------------------------------


@pytest.mark.timeout(60)
async def test_killed_and_paused_workers_leave_exact_counts(
    client: RedflowClient, procs_factory: Any, redis_url: str,
) -> None:
    client.registry = RC
    procs = procs_factory(redis_url)
    killed, paused = await procs.spawn(), await procs.spawn()
    auditor = Auditor(client).start()
    try:
        ids = await enqueue_workload(client, 3)
        await wait_until(lambda: some_running(client, 4), timeout_s=15, what="runs running")
        killed.kill()  # SIGKILL: its runs stay running (counted) until the reaper takes them back
        paused.send_signal(signal.SIGSTOP)
        assert await audit(client) == []
        await procs.spawn()
        await wait_until(lambda: ended(client, ids), timeout_s=15, what="runs ending after the faults")
        paused.send_signal(signal.SIGCONT)  # a zombie: its late writes are fenced
        await drive(client, ids, timeout_s=35)
        found = await auditor.stop()
        assert found == [], "\n".join(found)
        await final_checks(client)
    finally:
        await auditor.stop()


# --- 3. lost replies and cut connections ------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_lost_replies_and_cut_connections_leave_exact_counts(
    client: RedflowClient, proxy: FaultProxy, prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker talks through the proxy, which drops replies (the scripts ran; the worker sends
    again or gives the run up) and cuts connections mid-call, over and over."""
    monkeypatch.setenv("REDFLOW_COMMAND_TIMEOUT_MS", "700")
    client.registry = RC
    worker = await start_worker(StartWorkerOptions(
        app="rc-proxied", url=proxy.url, prefix=prefix, registry=RC, concurrency=10, lease_ms=1500,
        queues=RC_QUEUES, blmove_timeout_sec=0.5, grace_period_ms=0,
    ))
    auditor = Auditor(client).start()
    try:
        ids = await enqueue_workload(client, 2)
        faults = 0
        loop = asyncio.get_running_loop()
        until = loop.time() + 6
        while loop.time() < until:
            await wait_until(lambda: some_running(client, 1), timeout_s=10, what="a run running")
            faults += proxy.drop_replies() if faults % 2 == 0 else proxy.cut()
            await asyncio.sleep(0.3)  # spacing of the faults, not a synchronisation
        assert faults > 0
        await drive(client, ids, timeout_s=40)
        found = await auditor.stop()
        assert found == [], "\n".join(found)
        await final_checks(client)
    finally:
        await auditor.stop()
        await worker.stop(grace_period_ms=0)


# --- 4. a server restart mid-drain ------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_server_restart_leaves_exact_counts(tmp_path: Path, prefix: str) -> None:
    server = EmbeddedServer(data_dir=tmp_path / "data", appendonly=True).start()
    client = create_client(url=server.url, prefix=prefix)
    client.registry = RC
    worker = None
    try:
        worker = await start_worker(StartWorkerOptions(
            app="rc-restart", url=server.url, prefix=prefix, registry=RC, concurrency=10, lease_ms=1500,
            queues=RC_QUEUES, blmove_timeout_sec=0.5, grace_period_ms=0,
        ))
        ids = await enqueue_workload(client, 2)
        await wait_until(lambda: some_running(client, 2), timeout_s=10, what="runs running")
        server.stop()
        server.start()
        for _ in range(50):
            with contextlib.suppress(RedisError, OSError):
                await client.redis.execute("PING")
                break
        assert await audit(client) == []  # what the AOF kept is consistent
        await drive(client, ids, timeout_s=40)
        await final_checks(client)
    finally:
        if worker is not None:
            await worker.stop(grace_period_ms=0)
        await client.close()
        server.stop()


# --- 5. max_concurrency changed while runs are running -----------------------------------------------


@pytest.mark.timeout(30)
async def test_lowering_and_removing_max_concurrency_while_runs_run(
    client: RedflowClient, redis_url: str, prefix: str,
) -> None:
    gate = asyncio.Event()
    now = peak_after = 0
    lowered = False

    async def gated(ctx: WorkflowHandlerContext) -> None:
        nonlocal now, peak_after
        now += 1
        if lowered:
            peak_after = max(peak_after, now)
        try:
            await gate.wait()
        finally:
            now -= 1

    wide, narrow, free = WorkflowRegistry(), WorkflowRegistry(), WorkflowRegistry()
    wf = define_workflow("rc-limit", handler=gated, registry=wide, max_concurrency=4)
    define_workflow("rc-limit", handler=gated, registry=narrow, max_concurrency=1)
    define_workflow("rc-limit", handler=gated, registry=free)
    workers = [await start_worker(StartWorkerOptions(app="rc", url=redis_url, prefix=prefix, registry=wide,
                                                     concurrency=10))]
    try:
        handles = [await client.enqueue_definition(wf, i) for i in range(8)]

        async def counts() -> dict[str, int]:
            return (await snapshot(client))[1]

        await wait_until(lambda: _eq(counts(), {"rc-limit": 4}), what="4 running under the limit of 4")
        lowered = True
        workers.append(await start_worker(StartWorkerOptions(app="rc", url=redis_url, prefix=prefix,
                                                             registry=narrow, concurrency=10)))
        assert await client.redis.execute("HGET", client.keys.limits, "rc-limit") == b"1"
        assert await audit(client) == []
        explained = await client.explain_run(handles[-1].id)
        assert explained["reason"] == "held_capacity" and explained["details"]["running"] == 4
        gate.set()
        gate = asyncio.Event()  # the next runs block again
        await wait_until(lambda: _eq(counts(), {"rc-limit": 1}), what="one run under the limit of 1")
        assert await audit(client) == []
        # The limit removed: the held runs start once a run stops (free = 100 in plan), all of them.
        workers.append(await start_worker(StartWorkerOptions(app="rc", url=redis_url, prefix=prefix,
                                                             registry=free, concurrency=10)))
        assert await client.redis.execute("HGET", client.keys.limits, "rc-limit") is None
        gate.set()
        for h in handles:
            await h.result(timeout_ms=10_000)
        assert peak_after >= 1
        await final_checks(client)
    finally:
        gate.set()
        for w in workers:
            await w.stop(grace_period_ms=0)


async def _eq(value: Any, want: Any) -> bool:
    return await value == want


# --- 6. listing running runs by cursor, names that look like the encoding --------------------------


@pytest.mark.timeout(30)
async def test_paging_running_runs_while_others_start_and_finish(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: Any,
) -> None:
    """A stable set of running runs (blocked) is paged by cursor, both directions, with and without a
    workflow filter, while other runs start and finish around it: each stable run appears exactly
    once in every page sequence, in order, and no run of another workflow leaks into a filter."""
    hold = asyncio.Event()

    async def blocked(ctx: WorkflowHandlerContext) -> None:
        await hold.wait()

    async def churn(ctx: WorkflowHandlerContext) -> None:
        await ctx.step.run("x", lambda: 1)

    names = ["a:running", "a:running:", "running", "5:a", "a", "ab"]
    stable_by: dict[str, list[str]] = {}
    defs = {n: define_workflow(n, handler=blocked, registry=registry) for n in names}
    churner = define_workflow("rc-churn", handler=churn, registry=registry)
    await make_worker(concurrency=40)
    for n, d in defs.items():
        stable_by[n] = [(await client.enqueue_definition(d, i)).id for i in range(3)]
    stable = sorted(i for ids in stable_by.values() for i in ids)

    async def all_stable_running() -> bool:
        return set((await statuses(client, stable)).values()) == {"running"}

    await wait_until(all_stable_running, what="the stable runs running")
    stop = asyncio.Event()

    async def keep_churning() -> None:
        while not stop.is_set():
            hs = [await client.enqueue_definition(churner, i) for i in range(4)]
            for h in hs:
                await h.result(timeout_ms=10_000)

    task = asyncio.ensure_future(keep_churning())
    try:
        for _ in range(5):
            for sort in ("desc", "asc"):
                for limit in (1, 2, 5):
                    got = [i for i in await listed_running(client, limit=limit, sort=sort) if i in set(stable)]
                    assert got == (stable if sort == "asc" else stable[::-1])
                    for n in names:
                        only = await listed_running(client, workflow=n, limit=limit, sort=sort)
                        want = sorted(stable_by[n])
                        assert only == (want if sort == "asc" else want[::-1]), n
        counts = (await snapshot(client))[1]
        assert all(counts[n] == 3 for n in names)
        for n in names:
            found = await client.search_runs(SearchRunsParams(status="running", workflow=n, query=n[:1]))
            assert sorted(r["id"] for r in found["runs"]) == sorted(stable_by[n])
            everything = [r["id"] for r in await client.list_runs(ListRunsParams(workflow=n, limit=100))]
            assert everything == sorted(stable_by[n], reverse=True)
    finally:
        stop.set()
        await task
        hold.set()
    for ids in stable_by.values():
        for i in ids:
            await client.make_run_handle(i).result(timeout_ms=10_000)
    await final_checks(client)


@pytest.mark.timeout(30)
async def test_bulk_cancel_of_running_runs_reaches_every_running_run(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: Any,
) -> None:
    """Bulk cancel pages the running runs from the leases by cursor (BULK_BATCH at a time)."""
    async def blocked(ctx: WorkflowHandlerContext) -> None:
        await asyncio.Event().wait()

    wf = define_workflow("rc-bulk", handler=blocked, registry=registry)
    other = define_workflow("rc-bulk-other", handler=blocked, registry=registry)
    await make_worker(concurrency=60)
    ids = [(await client.enqueue_definition(wf, i)).id for i in range(40)]
    others = [(await client.enqueue_definition(other, i)).id for i in range(5)]
    await wait_until(lambda: _eq(_status_set(client, ids + others), {"running"}), what="all running")
    result = await client.cancel_runs({"workflow": "rc-bulk", "status": "running"})
    assert result["matched"] == 40 and result["done"] == 40
    await wait_until(lambda: _eq(_status_set(client, ids), {"canceled"}), what="all canceled")
    assert set((await statuses(client, others)).values()) == {"running"}
    assert (await snapshot(client))[1] == {"rc-bulk-other": 5}
    assert await audit(client) == []
    for i in others:
        await client.cancel_run(i)
    await wait_until(lambda: _eq(_status_set(client, others), {"canceled"}), what="the others canceled")
    await final_checks(client)


async def _status_set(client: RedflowClient, ids: list[str]) -> set[str]:
    return set((await statuses(client, ids)).values())


# --- 7. cron overlap reads the count ------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_cron_overlap_reads_the_running_count(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: Any,
) -> None:
    gate = asyncio.Event()

    async def blocked(ctx: WorkflowHandlerContext) -> None:
        await gate.wait()

    wf = define_workflow("rc:cron:running", handler=blocked, registry=registry)
    await make_worker(concurrency=4)
    hs = [await client.enqueue_definition(wf, i) for i in range(2)]
    await wait_until(lambda: _eq(_status_set(client, [h.id for h in hs]), {"running"}), what="2 running")
    events = client.events
    record = CronRecord(workflow="rc:cron:running", queue="default", expression="* * * * *", max_concurrency=2)
    from redflow.ids import new_run_id
    assert await events.cron_fire("t1", 1000, new_run_id("p0"), record) == Code.OK  # skipped at 2 of 2
    record3 = CronRecord(workflow="rc:cron:running", queue="default", expression="* * * * *", max_concurrency=3)
    assert await events.cron_fire("t1", 2000, new_run_id("p0"), record3) == Code.CREATED
    gate.set()
    await wait_until(lambda: _eq(client.redis.execute("HLEN", client.keys.running), 0), what="all done")
    await final_checks(client)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_worker_main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
