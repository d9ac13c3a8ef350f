"""Every Lua script honours its header, the key schema and the return-code enum."""

from __future__ import annotations

import re

import pytest

from redflow.storage.codes import Code
from redflow.storage.keys import PartitionKeys, partition_of
from redflow.storage.scripts import SCRIPT_NAMES, _read, load_scripts


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def hash_slot(key: str) -> int:
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return _crc16(key.encode()) % 16384


def _libs(raw: str) -> str:
    return "".join(_read(f"lib/{lib}.lua") for lib in re.findall(r"^--!include (\w+)", raw, re.MULTILINE))


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_script_header_matches_body(name: str) -> None:
    script = load_scripts()[name]
    raw = _read(f"{name}.lua")
    assert raw.startswith(f"-- {name}:"), "the header opens with the script's name and purpose"
    assert script.key_names, "KEYS are listed"
    body = raw.split("\n\n", 1)[-1]
    declared = set(script.key_names)
    by_index = {int(i) for i in re.findall(r"KEYS\[(\d+)\]", body)}
    by_name = set(re.findall(r"\bK\.(\w+)", body))
    if script.variadic_keys:  # a key the body takes from the variadic tail of KEYS (one per run, ...)
        declared |= set(re.findall(r"\bK\.(\w+) = KEYS\[", body))
    assert by_name <= declared, f"{name} uses undeclared keys {by_name - declared}"
    if script.variadic_keys:
        assert max(by_index, default=0) <= len(script.key_names) - 1 or "#KEYS" in body or "KEYS[k" in body
    else:
        assert by_index <= set(range(1, len(script.key_names) + 1)), f"{name} uses undeclared KEYS {by_index}"
    libs = _libs(raw)
    for i, key in enumerate(script.fixed_keys, 1):
        used = f"KEYS[{i}]" in body or re.search(rf"\bK\.{key}\b", body + libs)
        assert used or name == "enqueue", f"{name} declares unused key {key}"
    used_args = {int(i) for i in re.findall(r"ARGV\[(\d+)\]", body)}
    if not script.variadic_args:
        assert used_args <= set(range(1, script.arg_count + 1)), f"{name} uses undeclared ARGV {used_args}"
    assert "-- RETURNS" in raw




@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_script_keys_are_partition_keys_or_given(name: str) -> None:
    """A header key is either a partition-wide key of that name or one the caller names (owned, ...)."""
    given = {"owned", "stream", "throttle_counter", "rate_counter", "idempotency", "debounce", "queues",
             "ready", "scheduled", "sched", "bell", "parent", "event", "cron", "event_idempotency"}
    for key in load_scripts()[name].key_names:
        assert key in PartitionKeys.__slots__ or key in given or not key.isidentifier(), f"{name}: key {key}"


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_script_return_codes_are_enum_members(name: str) -> None:
    raw = _read(f"{name}.lua")
    for code in re.findall(r"C\.([A-Z_]+)", raw):
        assert code in Code.__members__, f"{name} returns unknown code C.{code}"
    body = raw.split("\n\n", 1)[-1]
    assert not re.search(r"return\s+\{?\s*-?\d", body), f"{name} returns a bare number"
    assert not re.search(r"return\s+C\.", body), f"{name} returns a bare code: every script returns {{code, ...}}"


def test_no_script_builds_key_names() -> None:
    for name in SCRIPT_NAMES:
        body = _read(f"{name}.lua")
        for call in re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", body):
            target = call[1].strip()
            if call[0] == "PUBLISH":  # a channel, not a key
                continue
            # KEYS[i], or a local bound to KEYS entries (queue triples, a table of KEYS, a chosen key)
            assert target.startswith(
                ("KEYS[", "K.", "ready", "sched", "bell", "q[", "q.", "k.", "k[", "index_key", "bell_key", "steps_key",
                 "waits_key", "waiters_key", "outcome_key", "counter", "runs_key", "sched_key")
            ), (
                f"{name}: {call[0]} on {target} is not a key from KEYS"
            )


async def test_every_call_keeps_its_keys_in_one_slot(client) -> None:
    """Record the KEYS of every script call a full run makes; all share the partition's slot."""
    from redflow.storage.scripts import ScriptRunner

    calls: list[tuple[str, list[str]]] = []
    original = ScriptRunner.call

    async def recording(self, name, keys, args):  # type: ignore[no-untyped-def]  # every call ends here
        calls.append((name, list(keys)))
        return await original(self, name, keys, args)

    ScriptRunner.call = recording  # type: ignore[method-assign]
    try:
        from redflow import RunFailedError, StartWorkerOptions, WorkflowRegistry, define_workflow, start_worker

        reg = WorkflowRegistry()

        async def step() -> int:
            return 1

        async def handler(ctx) -> int:  # type: ignore[no-untyped-def]
            if ctx.run.attempt == 1:
                await ctx.step.run("s", step)
                raise RuntimeError("retry")
            return 2

        async def hook(ctx) -> None:  # type: ignore[no-untyped-def]
            return None

        from redflow import WorkflowRetryPolicy

        wf = define_workflow("slots", handler=handler, retries=WorkflowRetryPolicy(delay=5), registry=reg)
        wf2 = define_workflow("slots-fail", handler=handler, max_attempts=1, on_failure=hook, registry=reg)
        client.registry = reg
        worker = await start_worker(
            StartWorkerOptions(app="t", url=_url(client), prefix=client.prefix, registry=reg)
        )
        try:
            await (await client.enqueue_definition(wf, None, idempotency_key="x")).result(timeout_ms=10_000)
            with pytest.raises(RunFailedError):
                await (await client.enqueue_definition(wf2, None)).result(timeout_ms=10_000)
        finally:
            await worker.stop()
    finally:
        ScriptRunner.call = original  # type: ignore[method-assign]
    names = {name for name, _ in calls}
    assert {"enqueue", "claim", "step", "finish", "retry", "hook_done", "heartbeat", "resign"} <= names
    for name, keys in calls:
        assert len({hash_slot(k) for k in keys}) == 1, f"{name} spans slots: {keys}"


def _url(client) -> str:  # type: ignore[no-untyped-def]
    a = client.redis.address
    return f"redis://{a.host}:{a.port}/{a.db}"


def test_keys_refuse_braces_and_tag_the_partition() -> None:
    keys = PartitionKeys("app:v1")
    assert keys.runs == "app:v1:{app:v1:p0}:runs"
    assert hash_slot(keys.ready("a")) == hash_slot(keys.idempotency("w", "{weird}")) == hash_slot(keys.runs)
    assert partition_of("01ABC-p0") == "p0"
    with pytest.raises(ValueError):
        partition_of("nodash")


def _helper_keys(helper: str) -> set[str]:
    """Keys a helper of lib/transitions.lua reads or writes (K.<name>), including helpers it calls."""
    lib = _read("lib/transitions.lua") + _read("lib/common.lua")
    bodies = dict(re.findall(r"^local function (\w+)\(.*?\)\n(.*?)^end\n", lib, re.MULTILINE | re.DOTALL))
    seen: set[str] = set()
    keys: set[str] = set()

    def walk(name: str) -> None:
        if name in seen or name not in bodies:
            return
        seen.add(name)
        keys.update(re.findall(r"\bK\.(\w+)", bodies[name]))
        for called in re.findall(r"\b(\w+)\(", bodies[name]):
            walk(called)

    walk(helper)
    return keys - {"queues", "owned", "stream"}  # queues are named per call; owned and stream are optional


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_scripts_declare_every_key_their_helpers_touch(name: str) -> None:
    raw = _read(f"{name}.lua")
    if "--!include transitions" not in raw:
        return
    body = raw.split("\n\n", 1)[-1]
    declared = set(load_scripts()[name].key_names)
    for helper in ("end_run", "stop_running", "plan", "wake_throttled", "disown", "held_add", "load_run",
                   "attempt_record", "drop_wait", "holds_lease", "mutex_free_for", "held_first"):
        if re.search(rf"\b{helper}\(", body):
            missing = _helper_keys(helper) - declared
            assert not missing, f"{name} calls {helper}, which needs keys {sorted(missing)}"
