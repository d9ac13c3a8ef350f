"""Idempotency keys, retried enqueues, and bad input that must leave nothing behind."""

from __future__ import annotations

from datetime import datetime

import pytest

from redflow import (
    PayloadEncodingError,
    PayloadTooLargeError,
    RedflowClient,
    RunFailedError,
    StorageLayoutError,
    UnknownWorkflowError,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    define_workflow,
)
from redflow.errors import ConfigurationError
from redflow.storage.codes import Code

from ..conftest import wait_until
from ..partitioned import keys_of


async def _keys(client: RedflowClient) -> list[bytes]:
    return sorted(await client.redis.execute("KEYS", f"{client.prefix}:*"))


async def _gone(client: RedflowClient, key: str) -> bool:
    return not await client.redis.execute("EXISTS", key)


async def _noop(ctx: WorkflowHandlerContext) -> object:
    return ctx.input


async def test_idempotency_key_binds_live_and_succeeded_runs(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    wf = define_workflow("idem", handler=_noop, registry=registry)
    first = await client.enqueue_definition(wf, {"v": 1}, idempotency_key="k1")
    again = await client.enqueue_definition(wf, {"v": 2}, idempotency_key="k1")
    assert again.id == first.id
    await make_worker()
    assert await first.result(timeout_ms=10_000) == {"v": 1}
    after = await client.enqueue_definition(wf, {"v": 3}, idempotency_key="k1")
    assert after.id == first.id  # succeeded: still bound, new input ignored
    other_wf = define_workflow("idem-other", handler=_noop, registry=registry)
    scoped = await client.enqueue_definition(other_wf, {"v": 4}, idempotency_key="k1")
    assert scoped.id != first.id  # scoped by workflow


async def test_idempotency_key_rebinds_after_failure_and_after_expiry(
    client: RedflowClient, registry: WorkflowRegistry, make_worker
) -> None:
    async def fail(ctx: WorkflowHandlerContext) -> None:
        if ctx.input["fail"]:
            raise RuntimeError("nope")

    wf = define_workflow("idem-fail", handler=fail, max_attempts=1, registry=registry)
    await make_worker()
    failed = await client.enqueue_definition(wf, {"fail": True}, idempotency_key="k")
    with pytest.raises(RunFailedError):
        await failed.result(timeout_ms=10_000)
    fresh = await client.enqueue_definition(wf, {"fail": False}, idempotency_key="k")
    assert fresh.id != failed.id
    assert await fresh.result(timeout_ms=10_000) is None

    short = await client.enqueue_definition(wf, {"fail": False}, idempotency_key="short", idempotency_ttl=1)
    key = keys_of(client, short.id).idempotency("idem-fail", "short")  # in the partition the key hashes to
    assert 0 < await client.redis.execute("TTL", key) <= 1
    await client.redis.execute("PEXPIRE", key, 1)  # let the binding lapse now instead of sleeping
    await wait_until(lambda: _gone(client, key), timeout_s=2, what="the binding's expiry")
    assert (await client.enqueue_definition(wf, {"fail": False}, idempotency_key="short")).id != short.id


async def test_retried_enqueue_with_same_run_id_is_safe(client: RedflowClient, registry: WorkflowRegistry) -> None:
    define_workflow("retry-enqueue", handler=_noop, registry=registry)
    await client.store.ensure_ready()
    args = ("RID0000000000000000000000-p0", "retry-enqueue", "default", b"1", 3, 0, None, 0, None)
    code1, id1, _ = await client.store.enqueue(*args)
    code2, id2, _ = await client.store.enqueue(*args)
    assert (code1, code2) == (Code.CREATED, Code.EXISTING) and id1 == id2
    assert await client.redis.execute("LLEN", client.keys.ready("default")) == 1


async def test_non_json_input_rejected_before_anything_is_written(
    client: RedflowClient, registry: WorkflowRegistry
) -> None:
    wf = define_workflow("bad-input", handler=_noop, registry=registry)
    await client.store.ensure_ready()
    before = await _keys(client)
    with pytest.raises(PayloadEncodingError, match="input of workflow 'bad-input'"):
        await client.enqueue_definition(wf, {"when": datetime.now().astimezone().tzinfo})
    with pytest.raises(TypeError):
        await client.enqueue_definition(wf, object())
    assert await _keys(client) == before


async def test_payload_over_limit_rejected_and_nothing_written(
    redis_url: str, prefix: str, registry: WorkflowRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDFLOW_MAX_PAYLOAD_BYTES", "1000")
    client = create_client(url=redis_url, prefix=prefix)
    client.registry = registry
    try:
        wf = define_workflow("too-big", handler=_noop, registry=registry)
        await client.store.ensure_ready()
        before = await _keys(client)
        with pytest.raises(PayloadTooLargeError, match="input of workflow 'too-big' is 2002 bytes"):
            await client.enqueue_definition(wf, "x" * 2000)
        assert await _keys(client) == before
    finally:
        await client.close()


async def test_unknown_workflow_writes_nothing(client: RedflowClient) -> None:
    await client.store.ensure_ready()
    before = await _keys(client)
    with pytest.raises(UnknownWorkflowError, match="'ghost'"):
        await client.emit_workflow("ghost", {})
    assert await _keys(client) == before


async def test_invalid_options_are_clear(client: RedflowClient, registry: WorkflowRegistry) -> None:
    wf = define_workflow("bad-options", handler=_noop, registry=registry)
    with pytest.raises(ConfigurationError, match="idempotency_key"):
        await client.enqueue_definition(wf, None, idempotency_key="")
    with pytest.raises(ConfigurationError, match="run_at"):
        await client.enqueue_definition(wf, None, run_at="tomorrow")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="must not contain"):
        create_client(url="redis://localhost:1", prefix="bad{tag}")


async def test_refuses_prefix_holding_another_layout(redis_url: str, prefix: str) -> None:
    raw = create_client(url=redis_url, prefix=prefix)
    try:
        await raw.redis.execute("SADD", f"{prefix}:workflows", "legacy")  # what 0.1.x leaves behind
        with pytest.raises(StorageLayoutError, match="another storage layout"):
            await raw.store.ensure_ready()
        await raw.redis.execute("DEL", f"{prefix}:workflows")
        await raw.redis.execute("SET", raw.keys.version, "redflow-storage-999")
        with pytest.raises(StorageLayoutError, match="redflow-storage-999"):
            await raw.store.ensure_ready()
    finally:
        await raw.redis.execute("DEL", raw.keys.version)
        await raw.close()


async def test_refuses_prefix_holding_the_previous_layout(redis_url: str, prefix: str) -> None:
    # redflow-storage-3 tagged keys {p0}, without the prefix: its version marker sits at <prefix>:{p0}:version.
    raw = create_client(url=redis_url, prefix=prefix)
    try:
        await raw.redis.execute("SET", f"{prefix}:{{p0}}:version", "redflow-storage-3")
        with pytest.raises(StorageLayoutError, match=r"redflow-storage-3.*\{p0\}.*new prefix"):
            await raw.store.ensure_ready()
        assert await raw.redis.execute("EXISTS", raw.keys.version) == 0  # nothing claimed
    finally:
        await raw.redis.execute("DEL", f"{prefix}:{{p0}}:version")
        await raw.close()
