"""Adversarial review of the rewritten run state machine.

Each test drives the real scripts on a real server, mostly at the store layer, so the interleaving
is exact. Tests with a ``# FINDING n`` comment reproduced a bug found in review (now fixed) that
is still present; the others document an attack that held.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from redflow import (
    CanceledError,
    EventTrigger,
    RedflowClient,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    WorkflowRegistry,
    define_workflow,
)
from redflow.storage.codes import Code
from redflow.storage.keys import event_member_prefix
from redflow.storage.records import StepRecord, encode_step

from ..conftest import wait_until
from ..partitioned import keys_of, pin_spread, store_of

LONG = 60_000


async def _noop(ctx: WorkflowHandlerContext) -> None:
    return None


async def _header(client: RedflowClient, run_id: str) -> dict[str, Any]:
    raw = await client.redis.execute("HGET", keys_of(client, run_id).runs, run_id)
    return msgspec.msgpack.decode(raw) if raw else {}


async def _status(client: RedflowClient, run_id: str) -> str | None:
    return (await _header(client, run_id)).get("s")


async def _eventually(client: RedflowClient, run_id: str, statuses: tuple[str, ...], timeout_s: float) -> bool:
    async def check() -> bool:
        return await _status(client, run_id) in statuses

    try:
        await wait_until(check, timeout_s=timeout_s, what=f"{run_id} in {statuses}")
    except AssertionError:
        return False
    return True


async def _claim_one(client: RedflowClient, wid: str, queue: str, run_id: str, timeout_s: float = 5.0) -> Any:
    """Claim on ``queue`` until ``run_id`` is handed out (it may be due later), in its partition."""
    store = store_of(client, run_id)

    async def attempt() -> Any:
        _, _, runs = await store.claim(wid, [queue], 10, 100)
        found = [r for r in runs if r.id == run_id]
        assert all(r.id == run_id for r in runs), [r.id for r in runs]
        return found[0] if found else None

    return await wait_until(attempt, timeout_s=timeout_s, what=f"claim of {run_id}")


async def _admission(client: RedflowClient, workflow: str) -> None:
    # Admission is registered by a worker's start; do what it does for this workflow.
    await client.redis.execute("HSET", client.keys.admission, workflow, "{}")


# --------------------------------------------------------------------------------------------------
# FINDING 1: emit.lua creates children for a parent whose cancellation was requested (or which is
# canceled): the child slips in behind the cascade and is never canceled.
# --------------------------------------------------------------------------------------------------
async def test_emit_from_a_cancel_requested_parent_leaves_no_live_child(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    # FINDING 1
    parent = define_workflow("emit-parent", handler=_noop, registry=registry)
    define_workflow("emit-sub", handler=_noop, queue="subs", event=[EventTrigger(name="from.parent")],
                    registry=registry)
    await make_worker(queues=["idle"])  # registers the subscription; leads (would finish cascades)
    handle = await client.enqueue_definition(parent, None)
    store = store_of(client, handle.id)
    await store.heartbeat("w", LONG, LONG, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    assert [r.id for r in runs] == [handle.id]
    assert await client.cancel_run(handle.id) is True  # requested; no children yet, cascade done
    # The parent's handler has not seen the cancel yet and emits an event (step emit_event does this).
    # The emit is refused (the step raises CanceledError): no child can slip in behind the cascade.
    with pytest.raises(CanceledError):
        await client.emit_event("from.parent", {"x": 1}, parent_run_id=handle.id)
    code, status = await store.finish(handle.id, runs[0].token, "w", "canceled", b'{"kind":"canceled"}', False,
                                      LONG, "default")
    assert (code, status) == (Code.OK, "canceled")
    assert await store.children_of(handle.id) == []


# --------------------------------------------------------------------------------------------------
# FINDING 2: a run claimed for admission by a worker without its definition, canceled meanwhile:
# retry.lua answers CANCELED, the executor calls finish.lua, which only accepts 'running', answers
# WRONG_STATUS('queued'), and the executor drops the run as "lost". It stays queued, owned and
# leased by a live worker forever.
# --------------------------------------------------------------------------------------------------
async def test_cancel_during_admission_on_a_worker_without_the_definition_ends_the_run(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    # FINDING 2
    from redflow.worker.executor import Execution, execute

    wf = define_workflow("admit-unknown", handler=_noop, mutex=lambda i: "m", registry=registry)
    worker = await make_worker(queues=["idle"], registry=WorkflowRegistry())  # lacks "admit-unknown"
    await _admission(client, wf.name)
    handle = await client.enqueue_definition(wf, None)
    _, _, runs = await client.store.claim(worker.id, ["default"], 1, 10)
    assert [r.kind for r in runs] == ["admit"]
    assert await client.cancel_run(handle.id) is True  # requested: the run is owned for admission
    await execute(worker, Execution(claimed=runs[0], signal=asyncio.Event()))
    header = await _header(client, handle.id)
    lease = await client.redis.execute("HGET", client.keys.leases, handle.id)
    assert header["s"] == "canceled" and lease is None, (header, lease)


# --------------------------------------------------------------------------------------------------
# FINDING 3: a throttle queue whose configuration changed (key function changed, or throttle removed
# while another admission option stays) is never woken again: admit.lua removes the admitted head's
# place (h.tq) but only hands on within the group it computes now, so the runs behind the old head
# stay 'scheduled' without a due time forever.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["key-changed", "throttle-removed"])
async def test_runs_behind_a_throttle_head_start_after_the_throttle_changes(
    client: RedflowClient, registry: WorkflowRegistry, change: str
) -> None:
    # FINDING 3
    wf = define_workflow(f"thr-{change}", handler=_noop, mutex=lambda i: str(i), registry=registry,
                         throttle=WorkflowRateLimitOptions(key=lambda i: "k", limit=1, period="300ms"))
    store = client.store
    await _admission(client, wf.name)
    await store.heartbeat("w", LONG, LONG, False)
    a, b, c = [await client.enqueue_definition(wf, n) for n in range(3)]
    _, _, runs = await store.claim("w", ["default"], 3, 10)
    tok = {r.id: r.token for r in runs}
    assert set(tok) == {a.id, b.id, c.id}
    throttle = ("k", 1, 300)
    assert (await store.admit(a.id, tok[a.id], "w", "default", wf.name, throttle, None, False, LONG, "0"))[0] is Code.OK
    assert (await store.admit(b.id, tok[b.id], "w", "default", wf.name, throttle, None, False, LONG, "1"))[0] \
        is Code.THROTTLED
    code, due = await store.admit(c.id, tok[c.id], "w", "default", wf.name, throttle, None, False, LONG, "2")
    assert (code, due) == (Code.THROTTLED, -1)  # behind b
    assert (await store.finish(a.id, tok[a.id], "w", "succeeded", b"1", False, LONG, "default"))[0] is Code.OK
    # A deploy changes the throttle; b reaches its window and is admitted under the new options.
    claimed_b = await _claim_one(client, "w", "default", b.id)
    new = ("k2", 1, 300) if change == "key-changed" else None
    code, _ = await store.admit(b.id, claimed_b.token, "w", "default", wf.name, new, None, False, LONG, "1")
    assert code is Code.OK
    assert (await store.finish(b.id, claimed_b.token, "w", "succeeded", b"1", False, LONG, "default"))[0] is Code.OK
    assert await _eventually(client, c.id, ("queued", "running", "succeeded"), 3.0), (
        "c waits in a throttle queue nobody will ever wake", await _header(client, c.id))


# --------------------------------------------------------------------------------------------------
# FINDING 4: a throttle head handed back by retry's deferral (worker without the definition) loses its
# place, unlike release and reap: the next run in line is woken and starts first.
# --------------------------------------------------------------------------------------------------
async def test_a_throttle_head_deferred_by_a_worker_without_the_definition_keeps_its_place(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    # FINDING 4
    wf = define_workflow("thr-defer", handler=_noop, registry=registry,
                         throttle=WorkflowRateLimitOptions(key=lambda i: "k", limit=1, period="300ms"))
    store = client.store
    await _admission(client, wf.name)
    await store.heartbeat("w", LONG, LONG, False)
    a, b, c = [await client.enqueue_definition(wf, n) for n in range(3)]
    _, _, runs = await store.claim("w", ["default"], 3, 10)
    tok = {r.id: r.token for r in runs}
    throttle = ("k", 1, 300)
    for h in (a, b, c):
        await store.admit(h.id, tok[h.id], "w", "default", wf.name, throttle, None, False, LONG)
    claimed_b = await _claim_one(client, "w", "default", b.id)
    # The worker that claimed b lacks the definition: executor._admit defers it through retry.lua.
    assert await store.retry(b.id, claimed_b.token, "w", "default", 5_000, b'{"kind":"unknown"}') is Code.OK
    hb, hc = await _header(client, b.id), await _header(client, c.id)
    assert "tq" in hb, f"b lost its place in the throttle queue: {hb}"
    assert hc["s"] == "scheduled" and "av" not in hc, f"c was woken ahead of b: {hc}"


# --------------------------------------------------------------------------------------------------
# Attacks that held.
# --------------------------------------------------------------------------------------------------
async def test_release_keeps_a_throttle_head_in_place(client: RedflowClient, registry: WorkflowRegistry) -> None:
    wf = define_workflow("thr-release", handler=_noop, registry=registry,
                         throttle=WorkflowRateLimitOptions(key=lambda i: "k", limit=1, period="300ms"))
    store = client.store
    await _admission(client, wf.name)
    await store.heartbeat("w", LONG, LONG, False)
    a, b, c = [await client.enqueue_definition(wf, n) for n in range(3)]
    _, _, runs = await store.claim("w", ["default"], 3, 10)
    tok = {r.id: r.token for r in runs}
    throttle = ("k", 1, 300)
    for h in (a, b, c):
        await store.admit(h.id, tok[h.id], "w", "default", wf.name, throttle, None, False, LONG)
    claimed_b = await _claim_one(client, "w", "default", b.id)
    assert await store.release(b.id, claimed_b.token, "w", "default", LONG) is Code.OK
    hb, hc = await _header(client, b.id), await _header(client, c.id)
    assert "tq" in hb and hc["s"] == "scheduled" and "av" not in hc


@pytest.mark.parametrize("how", ["cancel", "rate-limited"])
async def test_throttle_head_that_leaves_hands_on_to_the_next(
    client: RedflowClient, registry: WorkflowRegistry, how: str
) -> None:
    wf = define_workflow(f"thr-leave-{how}", handler=_noop, registry=registry,
                         throttle=WorkflowRateLimitOptions(key=lambda i: "k", limit=1, period="300ms"))
    store = client.store
    await _admission(client, wf.name)
    await store.heartbeat("w", LONG, LONG, False)
    a, b, c = [await client.enqueue_definition(wf, n) for n in range(3)]
    _, _, runs = await store.claim("w", ["default"], 3, 10)
    tok = {r.id: r.token for r in runs}
    throttle = ("k", 1, 300)
    for h in (a, b, c):
        await store.admit(h.id, tok[h.id], "w", "default", wf.name, throttle, None, False, LONG)
    if how == "cancel":
        assert await client.cancel_run(b.id) is True  # the head, scheduled for its window
    else:
        claimed_b = await _claim_one(client, "w", "default", b.id)
        # Spend b's rate budget so it fails as rate limited at the head of its throttle queue.
        await client.redis.execute("SET", client.keys.rate_limit(wf.name, "r"), "5", "PX", 60_000)
        code, _ = await store.admit(b.id, claimed_b.token, "w", "default", wf.name, throttle, ("r", 1, 60_000),
                                    False, LONG)
        assert code is Code.RATE_LIMITED
    claimed_c = await _claim_one(client, "w", "default", c.id)
    assert claimed_c.kind == "admit"
    assert await client.redis.execute("ZCARD", client.keys.held) == 1  # only c's own place is left


async def test_emit_and_deadline_race_resolve_the_wait_once_and_in_place(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("ev-race", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)
    await store.heartbeat("w", LONG, LONG, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    token = runs[0].token
    assert await store.record_step(handle.id, token, encode_step(StepRecord(name="s1", position=1, attempt=1))) \
        is Code.OK
    prefix = event_member_prefix("ev.race", "k1")
    code, _, _ = await store.suspend(handle.id, token, "w", "default", "wait", 2, "event", delay_ms=150,
                                     waiter_member=prefix + handle.id, buffer_prefix=prefix)
    assert code is Code.OK
    # The deadline fires first (claim promotes the due run), then the event arrives.
    resumed = await _claim_one(client, "w", "default", handle.id)
    result = await client.emit_event_detailed("ev.race", {"big": 12345678901234567890, "e": []}, correlation_key="k1")
    assert result["resumed_run_ids"] == []
    assert [s.name for s in resumed.steps] == ["s1", "wait"]
    assert resumed.steps[1].state == "done" and resumed.steps[1].resolution == "timeout"
    assert await client.redis.execute("HGET", store.keys.steps, handle.id) == b"2"  # replaced, not appended
    assert await client.redis.execute("ZCARD", store.keys.waiters) == 0


async def test_event_resolution_keeps_user_json_byte_for_byte(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("ev-json", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)
    await store.heartbeat("w", LONG, LONG, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    prefix = event_member_prefix("ev.json", "k")
    code, _, _ = await store.suspend(handle.id, runs[0].token, "w", "default", "wait", 1, "event", delay_ms=LONG,
                                     waiter_member=prefix + handle.id, buffer_prefix=prefix)
    assert code is Code.OK
    payload = {"big": 12345678901234567890, "e": [], "o": {}, "f": 0.1}
    result = await client.emit_event_detailed("ev.json", payload, correlation_key="k")
    assert result["resumed_run_ids"] == [handle.id]
    claimed = await _claim_one(client, "w", "default", handle.id)
    out = json.loads(bytes(claimed.steps[0].output))
    assert out["data"] == payload


async def test_child_ending_on_another_queue_resumes_its_waiting_parent_with_its_output(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    parent = define_workflow("xq-parent", handler=_noop, registry=registry)
    child = define_workflow("xq-child", handler=_noop, queue="kids", registry=registry)
    p = await client.enqueue_definition(parent, None)
    store = store_of(client, p.id)  # the child is created in its parent's partition
    await store.heartbeat("w", LONG, LONG, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    ptok = runs[0].token
    kid = await client.run_by_name(child.name, None, parent_run_id=p.id)
    code, _, _ = await store.suspend(p.id, ptok, "w", "default", "kid", 1, "child", child_id=kid.id)
    assert code is Code.OK
    _, _, kruns = await store.claim("w", ["kids"], 1, 10)
    out = b'{"big":12345678901234567890,"e":[]}'
    assert await store.finish(kid.id, kruns[0].token, "w", "succeeded", out, False, LONG, "kids") == (
        Code.OK, "succeeded")
    resumed = await _claim_one(client, "w", "default", p.id)
    assert [s.resolution for s in resumed.steps] == ["succeeded"]
    assert bytes(resumed.steps[0].output) == out
    assert await client.redis.execute("HGET", store.keys.steps, p.id) == b"1"


async def test_suspend_after_cancel_request_writes_nothing(client: RedflowClient, registry: WorkflowRegistry) -> None:
    wf = define_workflow("cancel-suspend", handler=_noop, registry=registry)
    handle = await client.enqueue_definition(wf, None)
    store = store_of(client, handle.id)
    await store.heartbeat("w", LONG, LONG, False)
    _, _, runs = await store.claim("w", ["default"], 1, 10)
    assert await client.cancel_run(handle.id) is True
    code, _, _ = await store.suspend(handle.id, runs[0].token, "w", "default", "nap", 1, "sleep", delay_ms=10)
    assert code is Code.CANCELED
    assert await client.redis.execute("HGET", store.keys.steps, handle.id) is None
    assert await store.finish(handle.id, runs[0].token, "w", "succeeded", b"1", False, LONG, "default") == (
        Code.OK, "canceled")
    assert await client.redis.execute("SCARD", store.keys.owned("w")) == 0


async def test_release_then_reap_and_reap_then_release_leave_nothing_behind(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("rel-reap", handler=_noop, registry=registry)
    await client.store.ensure_ready()
    store = client.store.at(pin_spread(client, -1))  # both runs in one partition (the last), one worker's
    leader = (await store.heartbeat("boss", LONG, LONG, True)).leader
    a = await client.enqueue_definition(wf, 1)
    b = await client.enqueue_definition(wf, 2)
    assert store_of(client, a.id) is store_of(client, b.id) is store
    await store.heartbeat("w", LONG, LONG, False)
    _, _, runs = await store.claim("w", ["default"], 2, 10)
    tok = {r.id: r.token for r in runs}
    assert await store.release(a.id, tok[a.id], "w", "default", LONG) is Code.OK  # release first
    await client.redis.execute("ZADD", store.keys.workers, 0, "w")
    code, taken, crashed, left = await store.reap(leader, "w", 3, LONG, 10)  # then reap takes b only
    assert (code, taken, crashed, left) == (Code.OK, 1, 0, 0)
    assert await store.release(b.id, tok[b.id], "w", "default", LONG) is Code.STALE
    assert await client.redis.execute("HLEN", store.keys.leases) == 0
    for h in (a, b):
        header = await _header(client, h.id)
        assert header["s"] == "queued" and "o" not in header
    assert await client.redis.execute("LLEN", store.keys.ready("default")) == 2


async def test_mutex_waiter_on_another_queue_starts_when_the_holder_suspends(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("mx-xq", handler=_noop, mutex=lambda i: "m", registry=registry)
    store = client.store
    await _admission(client, wf.name)
    await store.heartbeat("w", LONG, LONG, False)
    a = await client.enqueue_definition(wf, 1)
    b = await client.run_by_name(wf.name, 2, queue_override="other")
    _, _, ra = await store.claim("w", ["default"], 1, 10)
    assert (await store.admit(a.id, ra[0].token, "w", "default", wf.name, None, None, False, LONG, "m"))[0] is Code.OK
    _, _, rb = await store.claim("w", ["other"], 1, 10)
    assert (await store.admit(b.id, rb[0].token, "w", "other", wf.name, None, None, False, LONG, "m"))[0] is Code.HELD
    code, _, _ = await store.suspend(a.id, ra[0].token, "w", "default", "nap", 1, "sleep", delay_ms=LONG)
    assert code is Code.OK
    claimed = await _claim_one(client, "w", "other", b.id)
    assert claimed.kind == "admit"
    assert (await store.admit(b.id, claimed.token, "w", "other", wf.name, None, None, False, LONG, "m"))[0] is Code.OK


async def test_reap_of_a_cancel_requested_admission_resumes_the_waiting_parent(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    parent = define_workflow("reap-parent", handler=_noop, registry=registry)
    child = define_workflow("reap-child", handler=_noop, queue="kids", mutex=lambda i: "m", registry=registry)
    store = client.store
    await _admission(client, child.name)
    await store.ensure_ready()
    pin_spread(client, 0)  # the parent in p0 with its (mutex) child: one partition's reap (p0's scripts)
    leader = (await store.heartbeat("boss", LONG, LONG, True)).leader
    await store.heartbeat("w", LONG, LONG, False)
    p = await client.enqueue_definition(parent, None)
    _, _, pr = await store.claim("w", ["default"], 1, 10)
    kid = await client.run_by_name(child.name, None, parent_run_id=p.id)
    assert (await store.suspend(p.id, pr[0].token, "w", "default", "kid", 1, "child", child_id=kid.id))[0] is Code.OK
    await store.heartbeat("dead", LONG, LONG, False)
    _, _, kr = await store.claim("dead", ["kids"], 1, 10)
    assert [r.kind for r in kr] == ["admit"]
    assert (await store.cancel(kid.id, "", LONG))[1] == "requested"
    await client.redis.execute("ZADD", client.keys.workers, 0, "dead")
    code, taken, _, left = await store.reap(leader, "dead", 3, LONG, 10)
    assert (code, taken, left) == (Code.OK, 1, 0)
    assert await _status(client, kid.id) == "canceled"
    resumed = await _claim_one(client, "boss", "default", p.id)
    assert [s.resolution for s in resumed.steps] == ["canceled"]
    assert await client.redis.execute("HLEN", client.keys.leases) == 1  # only the parent's new lease


# --------------------------------------------------------------------------------------------------
# FINDING 5: a claim whose reply is lost (the script ran, the connection dropped before the reply)
# leaves its runs 'running', leased and in owned:<worker> of a worker that keeps heartbeating but
# never learned it holds them: the reaper never takes them back while that worker lives.
# --------------------------------------------------------------------------------------------------
async def test_runs_of_a_claim_whose_reply_was_lost_are_not_stranded(
    client: RedflowClient, registry: WorkflowRegistry, make_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FINDING 5
    from redflow._redis.errors import ConnectionClosedError
    from redflow.storage.store import Store

    real_claim = Store.claim
    lost = {"n": 0}

    async def claim_losing_first_reply(self: Store, *args: Any, **kwargs: Any) -> Any:
        reply = await real_claim(self, *args, **kwargs)
        if reply[2] and not lost["n"]:
            lost["n"] = 1
            raise ConnectionClosedError("connection lost before the claim reply")
        return reply

    monkeypatch.setattr(Store, "claim", claim_losing_first_reply)
    wf = define_workflow("lost-claim", handler=_noop, registry=registry)
    await make_worker(lease_ms=1000)
    handle = await client.enqueue_definition(wf, None)
    await wait_until(lambda: lost["n"], what="a claim reply lost")
    assert await _eventually(client, handle.id, ("succeeded",), 6.0), await _header(client, handle.id)
