"""Transitions of one loop tick leave in one call, each decided as alone. Finishes
(``finish_many.lua``): a stale token, a run already ended, a cancel request, a failure with a hook, a
stream to close, a held run to hand on to another queue, parents waiting on the children. Step records
(``step_many.lua``): a stale token, a run no longer running, two records of one run in order.

A batch is one partition's: with several partitions, each test places its runs in one of them
(``pin_spread``), p0 when a limited workflow's runs (always in p0) are in the batch, else the last."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from redflow import ListRunsParams, RedflowClient, WorkflowRegistry, define_workflow
from redflow.storage.batches import FinishRequest
from redflow.storage.codes import Code
from redflow.storage.records import StepRecord, encode_step

from ..batch_helpers import claim_batch, noop, pinned

LONG = 600_000


async def test_every_run_of_a_batch_ends_as_it_would_alone(
    client: RedflowClient, registry: WorkflowRegistry, calls: dict[str, int]
) -> None:
    plain = define_workflow("fb-plain", handler=noop, registry=registry)
    capped = define_workflow("fb-capped", handler=noop, registry=registry, max_concurrency=1)
    await client.sync_registry()
    store = await pinned(client, 0)  # with `capped`'s runs, in p0
    await store.heartbeat("w", LONG, LONG, False)
    ok, stale, ended, canceled, hooked, streamed = [await client.enqueue_definition(plain, i) for i in range(6)]
    first = await client.enqueue_definition(capped, "first")
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 10)}
    assert len(tokens) == 7
    second = await client.run_by_name(capped.name, "second", queue_override="other")
    assert await claim_batch(store, "other", 1) == []  # held: its workflow's one slot is taken by `first`
    assert await client.redis.execute("ZCARD", store.keys.held) == 1

    assert await store.finish_one(FinishRequest(ended.id, tokens[ended.id], "w", "succeeded", b"1", False, LONG,
                                                "default")) == (Code.OK, "succeeded")
    assert await client.cancel_run(canceled.id) is True
    assert (await store.stream_write(streamed.id, tokens[streamed.id], 1, b'"v"', LONG, 100))[0] is Code.OK
    calls["one"] = 0

    def finish(run_id: str, status: str = "succeeded", payload: bytes = b"1", hook: bool = False,
               token: bytes | None = None, queue: str = "default"):  # type: ignore[no-untyped-def]
        return store.finish(run_id, tokens[run_id] if token is None else token, "w", status, payload, hook, LONG,
                            queue)

    replies = await asyncio.gather(
        finish(ok.id), finish(stale.id, token=b"not-the-token"), finish(ended.id), finish(canceled.id),
        finish(hooked.id, "failed", b'{"message":"boom"}', hook=True), finish(streamed.id), finish(first.id),
    )
    assert replies == [
        (Code.OK, "succeeded"), (Code.STALE, ""), (Code.STALE, ""), (Code.OK, "canceled"), (Code.OK, "failed"),
        (Code.OK, "succeeded"), (Code.OK, "succeeded"),
    ]
    # One call for the seven; `first` had a held run to hand on to a queue the call did not name, so it
    # was finished alone after the batch left it untouched.
    assert calls == {"many": 1, "one": 1}

    states = {h.id: await client.get_run(h.id) for h in (ok, stale, canceled, hooked, streamed, first, second)}
    assert {i: s["status"] for i, s in states.items() if s} == {
        ok.id: "succeeded", stale.id: "running", canceled.id: "canceled", hooked.id: "failed",
        streamed.id: "succeeded", first.id: "succeeded", second.id: "queued",
    }
    assert states[ok.id]["output"] == 1  # type: ignore[index]
    owned = {m.decode() for m in await client.redis.execute("SMEMBERS", store.keys.owned("w"))}
    assert owned == {stale.id, hooked.id}  # a failure whose hook must run stays owned until it ran
    assert await client.redis.execute("ZCARD", store.keys.held) == 0
    assert await client.redis.execute("LRANGE", store.keys.ready("other"), 0, -1) == [second.id.encode()]
    entries = await client.redis.execute("XRANGE", store.keys.stream(streamed.id), "-", "+")
    assert len(entries) == 2 and entries[-1][1][:2] == [b"end", b"succeeded"]  # readers learn it ended


async def test_parents_waiting_on_children_finished_in_one_batch_are_all_resumed(
    client: RedflowClient, registry: WorkflowRegistry, calls: dict[str, int]
) -> None:
    parent = define_workflow("fb-parent", handler=noop, registry=registry)
    child = define_workflow("fb-child", handler=noop, queue="kids", registry=registry)
    store = await pinned(client, -1)  # the children are created in their parents' partition
    await store.heartbeat("w", LONG, LONG, False)
    parents = [await client.enqueue_definition(parent, i) for i in range(3)]
    ptokens = {r.id: r.token for r in await claim_batch(store, "default", 3)}
    kids = []
    for p in parents:
        kid = await client.run_by_name(child.name, None, parent_run_id=p.id)
        code, _, _ = await store.suspend(p.id, ptokens[p.id], "w", "default", "kid", 1, "child", child_id=kid.id)
        assert code is Code.OK
        kids.append(kid)
    ktokens = {r.id: r.token for r in await claim_batch(store, "kids", 3)}
    outs = [json.dumps({"kid": i}).encode() for i in range(3)]
    replies = await asyncio.gather(*(
        store.finish(kid.id, ktokens[kid.id], "w", "succeeded", out, False, LONG, "kids")
        for kid, out in zip(kids, outs, strict=True)
    ))
    assert replies == [(Code.OK, "succeeded")] * 3
    assert calls["many"] == 1
    resumed = {r.id: r for r in await claim_batch(store, "default", 10)}
    assert set(resumed) == {p.id for p in parents}
    for p, out in zip(parents, outs, strict=True):
        assert [s.resolution for s in resumed[p.id].steps] == ["succeeded"]
        assert bytes(resumed[p.id].steps[0].output) == out


async def test_runs_of_a_capped_workflow_ended_in_one_batch_release_as_many_held_runs(
    client: RedflowClient, registry: WorkflowRegistry, calls: dict[str, int]
) -> None:
    """The running count drops once per call, but before a later run of the call reads it: two runs
    of a workflow capped at 2 ending together hand both slots on, and every deferred write (output,
    index members, retention deadline, owned set) is there after the call."""
    capped = define_workflow("fb-cap2", handler=noop, registry=registry, max_concurrency=2)
    plain = define_workflow("fb-plain2", handler=noop, registry=registry)
    await client.sync_registry()
    store = await pinned(client, 0)  # with `capped`'s runs, in p0
    await store.heartbeat("w", LONG, LONG, False)
    running = [await client.enqueue_definition(capped, i) for i in range(2)]
    other = await client.enqueue_definition(plain, "p")
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 10)}
    assert set(tokens) == {r.id for r in (*running, other)}
    held = [await client.run_by_name(capped.name, i, queue_override="default") for i in range(3)]
    assert await claim_batch(store, "default", 10) == []
    assert await client.redis.execute("ZCARD", store.keys.held) == 3
    calls["many"] = calls["one"] = 0

    replies = await asyncio.gather(*(
        store.finish(r.id, tokens[r.id], "w", "succeeded", b"7", False, LONG, "default") for r in (*running, other)
    ))
    assert replies == [(Code.OK, "succeeded")] * 3
    assert calls == {"many": 1, "one": 0}
    assert await client.redis.execute("HGET", store.keys.running, capped.name) is None
    assert await client.redis.execute("HGET", store.keys.running, plain.name) is None
    # Each ending hands on what its slot frees as it sees the count: the first one slot, the second
    # (the first no longer counted) two; the claim then starts two and holds the third again.
    assert await client.redis.execute("ZCARD", store.keys.held) == 0
    released = [m.decode() for m in await client.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)]
    assert sorted(released) == sorted(h.id for h in held)
    assert len(await claim_batch(store, "default", 10)) == 2
    assert await client.redis.execute("ZCARD", store.keys.held) == 1
    assert await client.redis.execute("HGET", store.keys.running, capped.name) == b"2"
    assert {m.decode() for m in await client.redis.execute("SMEMBERS", store.keys.owned("w"))} <= {h.id for h in held}
    for r in (*running, other):
        state = await client.get_run(r.id)
        assert state is not None and state["status"] == "succeeded" and state["output"] == 7
        assert await client.redis.execute("ZSCORE", store.keys.expiry, r.id) is not None
    listed = await client.list_runs(ListRunsParams(status="succeeded", workflow=capped.name))
    assert {r["id"] for r in listed} == {r.id for r in running}


async def test_step_records_of_one_tick_are_decided_each_as_alone(
    client: RedflowClient, registry: WorkflowRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    wf = define_workflow("fb-steps", handler=noop, registry=registry)
    store = await pinned(client, -1)
    batches = []
    many = store.record_steps

    async def counted(requests):  # type: ignore[no-untyped-def]
        batches.append(len(requests))
        return await many(requests)

    monkeypatch.setattr(store, "record_steps", counted)
    await store.heartbeat("w", LONG, LONG, False)
    a, b, hooked = [await client.enqueue_definition(wf, i) for i in range(3)]
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 3)}
    assert await store.finish(hooked.id, tokens[hooked.id], "w", "failed", b'{"message":"x"}', True, LONG,
                              "default") == (Code.OK, "failed")  # keeps its lease until its hook ran

    def line(name: str, position: int) -> bytes:
        return encode_step(StepRecord(name=name, position=position, attempt=1))

    codes = await asyncio.gather(
        store.record_step(a.id, tokens[a.id], line("one", 1)),
        store.record_step(b.id, b"not-the-token", line("x", 1)),
        store.record_step(a.id, tokens[a.id], line("two", 2)),  # two records of one run keep their order
        store.record_step(hooked.id, tokens[hooked.id], line("late", 1)),
    )
    assert codes == [Code.OK, Code.STALE, Code.OK, Code.WRONG_STATUS]
    assert batches == [4]
    history = await client.get_run_steps(a.id)
    assert [s["name"] for s in history] == ["one", "two"]
    assert await client.get_run_steps(b.id) == [] and await client.get_run_steps(hooked.id) == []


async def test_a_record_too_big_to_batch_keeps_its_place_in_the_history(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("fb-big", handler=noop, registry=registry)
    store = await pinned(client, -1)
    await store.heartbeat("w", LONG, LONG, False)
    handle = await client.enqueue_definition(wf, None)
    token = (await claim_batch(store, "default", 1))[0].token
    big = "x" * 100_000  # over a quarter of a batch's byte budget: it goes in a call of its own

    def line(name: str, position: int, output: bytes = b"null") -> bytes:
        return encode_step(StepRecord(name=name, position=position, attempt=1, output=msgspec.Raw(output)))

    codes = await asyncio.gather(
        store.record_step(handle.id, token, line("a", 1)),
        store.record_step(handle.id, token, line("b", 2, json.dumps(big).encode())),
        store.record_step(handle.id, token, line("c", 3)),
    )
    assert codes == [Code.OK] * 3
    raw = [await client.redis.execute("HGET", store.keys.steps, f"{handle.id}:{n}") for n in (1, 2, 3)]
    assert [json.loads(r)["n"] for r in raw] == ["a", "b", "c"]  # the history lines in submission order
