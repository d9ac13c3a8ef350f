"""Review of the hand-on to damaged held runs (transitions.lua readable_run / move_aside /
next_in_line, admit.lua): headers that decode to something other than a map, long runs of damaged
members, groups with max_concurrency > 1, cancels handing on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRateLimitOptions, WorkflowRegistry, define_workflow

from ..conftest import WorkerFactory, wait_until
from ..partitioned import keys_of

pytestmark = pytest.mark.usefixtures("one_partition")

NOT_MSGPACK = b"\xc1"


async def _status(client: RedflowClient, run_id: str, status: str) -> bool:
    return (await client.get_run(run_id))["status"] == status


async def _zcard(client: RedflowClient, key: str, n: int) -> bool:
    return bool(await client.redis.execute("ZCARD", key) == n)


async def _held_in_order(client: RedflowClient, key: str, kind: str) -> list[bytes]:
    return await client.redis.execute("ZRANGEBYLEX", key, f"[{kind}:", f"[{kind}:\xff")


# MessagePack values a damaged header may decode to: an integer, a boolean, a string, an empty map,
# a map whose q is a number, nil. readable_run indexes r.q outside its pcall.
@pytest.mark.parametrize(
    "damaged",
    [b"\x05", b"\xc3", b"\xa3abc", b"\x80", b"\x81\xa1q\x05", b"\xc0"],
    ids=["int", "true", "str", "empty-map", "q-int", "nil"],
)
async def test_a_held_run_whose_header_decodes_to_a_non_header_does_not_fail_the_finish(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, damaged: bytes,
) -> None:
    gate = asyncio.Event()

    async def gated(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input == 0:
            await gate.wait()
        return ctx.input

    define_workflow("rv-odd", handler=gated, registry=registry, max_concurrency=1)
    first = await client.run_by_name("rv-odd", 0)
    keys = keys_of(client, first.id)
    await make_worker(concurrency=5)
    await wait_until(lambda: _status(client, first.id, "running"), what="the first run running")
    bad, good = [await client.run_by_name("rv-odd", n) for n in (1, 2)]
    await wait_until(lambda: _zcard(client, keys.held, 2), what="both later runs held")
    await client.redis.execute("HSET", keys.runs, bad.id, damaged)
    gate.set()
    assert await first.result(timeout_ms=8_000) == 0
    assert await good.result(timeout_ms=8_000) == 2
    assert await client.redis.execute("ZCARD", keys.held) == 0


@pytest.mark.parametrize(
    "damaged", [b"\x05", b"\xc3"], ids=["int", "true"],
)
async def test_a_child_whose_waiting_parent_decodes_to_a_non_map_still_finishes(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, damaged: bytes,
) -> None:
    """plan's parents path uses readable_run too: a parent decoding to a number fails its child's finish."""
    gate = asyncio.Event()

    async def child(ctx: WorkflowHandlerContext) -> Any:
        await gate.wait()
        return 7

    define_workflow("rv-child", handler=child, registry=registry)

    async def parent(ctx: WorkflowHandlerContext) -> Any:
        return await ctx.step.run_workflow("call", "rv-child", None)

    define_workflow("rv-parent", handler=parent, registry=registry)
    p = await client.run_by_name("rv-parent", None)
    keys = keys_of(client, p.id)
    await make_worker(concurrency=5)
    await wait_until(lambda: _parent_waiting(client, keys), what="parent waiting")
    children = [r for r in await client.redis.execute("HKEYS", keys.runs) if r.decode() != p.id]
    assert len(children) == 1
    cid = children[0].decode()
    await client.redis.execute("HSET", keys.runs, p.id, damaged)
    gate.set()
    await wait_until(lambda: _status(client, cid, "succeeded"), timeout_s=8, what="the child finished")


async def _parent_waiting(client: RedflowClient, keys: Any) -> bool:
    return bool(await client.redis.execute("HLEN", keys.waits))


@pytest.mark.parametrize("limit", ["max_concurrency", "mutex"])
async def test_more_damaged_held_runs_than_damaged_max_do_not_strand_the_readable_run_behind_them(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, limit: str,
) -> None:
    """12 damaged held runs, then a readable one: one finish moves at most DAMAGED_MAX aside. The slot
    (or mutex) is then free, yet the readable run stays held until some other run of the group stops
    running, which may never happen."""
    gate = asyncio.Event()

    async def gated(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input == 0:
            await gate.wait()
        return ctx.input

    options: dict[str, Any] = {"max_concurrency": 1} if limit == "max_concurrency" else {"mutex": lambda _: "one"}
    define_workflow("rv-many", handler=gated, registry=registry, **options)
    first = await client.run_by_name("rv-many", 0)
    keys = keys_of(client, first.id)
    await make_worker(concurrency=5)
    await wait_until(lambda: _status(client, first.id, "running"), what="the first run running")
    later = [await client.run_by_name("rv-many", n) for n in range(1, 14)]
    await wait_until(lambda: _zcard(client, keys.held, 13), what="13 runs held")
    kind = "c" if limit == "max_concurrency" else "m"
    members = await _held_in_order(client, keys.held, kind)
    by_id = {h.id: h for h in later}
    ordered = [by_id[m.decode().rsplit(":", 1)[1]] for m in members]
    for h in ordered[:12]:
        await client.redis.execute("HSET", keys.runs, h.id, NOT_MSGPACK)
    gate.set()
    assert await first.result(timeout_ms=8_000) == 0
    assert await ordered[12].result(timeout_ms=8_000) == later.index(ordered[12]) + 1


async def test_a_damaged_held_run_under_max_concurrency_two(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    gates = {0: asyncio.Event(), 1: asyncio.Event()}

    async def gated(ctx: WorkflowHandlerContext) -> Any:
        if ctx.input in gates:
            await gates[ctx.input].wait()
        return ctx.input

    define_workflow("rv-two", handler=gated, registry=registry, max_concurrency=2)
    a, b = [await client.run_by_name("rv-two", n) for n in (0, 1)]
    keys = keys_of(client, a.id)
    await make_worker(concurrency=5)
    await wait_until(lambda: _status(client, a.id, "running"), what="a running")
    await wait_until(lambda: _status(client, b.id, "running"), what="b running")
    later = [await client.run_by_name("rv-two", n) for n in range(2, 6)]
    await wait_until(lambda: _zcard(client, keys.held, 4), what="4 held")
    members = await _held_in_order(client, keys.held, "c")
    by_id = {h.id: h for h in later}
    ordered = [by_id[m.decode().rsplit(":", 1)[1]] for m in members]
    bad = {ordered[0].id, ordered[2].id}
    for run_id in bad:
        await client.redis.execute("HSET", keys.runs, run_id, NOT_MSGPACK)
    gates[0].set()
    gates[1].set()  # both finish, possibly in one finish_many call
    for h in later:
        if h.id not in bad:
            assert await h.result(timeout_ms=8_000) == later.index(h) + 2
    assert await client.redis.execute("ZCARD", keys.held) == 0
    ready = await client.redis.execute("LRANGE", keys.ready("default"), 0, -1)
    assert sorted(ready) == sorted(r.encode() for r in bad)


async def test_more_damaged_throttled_runs_than_damaged_max_do_not_block_the_throttle_key(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    """13 runs waiting in a throttle line behind the head, the first 12 damaged: the head's admission
    moves DAMAGED_MAX aside and wakes nobody; the damaged 12th is the new head, which nothing will
    ever admit or hand on, so the key's line (and every later run of the key) is stuck."""
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    define_workflow("rv-thr", handler=echo, registry=registry,
                    throttle=WorkflowRateLimitOptions(key=lambda _: "k", limit=1, period="1s"))
    handles = [await client.run_by_name("rv-thr", n) for n in range(15)]
    keys = keys_of(client, handles[0].id)
    by_id = {h.id: h for h in handles}
    await make_worker(concurrency=20)
    # the first is admitted at once; the other 14 wait in the line, the head scheduled for the window
    await wait_until(lambda: _count(_held_in_order(client, keys.held, "t"), 14), what="14 in the line")
    line = [by_id[m.decode().rsplit(":", 1)[1]] for m in await _held_in_order(client, keys.held, "t")]
    for h in line[1:13]:
        await client.redis.execute("HSET", keys.runs, h.id, NOT_MSGPACK)
    assert await line[0].result(timeout_ms=8_000) == handles.index(line[0])
    assert await line[13].result(timeout_ms=8_000) == handles.index(line[13])
    extra = await client.run_by_name("rv-thr", 99)
    assert await extra.result(timeout_ms=8_000) == 99


async def _count(members: Any, n: int) -> bool:
    return len(await members) == n


async def test_cancel_of_a_throttled_head_hands_on_past_a_damaged_run(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
) -> None:
    async def echo(ctx: WorkflowHandlerContext) -> Any:
        return ctx.input

    define_workflow("rv-thr-c", handler=echo, registry=registry,
                    throttle=WorkflowRateLimitOptions(key=lambda _: "k", limit=1, period="2s"))
    handles = [await client.run_by_name("rv-thr-c", n) for n in range(4)]
    keys = keys_of(client, handles[0].id)
    by_id = {h.id: h for h in handles}
    await make_worker(concurrency=5)
    await wait_until(lambda: _count(_held_in_order(client, keys.held, "t"), 3), what="3 in the line")
    line = [by_id[m.decode().rsplit(":", 1)[1]] for m in await _held_in_order(client, keys.held, "t")]
    await client.redis.execute("HSET", keys.runs, line[1].id, NOT_MSGPACK)
    await client.cancel_run(line[0].id)
    await wait_until(lambda: _status(client, line[0].id, "canceled"), what="the head canceled")
    assert await line[2].result(timeout_ms=8_000) == handles.index(line[2])
    assert await client.redis.execute("LRANGE", keys.ready("default"), 0, -1) == [line[1].id.encode()]
