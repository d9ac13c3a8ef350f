"""The minimal-lifecycle ceiling probe (bench/ceiling.py) is correct: every run is finalized exactly once.

No timing is asserted here: the probe's speed is what the harness measures, not what a test checks.
"""

from __future__ import annotations

import uuid

import msgspec
import pytest

from bench import ceiling, server
from bench.ceiling import Keys, Probe


@pytest.mark.parametrize(("n", "batch"), [(250, 100), (1, 100), (7, 3)])
async def test_probe_finalizes_every_run_exactly_once(redis_url: str, n: int, batch: int) -> None:
    redis = server.connect(redis_url)
    prefix = f"rft:ceiling:{uuid.uuid4().hex[:10]}"
    keys = Keys.under(prefix)
    try:
        probe = Probe(await redis.open_connection(), prefix, batch)
        await probe.load()
        ids = await probe.enqueue(keys, n)
        assert len(set(ids)) == n

        result = await probe.drain(keys)

        assert (result.finalized, result.refused) == (n, 0)
        assert await redis.execute("LLEN", keys.ready) == 0
        statuses = await redis.execute("HGETALL", keys.runs)
        assert dict(zip(statuses[::2], statuses[1::2], strict=True)) == {i: b"succeeded" for i in ids}
        inputs = dict(zip(*[iter(await redis.execute("HGETALL", keys.inputs))] * 2, strict=True))
        outputs = dict(zip(*[iter(await redis.execute("HGETALL", keys.outputs))] * 2, strict=True))
        assert set(outputs) == set(ids)
        assert all(msgspec.json.decode(outputs[i]) == msgspec.json.decode(inputs[i]) for i in ids)  # echo
        assert sorted(msgspec.json.decode(v)["i"] for v in outputs.values()) == list(range(n))
        # A second finalize of a finished run is refused and changes nothing: once means once.
        assert await probe.finalize_again(keys, ids[0]) == 0
        assert await redis.execute("HGET", keys.outputs, ids[0]) == outputs[ids[0]]
        # Claims per batch of `batch` runs, then the empty claim that ends the drain.
        assert result.commands["EVALSHA"] == n + -(-n // batch) + 1
        probe.conn.close()
    finally:
        await redis.execute("UNLINK", *keys.all())
        await redis.close()


async def test_probe_refuses_a_run_that_is_not_running(redis_url: str) -> None:
    redis = server.connect(redis_url)
    prefix = f"rft:ceiling:{uuid.uuid4().hex[:10]}"
    keys = Keys.under(prefix)
    try:
        probe = Probe(await redis.open_connection(), prefix)
        await probe.load()
        ids = await probe.enqueue(keys, 3)  # queued, never claimed
        assert await probe.finalize_again(keys, ids[0]) == 0
        assert await redis.execute("HGET", keys.runs, ids[0]) == b"queued"
        assert await redis.execute("HEXISTS", keys.outputs, ids[0]) == 0
        probe.conn.close()
    finally:
        await redis.execute("UNLINK", *keys.all())
        await redis.close()


def test_relative_metrics_divide_within_one_repetition() -> None:
    metrics = {"ceiling_per_s": 50_000.0, "drain_per_s": 5_000.0, "drain_3step_per_s": 2_500.0,
               "drain_tracing_sdk_per_s": 1_000.0, "enqueue_serial_per_s": 2_000.0, "idle_cmds_per_s": 1.6,
               "latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "latency_mean_ms": 1.1,
               "evalsha_rtt_p50_ms": 0.1, "evalsha_socket_p50_ms": 0.05}
    out = ceiling.relative_metrics(metrics)
    assert out == pytest.approx({
        "drain_per_s_vs_ceiling": 0.1, "drain_3step_per_s_vs_ceiling": 0.05,
        "drain_tracing_sdk_per_s_vs_ceiling": 0.02, "enqueue_serial_per_s_vs_ceiling": 0.04,
        "latency_p50_ms_vs_rtt": 10.0, "latency_p99_ms_vs_rtt": 20.0,
        "latency_p50_ms_vs_socket_rtt": 20.0, "latency_p99_ms_vs_socket_rtt": 40.0,
    })
    assert ceiling.relative_metrics({"drain_per_s": 5_000.0}) == {}  # no ceiling in this repetition: no ratio


def test_command_usec_counts_script_commands_once() -> None:
    before = {"evalsha": (10, 1000), "hset": (0, 0), "info": (5, 50)}
    after = {"evalsha": (20, 3000), "hset": (40, 400), "info": (7, 80), "zlexcount": (4, 40)}
    # The client sent 10 EVALSHA and 5 HSET; the other 35 HSET ran inside its scripts; INFO and ZLEXCOUNT
    # came from the measuring connection.
    top, nested = server.command_usec(before, after, {"EVALSHA": 10, "HSET": 5}, {"INFO": 2, "ZLEXCOUNT": 4})
    assert top == pytest.approx(2000 + 400 * 5 / 40)
    assert nested == pytest.approx(400 * 35 / 40)
