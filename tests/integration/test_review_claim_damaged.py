"""Review of claim.lua's unclaimable runs: a claim must lose nothing and leave the running counts,
held set and mutex holders consistent when some runs of its batch raise, when a key the batched
writes touch has the wrong type, and when a poison run sits in a queue that keeps moving."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from redflow import RedflowClient, WorkflowHandlerContext, WorkflowRegistry, define_workflow
from redflow._redis.errors import ResponseError
from redflow.storage.codes import Code
from redflow.storage.store import Store

from ..batch_helpers import claim_batch, noop
from ..conftest import WorkerFactory
from ..partitioned import keys_of

pytestmark = pytest.mark.usefixtures("one_partition")

LONG = 600_000
DAMAGED = b"\xc1"  # not MessagePack


async def _echo(ctx: WorkflowHandlerContext) -> Any:
    return ctx.input


async def _store(client: RedflowClient) -> Store:
    await client.store.ensure_ready()
    store = client.store.at(0)
    await store.heartbeat("w", LONG, LONG, False)
    return store


async def claim_batch_of(store: Store, queues: list[str]) -> list[Any]:
    code, _, runs = await store.claim("w", queues, 10, 10)
    assert code is Code.OK
    return runs


async def _headers(store: Store) -> dict[str, dict[str, Any]]:
    raw = await store.redis.execute("HGETALL", store.keys.runs)
    out = {}
    for i in range(0, len(raw), 2):
        try:
            out[raw[i].decode()] = msgspec.msgpack.decode(raw[i + 1])
        except msgspec.DecodeError:
            pass
    return out


async def consistent(store: Store) -> None:
    """Running counts match the running headers; every held member names a run holding it; every
    mutex holder is running; index members of queued runs name queued runs."""
    k = store.keys
    headers = await _headers(store)
    counts: dict[str, int] = {}
    for h in headers.values():
        if h["s"] == "running":
            counts[h["w"]] = counts.get(h["w"], 0) + 1
    raw = await store.redis.execute("HGETALL", k.running)
    running = {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}
    assert running == counts, (running, counts)
    for member in await store.redis.execute("ZRANGE", k.held, 0, -1):
        rid = member.decode().rsplit(":", 1)[1]
        assert headers[rid].get("hd") == member.decode() or headers[rid].get("tq") == member.decode(), member
    raw = await store.redis.execute("HGETALL", k.mutexes)
    for i in range(0, len(raw), 2):
        assert headers[raw[i + 1].decode()]["s"] == "running", raw
    for member in await store.redis.execute("ZRANGE", k.index, 0, -1):
        parts = member.decode().split(":")
        if parts[0] == "s" and parts[1] in headers.get(parts[2], {"s": parts[1]})["s"]:
            continue
        if parts[0] == "s":
            raise AssertionError(f"{member!r}: run is {headers[parts[2]]['s']}")


def _count_claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-item counter of Store.claim calls (the real calls are made)."""
    claims = [0]
    real = Store.claim

    async def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        claims[0] += 1
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "claim", counted)
    return claims


async def test_mixed_batch_keeps_counts_holds_and_inputs_aligned(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    plain = define_workflow("rc-plain", handler=noop, registry=registry)
    capped = define_workflow("rc-capped", handler=noop, registry=registry, max_concurrency=2)
    await client.sync_registry()
    store = await _store(client)
    runs = []
    for i in range(4):
        runs.append(await client.enqueue_definition(plain, {"p": i}))
        runs.append(await client.enqueue_definition(capped, {"c": i}))
    bad = [runs[1].id, runs[4].id]  # one capped, one plain
    for rid in bad:
        await store.redis.execute("HSET", store.keys.runs, rid, DAMAGED)
    claimed = await claim_batch(store, "default", 10)
    ids = {r.id for r in claimed}
    assert not ids & set(bad)
    for r in claimed:  # each claimed run carries its own input
        header = (await _headers(store))[r.id]
        expected = await store.redis.execute("HGET", store.keys.inputs, r.id)
        assert r.input == expected, (r.id, r.input, expected, header)
    assert len([r for r in claimed if r.header.workflow == capped.name]) == 2
    await consistent(store)
    ready = await store.redis.execute("LRANGE", store.keys.ready("default"), 0, -1)
    assert sorted(x.decode() for x in ready) == sorted(bad)


@pytest.mark.parametrize("key", ["inputs", "running", "index", "leases", "owned", "bell"])
async def test_a_clobbered_key_of_the_batched_writes_pops_nothing(
    client: RedflowClient, registry: WorkflowRegistry, key: str
) -> None:
    """Redis keeps a script's writes made before it raised: a WRONGTYPE after the RPOP lost the batch
    (still `queued`, or `running` and owned by a worker that never got the reply)."""
    plain = define_workflow("rc-plain2", handler=noop, registry=registry)
    await client.sync_registry()
    store = await _store(client)
    runs = [await client.enqueue_definition(plain, i) for i in range(3)]
    k = store.keys
    name = {"owned": k.owned("w"), "bell": k.bell("default")}.get(key) or getattr(k, key)
    await store.redis.execute("DEL", name)
    await store.redis.execute("SET", name, "clobbered")
    before = await store.redis.execute("LRANGE", k.ready("default"), 0, -1)
    assert len(before) == len(runs)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await store.claim("w", ["default"], 10, 10)
    # The check runs after the first pop (a claim finding nothing pays nothing for it): the popped
    # runs are back, in their order.
    assert await store.redis.execute("LRANGE", k.ready("default"), 0, -1) == before
    headers = await _headers(store)
    assert all(headers[r.id]["s"] == "queued" and "o" not in headers[r.id] for r in runs), headers


async def test_a_due_run_of_a_clobbered_ready_list_stays_scheduled(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    """promote_due's RPUSH to a ready list of the wrong type raised after the run was saved `queued`:
    re-scheduled a minute later, the next promotion found it queued and dropped it from the zset."""
    plain = define_workflow("rc-plain3", handler=noop, registry=registry)
    await client.sync_registry()
    store = await _store(client)
    k = store.keys
    run = await client.enqueue_definition(plain, 1, run_at=datetime.now(UTC) + timedelta(milliseconds=50))
    await asyncio.sleep(0.2)
    await store.redis.execute("SET", k.ready("default"), "clobbered")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await store.claim("w", ["default"], 10, 10)
    assert (await _headers(store))[run.id]["s"] == "scheduled"
    assert await store.redis.execute("ZSCORE", k.scheduled("default"), run.id) is not None


async def test_an_idle_worker_with_a_poison_run_neither_spins_nor_floods_the_log(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    define_workflow("rc-idle", handler=_echo, registry=registry)
    bad = await client.run_by_name("rc-idle", 0)
    keys = keys_of(client, bad.id)
    await client.redis.execute("HSET", keys.runs, bad.id, DAMAGED)
    claims = _count_claims(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="redflow.storage"):
        await make_worker(blmove_timeout_sec=1.0)
        await asyncio.sleep(3.5)  # a window in which a spinning worker would claim many times
    assert claims[0] <= 6, claims  # one claim per block timeout, not a spin
    lines = [r for r in caplog.records if bad.id in r.getMessage()]
    assert 1 <= len(lines) <= 6, len(lines)


async def test_a_poison_run_in_a_moving_queue_is_not_logged_at_every_claim(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """New runs are pushed behind the poison run, so every claim that drains the queue pops it again:
    a trickle of N runs logged it N times."""
    define_workflow("rc-trickle", handler=_echo, registry=registry)
    bad = await client.run_by_name("rc-trickle", 0)
    keys = keys_of(client, bad.id)
    await client.redis.execute("HSET", keys.runs, bad.id, DAMAGED)
    with caplog.at_level(logging.ERROR, logger="redflow.storage"):
        await make_worker()
        for n in range(1, 31):
            h = await client.run_by_name("rc-trickle", n)
            assert await h.result(timeout_ms=10_000) == n
    lines = [r for r in caplog.records if bad.id in r.getMessage()]
    assert 1 <= len(lines) <= 3, len(lines)


async def test_many_unclaimable_runs_are_not_all_popped_and_logged_by_one_claim(
    client: RedflowClient, registry: WorkflowRegistry, caplog: pytest.LogCaptureFixture,
) -> None:
    """A clobbered key every run reads (here `admission`, read for every first attempt) makes every run
    raise: one claim for one run popped, tried and pushed back the whole queue, and logged a line each."""
    plain = define_workflow("rc-many", handler=noop, registry=registry)
    await client.sync_registry()
    store = await _store(client)
    for i in range(300):
        await client.enqueue_definition(plain, i)
    await store.redis.execute("SET", store.keys.admission, "clobbered")
    with caplog.at_level(logging.ERROR, logger="redflow.storage"):
        reply = await store.scripts.run("claim", ("w", 1, 10, "n"), queues=["default"], owned=store.keys.owned("w"))
        await store.claim("w", ["default"], 1, 10)
    unclaimable = [reply[i] for i in range(2, len(reply), 7) if reply[i + 1] == b"unclaimable"]
    assert await store.redis.execute("LLEN", store.keys.ready("default")) == 300
    assert len(unclaimable) <= 100, len(unclaimable)
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]  # one line for the call
    assert await store.redis.execute("LLEN", store.keys.bell("default")) <= 1


async def test_good_runs_behind_many_poison_runs_start_without_a_spin(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    define_workflow("rc-behind", handler=_echo, registry=registry)
    await client.store.ensure_ready()
    k = client.store.at(0).keys
    poison = [await client.run_by_name("rc-behind", -1) for _ in range(250)]
    for p in poison:
        await client.redis.execute("HSET", k.runs, p.id, DAMAGED)
    good = [await client.run_by_name("rc-behind", n) for n in range(5)]
    claims = _count_claims(monkeypatch)
    await make_worker(blmove_timeout_sec=1.0)
    assert [await h.result(timeout_ms=15_000) for h in good] == list(range(5))
    claims[0] = 0
    await asyncio.sleep(3.5)  # a window in which a spinning worker would claim many times
    assert claims[0] <= 8, claims
    assert await client.redis.execute("LLEN", k.ready("default")) == 250  # nothing lost


async def test_claimed_inputs_stay_aligned_across_queues_with_runs_put_back_between(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    plain = define_workflow("rc-align", handler=noop, registry=registry)
    await client.sync_registry()
    store = await _store(client)
    a = [await client.enqueue_definition(plain, {"a": i}) for i in range(4)]
    b = [await client.enqueue_definition(plain, {"b": i}, queue_override="other") for i in range(4)]
    for h in (a[0], a[2], b[1]):
        await store.redis.execute("HSET", store.keys.runs, h.id, DAMAGED)
    claimed = await claim_batch_of(store, ["default", "other"])
    assert sorted(r.id for r in claimed) == sorted(h.id for h in (a[1], a[3], b[0], b[2], b[3]))
    for r in claimed:
        assert r.input == await store.redis.execute("HGET", store.keys.inputs, r.id), r.id
    await consistent(store)
