"""Review of finish_many's deferred writes (``new_later``/``flush_later``, the deferred running-count
drops, ``none_held``), enqueue_batch's HMGET existence check and enqueue's HSETNX path.

Each test ends runs in one finish_many call and then checks the partition as a whole
(``_consistent``): the running count per workflow equals the runs whose header says running, every
run not running has exactly its two index members of its status, an ended run has its retention
deadline (and its output when it succeeded), leases and owned entries belong to runs that still hold
them, held members name runs that are held."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import msgspec
import pytest

from redflow import RedflowClient, WorkflowRegistry, define_workflow
from redflow.ids import new_run_id
from redflow.storage.batches import FinishRequest
from redflow.storage.codes import Code
from redflow.storage.records import ClaimedRun
from redflow.storage.store import Store

from ..batch_helpers import claim_batch, noop, pinned

LONG = 600_000
TERMINAL = {"succeeded", "failed", "canceled"}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def _headers(store: Store) -> dict[str, dict[str, Any]]:
    flat = await store.redis.execute("HGETALL", store.keys.runs)
    return {_s(flat[i]): msgspec.msgpack.decode(flat[i + 1]) for i in range(0, len(flat), 2)}


async def _inconsistencies(store: Store, worker: str = "w") -> list[str]:
    """Everything in the partition that disagrees with the run headers."""
    k, r = store.keys, store.redis
    headers = await _headers(store)
    problems: list[str] = []
    running = Counter(h["w"] for h in headers.values() if h["s"] == "running")
    flat = await r.execute("HGETALL", k.running)
    counted = {_s(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    if counted != dict(running):
        problems.append(f"running counts {counted} != runs running {dict(running)}")
    members: dict[str, set[str]] = {}
    for m in map(_s, await r.execute("ZRANGE", k.index, 0, -1)):
        members.setdefault(m.rsplit(":", 1)[1], set()).add(m)
    leases = {_s(m) for m in (await r.execute("HKEYS", k.leases))}
    owned = {_s(m) for m in await r.execute("SMEMBERS", k.owned(worker))}
    results = {_s(m) for m in await r.execute("HKEYS", k.results)}
    expiring = {_s(m) for m in await r.execute("ZRANGE", k.expiry, 0, -1)}
    for rid, h in headers.items():
        s, w = h["s"], h["w"]
        want = set() if s == "running" else {f"s:{s}:{rid}", f"ws:{len(w)}:{w}:{s}:{rid}"}
        if members.get(rid, set()) != want:
            problems.append(f"{rid} ({s}): index members {sorted(members.get(rid, set()))} != {sorted(want)}")
        if s in TERMINAL:
            if rid not in expiring:
                problems.append(f"{rid} ({s}): no retention deadline")
            if s == "succeeded" and rid not in results:
                problems.append(f"{rid} (succeeded): no output")
            keeps = s == "failed" and h.get("h")  # an on_failure hook pending keeps the run owned
            if not keeps and rid in leases:
                problems.append(f"{rid} ({s}): still leased")
            if not keeps and rid in owned:
                problems.append(f"{rid} ({s}): still owned")
    for rid in owned - leases:
        problems.append(f"{rid}: owned without a lease")
    for m in map(_s, await r.execute("ZRANGE", k.held, 0, -1)):
        h = headers.get(m.rsplit(":", 1)[1])
        if m[0] in "cm" and (h is None or h.get("hd") != m):
            problems.append(f"held member {m} names no run held by it")
    return problems


def _req(run: ClaimedRun | Any, token: bytes, status: str = "succeeded", payload: bytes = b"1", hook: bool = False,
         queue: str = "default") -> FinishRequest:
    return FinishRequest(run.id, token, "w", status, payload, hook, LONG, queue)


# --- a Lua error mid-call -------------------------------------------------------------------------


async def test_an_error_later_in_the_call_keeps_the_deferred_writes_of_runs_ended_before_it(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """Redis does not roll back a script that fails after writing. A run ended earlier in a
    finish_many call must be as completely written as finish.lua one run at a time leaves it: its
    output, retention deadline, index members, owned-set removal and its workflow's running-count
    drop (all deferred to the end of the call) are written before the later run's error is raised.
    Otherwise its lease is gone, a retried finish is STALE and nothing repairs it (no output, listed
    under no status, never cleaned up, a max_concurrency slot lost for good). Here the later run's
    error is a WRONGTYPE on its stream key (XADD), standing in for any error raised after a run of
    the call was written (a bad key type, a Lua runtime error, a cluster redirect)."""
    capped = define_workflow("rv-err-cap", handler=noop, registry=registry, max_concurrency=1)
    plain = define_workflow("rv-err-plain", handler=noop, registry=registry)
    await client.sync_registry()
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    a = await client.enqueue_definition(capped, "a")
    b = await client.enqueue_definition(plain, "b")
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 10)}
    assert set(tokens) == {a.id, b.id}
    await client.redis.execute("SET", store.keys.stream(b.id), "not a stream")

    with pytest.raises(Exception, match="WRONGTYPE"):
        await store.finish_many([_req(a, tokens[a.id], payload=b"7"), _req(b, tokens[b.id])])

    # `a` was decided and written first: a retried finish cannot complete it (its lease is gone).
    assert (await store.finish_one(_req(a, tokens[a.id], payload=b"7")))[0] is Code.STALE
    state = await client.get_run(a.id)
    assert state is not None and state["status"] == "succeeded"
    assert state["output"] == 7  # fails here: the deferred HSET results never ran
    await client.redis.execute("DEL", store.keys.stream(b.id))
    assert await _inconsistencies(store) == []
    nxt = await client.enqueue_definition(capped, "next")
    assert [r.id for r in await claim_batch(store, "default", 10)] == [nxt.id]  # the slot `a` freed


async def test_an_error_in_finish_one_at_a_time_leaves_the_earlier_run_complete(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """The reference for the test above: finish.lua run by run, the same failure on the second run.
    The first run is complete; the second is cut short after its header, output, index members,
    deadline and count were written (only the stream end and what follows are missing)."""
    capped = define_workflow("rv-err1-cap", handler=noop, registry=registry, max_concurrency=1)
    plain = define_workflow("rv-err1-plain", handler=noop, registry=registry)
    await client.sync_registry()
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    a = await client.enqueue_definition(capped, "a")
    b = await client.enqueue_definition(plain, "b")
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 10)}
    await client.redis.execute("SET", store.keys.stream(b.id), "not a stream")
    assert await store.finish_one(_req(a, tokens[a.id], payload=b"7")) == (Code.OK, "succeeded")
    with pytest.raises(Exception, match="WRONGTYPE"):
        await store.finish_one(_req(b, tokens[b.id]))
    assert (await client.get_run(a.id))["output"] == 7  # type: ignore[index]
    await client.redis.execute("DEL", store.keys.stream(b.id))
    assert await _inconsistencies(store) == []
    nxt = await client.enqueue_definition(capped, "next")
    assert [r.id for r in await claim_batch(store, "default", 10)] == [nxt.id]


# --- batches decided as one at a time -------------------------------------------------------------


async def test_the_same_run_twice_in_one_call(client: RedflowClient, registry: WorkflowRegistry) -> None:
    """A run listed twice is ended once (the second is STALE, or WRONG_STATUS after a failure whose
    hook keeps the lease), and nothing is written twice: one pair of index members, one decrement."""
    capped = define_workflow("rv-twice", handler=noop, registry=registry, max_concurrency=3)
    await client.sync_registry()
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    a, b, c = [await client.enqueue_definition(capped, i) for i in range(3)]
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 10)}
    held = await client.run_by_name(capped.name, "h", queue_override="default")  # not held: 3 slots
    replies = await store.finish_many([
        _req(a, tokens[a.id], payload=b"1"), _req(a, tokens[a.id], payload=b"2"),
        _req(b, tokens[b.id], "failed", b'{"message":"x"}', hook=True), _req(b, tokens[b.id], payload=b"3"),
        _req(c, tokens[c.id], "canceled", b'{"message":"c"}'), _req(c, tokens[c.id], payload=b"4"),
    ])
    assert replies == [(Code.OK, "succeeded"), (Code.STALE, ""), (Code.OK, "failed"), (Code.WRONG_STATUS, "failed"),
                       (Code.OK, "canceled"), (Code.STALE, "")]
    assert (await client.get_run(a.id))["output"] == 1  # type: ignore[index]
    assert await _inconsistencies(store) == []
    assert await client.redis.execute("HGET", store.keys.running, capped.name) is None
    assert {_s(m) for m in await client.redis.execute("SMEMBERS", store.keys.owned("w"))} == {b.id}
    assert held.id in [_s(m) for m in await client.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)]


async def test_capped_workflow_with_held_runs_and_a_run_needing_another_queue_mid_call(
    client: RedflowClient, registry: WorkflowRegistry, calls: dict[str, int]
) -> None:
    """Three runs of a workflow capped at 3 end in one batch with two runs held: the first hands its
    slot to a held run of its queue and is written; the second finds the next held run on a queue the
    call did not name (NEED_QUEUES, after the first's count drop was flushed early for its read), and so
    does the third. Both are finished alone afterwards. The count, held set and ready lists end exactly
    as when the three end one by one, and the call's deferred writes for the first are all there."""
    capped = define_workflow("rv-cap3", handler=noop, registry=registry, max_concurrency=3)
    plain = define_workflow("rv-cap3-plain", handler=noop, registry=registry)
    await client.sync_registry()
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    runs = [await client.enqueue_definition(capped, i) for i in range(3)]
    other = await client.enqueue_definition(plain, "p")
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 10)}
    assert len(tokens) == 4
    h1 = await client.run_by_name(capped.name, "h1", queue_override="default")
    h2 = await client.run_by_name(capped.name, "h2", queue_override="other")
    assert await claim_batch(store, "default", 10) == []
    assert await claim_batch(store, "other", 10) == []
    assert await client.redis.execute("ZCARD", store.keys.held) == 2
    calls["many"] = calls["one"] = 0

    replies = await asyncio.gather(
        store.finish(runs[0].id, tokens[runs[0].id], "w", "succeeded", b"0", False, LONG, "default"),
        store.finish(other.id, tokens[other.id], "w", "succeeded", b"9", False, LONG, "default"),
        store.finish(runs[1].id, tokens[runs[1].id], "w", "succeeded", b"1", False, LONG, "default"),
        store.finish(runs[2].id, tokens[runs[2].id], "w", "failed", b'{"message":"f"}', False, LONG, "default"),
    )
    assert replies == [(Code.OK, "succeeded"), (Code.OK, "succeeded"), (Code.OK, "succeeded"), (Code.OK, "failed")]
    assert calls == {"many": 1, "one": 2}
    assert await client.redis.execute("ZCARD", store.keys.held) == 0
    assert [_s(m) for m in await client.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)] == [h1.id]
    assert [_s(m) for m in await client.redis.execute("LRANGE", store.keys.ready("other"), 0, -1)] == [h2.id]
    assert await _inconsistencies(store) == []
    assert len(await claim_batch(store, "default", 10)) == 1
    assert len(await claim_batch(store, "other", 10)) == 1
    assert await client.redis.execute("HGET", store.keys.running, capped.name) == b"2"
    assert await _inconsistencies(store) == []


async def test_capped_runs_with_a_cancel_request_and_a_hook_in_one_call_release_exactly(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """Capped at 2, two held: a cancel-requested run and a failure with an on_failure hook (it stays
    owned) end together. As one at a time: the first hands on one slot, the second (the first no longer
    counted) two, so all three held runs go to the ready list (the claim holds the third again)."""
    capped = define_workflow("rv-cap-cr", handler=noop, registry=registry, max_concurrency=2)
    await client.sync_registry()
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    a, b = [await client.enqueue_definition(capped, i) for i in range(2)]
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 10)}
    held = [await client.run_by_name(capped.name, i, queue_override="default") for i in range(3)]
    assert await claim_batch(store, "default", 10) == []
    assert await client.cancel_run(a.id) is True
    replies = await store.finish_many([
        _req(a, tokens[a.id], payload=b"1"), _req(b, tokens[b.id], "failed", b'{"message":"x"}', hook=True),
    ])
    assert replies == [(Code.OK, "canceled"), (Code.OK, "failed")]
    assert await client.redis.execute("ZCARD", store.keys.held) == 0
    ready = [_s(m) for m in await client.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)]
    assert sorted(ready) == sorted(h.id for h in held)
    assert await _inconsistencies(store) == []
    assert len(await claim_batch(store, "default", 10)) == 2
    assert await client.redis.execute("ZCARD", store.keys.held) == 1
    assert await _inconsistencies(store) == []


async def test_parent_and_child_in_one_call_either_order(
    client: RedflowClient, registry: WorkflowRegistry, calls: dict[str, int]
) -> None:
    """A running parent and its child end in one call, in both orders, next to a child whose parent
    waits for it (resumed: scheduled -> queued, index members moved at once, not deferred)."""
    parent = define_workflow("rv-parent", handler=noop, registry=registry)
    child = define_workflow("rv-child", handler=noop, queue="kids", registry=registry)
    store = await pinned(client, -1)
    await store.heartbeat("w", LONG, LONG, False)
    p1, p2, p3 = [await client.enqueue_definition(parent, i) for i in range(3)]
    ptok = {r.id: r.token for r in await claim_batch(store, "default", 3)}
    k1, k2, k3 = [await client.run_by_name(child.name, i, parent_run_id=p.id) for i, p in enumerate((p1, p2, p3))]
    code, _, _ = await store.suspend(p3.id, ptok[p3.id], "w", "default", "kid", 1, "child", child_id=k3.id)
    assert code is Code.OK
    ktok = {r.id: r.token for r in await claim_batch(store, "kids", 3)}
    assert len(ktok) == 3
    calls["many"] = calls["one"] = 0
    replies = await asyncio.gather(
        store.finish(p1.id, ptok[p1.id], "w", "succeeded", b"1", False, LONG, "default"),
        store.finish(k1.id, ktok[k1.id], "w", "succeeded", b"2", False, LONG, "kids"),
        store.finish(k2.id, ktok[k2.id], "w", "failed", b'{"message":"k2"}', False, LONG, "kids"),
        store.finish(p2.id, ptok[p2.id], "w", "succeeded", b"3", False, LONG, "default"),
        store.finish(k3.id, ktok[k3.id], "w", "succeeded", json.dumps({"k": 3}).encode(), False, LONG, "kids"),
        store.finish(p3.id, ptok[p3.id], "w", "succeeded", b"4", False, LONG, "default"),  # suspended: stale
    )
    assert replies == [(Code.OK, "succeeded"), (Code.OK, "succeeded"), (Code.OK, "failed"), (Code.OK, "succeeded"),
                       (Code.OK, "succeeded"), (Code.STALE, "")]
    assert calls == {"many": 1, "one": 0}
    assert await _inconsistencies(store) == []
    assert (await client.get_run(p3.id))["status"] == "queued"  # type: ignore[index]
    resumed = await claim_batch(store, "default", 10)
    assert [r.id for r in resumed] == [p3.id]
    assert bytes(resumed[0].steps[0].output) == json.dumps({"k": 3}).encode()
    assert await _inconsistencies(store) == []


async def test_many_workflows_and_none_held_in_one_full_batch(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """A hundred runs of four workflows (two capped, one with held runs) end in one call; every
    capped run's plan after the first finds none held or reads a count with the earlier drops."""
    cap1 = define_workflow("rv-big-c1", handler=noop, registry=registry, max_concurrency=40)
    cap2 = define_workflow("rv-big-c2", handler=noop, registry=registry, max_concurrency=30)
    pl = define_workflow("rv-big-p", handler=noop, registry=registry)
    await client.sync_registry()
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    runs = [await client.enqueue_definition(d, i) for i, d in enumerate([cap1] * 40 + [cap2] * 30 + [pl] * 30)]
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 200)}
    assert len(tokens) == 100
    held = [await client.run_by_name(cap2.name, i, queue_override="default") for i in range(5)]
    assert await claim_batch(store, "default", 10) == []
    order = sorted(runs, key=lambda r: hash(r.id))
    replies = await store.finish_many([_req(r, tokens[r.id], payload=str(i).encode()) for i, r in enumerate(order)])
    assert replies == [(Code.OK, "succeeded")] * 100
    assert await client.redis.execute("ZCARD", store.keys.held) == 0
    assert sorted(_s(m) for m in await client.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)) == sorted(
        h.id for h in held)
    assert await _inconsistencies(store) == []
    assert await client.redis.execute("HLEN", store.keys.running) == 0


# --- enqueue and enqueue_batch retried ------------------------------------------------------------


async def test_enqueue_retried_after_a_lost_reply_creates_nothing_more(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """The HSETNX path: a retried enqueue (same id) while queued, while running and after it ended
    returns EXISTING with the current status and writes nothing (no second ready entry, no queued
    index member for a run that is not queued any more, input unchanged)."""
    define_workflow("rv-enq", handler=noop, registry=registry)
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    rid = new_run_id(store.keys.partition)
    first = await store.enqueue(rid, "rv-enq", "default", b'"a"', 3, 0, None, 0, None)
    assert first == (Code.CREATED, rid, "queued")
    assert await store.enqueue(rid, "rv-enq", "default", b'"b"', 3, 0, None, 0, None) == (Code.EXISTING, rid, "queued")
    assert await client.redis.execute("LPOS", store.keys.ready("default"), rid, "COUNT", 0) == [0]
    assert await client.redis.execute("HGET", store.keys.inputs, rid) == b'"a"'
    [claimed] = await claim_batch(store, "default", 10)
    assert await store.enqueue(rid, "rv-enq", "default", b'"b"', 3, 0, None, 0, None) == (Code.EXISTING, rid,
                                                                                          "running")
    assert await client.redis.execute("LLEN", store.keys.ready("default")) == 0
    assert await _inconsistencies(store) == []
    assert await store.finish_one(_req(claimed, claimed.token)) == (Code.OK, "succeeded")
    assert await store.enqueue(rid, "rv-enq", "default", b'"b"', 3, 10**13, None, 0, None) == (
        Code.EXISTING, rid, "succeeded")
    assert await client.redis.execute("ZCARD", store.keys.scheduled("default")) == 0
    assert await _inconsistencies(store) == []


async def test_enqueue_batch_retried_with_existing_and_new_ids_across_slices(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """2,500 ids where every third exists already (some claimed and running, some ended), across the
    1,000-id HMGET slices: exactly the new ones are created, each once, and nothing existing changes."""
    define_workflow("rv-eb", handler=noop, registry=registry)
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    ids = [new_run_id(store.keys.partition) for _ in range(2500)]
    old = ids[::3]
    assert await store.enqueue_batch(old, "rv-eb", "default", [b"1"] * len(old), 3, 0) == len(old)
    claimed = await claim_batch(store, "default", 50)
    for r in claimed[:25]:
        assert (await store.finish_one(_req(r, r.token)))[0] is Code.OK
    before = await _headers(store)
    assert await store.enqueue_batch(ids, "rv-eb", "default", [b"2"] * len(ids), 3, 0) == len(ids) - len(old)
    after = await _headers(store)
    assert len(after) == 2500
    assert {i: before[i] for i in old} == {i: after[i] for i in old}
    ready = [_s(m) for m in await client.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)]
    assert len(ready) == len(set(ready)) == 2500 - 50
    inputs = await client.redis.execute("HMGET", store.keys.inputs, *ids)
    assert [v == b"2" for v in inputs] == [i % 3 != 0 for i in range(2500)]
    assert await _inconsistencies(store) == []


async def test_mutex_holders_ended_in_one_call_hand_their_mutexes_on(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """Runs given a mutex field by hand (as admission would): the holder of `k` and of `j` end in one
    call with a plain run; the waiter of `k` leaves the held set for the ready list, no mutex stays
    taken, and the batch's deferred writes are all there."""
    plain = define_workflow("rv-mx", handler=noop, registry=registry)
    await client.sync_registry()
    store = await pinned(client, 0)
    await store.heartbeat("w", LONG, LONG, False)
    m1, m2, m3, p = [await client.enqueue_definition(plain, i) for i in range(4)]
    for run, field in ((m1, "1:k:"), (m2, "1:k:"), (m3, "1:j:")):
        h = msgspec.msgpack.decode(await client.redis.execute("HGET", store.keys.runs, run.id))
        h["mf"] = field
        await client.redis.execute("HSET", store.keys.runs, run.id, msgspec.msgpack.encode(h))
    tokens = {r.id: r.token for r in await claim_batch(store, "default", 10)}
    assert set(tokens) == {m1.id, m3.id, p.id}
    assert await client.redis.execute("ZCARD", store.keys.held) == 1
    replies = await store.finish_many([_req(m1, tokens[m1.id]), _req(p, tokens[p.id]), _req(m3, tokens[m3.id])])
    assert replies == [(Code.OK, "succeeded")] * 3
    assert await client.redis.execute("HLEN", store.keys.mutexes) == 0
    assert await client.redis.execute("ZCARD", store.keys.held) == 0
    assert [_s(m) for m in await client.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)] == [m2.id]
    assert await _inconsistencies(store) == []
    assert [r.id for r in await claim_batch(store, "default", 10)] == [m2.id]
