"""Microbenchmarks of the hot functions: `.venv/bin/pytest bench/micro --benchmark-only`.

CI runs them once each with --benchmark-disable so they keep working.
"""

from __future__ import annotations

import msgspec

from redflow.encoding import decode, encode
from redflow.ids import new_run_id
from redflow.storage.keys import PartitionKeys, tag
from redflow.storage.records import StepRecord, decode_header, decode_steps, encode_step, parse_claim

# As the scripts write it: a MessagePack map with the wire names of records.RunHeader.
HEADER = msgspec.msgpack.encode({"w": "send-welcome-email", "q": "default", "s": "running", "a": 1, "m": 3,
                                 "c": 1732690000000, "av": 1732690000000, "st": 1732690000100,
                                 "sa": 1732690000100, "o": "host:123:abcd1234"})
STEPS = b"".join(
    encode_step(StepRecord(name=f"step-{i}", position=i + 1, attempt=1, output=msgspec.Raw(b'{"ok":true}'),
                           started_at_ms=1, finished_at_ms=2))
    for i in range(5)
)


def _claim_reply(n: int) -> list[object]:
    reply: list[object] = [0, -1]
    for i in range(n):
        reply += [f"01M8E0DC4KRVT9SSPGAWNEE{i:03d}-p0".encode(), b"run", f"17.{i}".encode(), HEADER,
                  b'{"user_id":"u1"}', b"", b""]
    return reply


def test_decode_run_header(benchmark) -> None:  # type: ignore[no-untyped-def]
    header = benchmark(decode_header, HEADER)
    assert header.workflow == "send-welcome-email"


def test_encode_step_record(benchmark) -> None:  # type: ignore[no-untyped-def]
    record = StepRecord(name="charge", position=1, attempt=1, output=msgspec.Raw(b'{"charged":10}'), started_at_ms=1,
                        finished_at_ms=2)
    assert benchmark(encode_step, record).endswith(b"\n")


def test_decode_step_history(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert len(benchmark(decode_steps, STEPS)) == 5


def test_parse_claim_batch_of_100(benchmark) -> None:  # type: ignore[no-untyped-def]
    reply = _claim_reply(100)
    _, runs, _ = benchmark(parse_claim, reply)
    assert len(runs) == 100


def test_build_queue_and_index_keys(benchmark) -> None:  # type: ignore[no-untyped-def]
    keys = PartitionKeys("redflow:v1")

    def build() -> tuple[str, str, str, str]:
        return keys.ready("default"), keys.scheduled("default"), keys.bell("default"), tag("send-welcome-email")

    assert benchmark(build)[0] == "redflow:v1:{redflow:v1:p0}:q:default:ready"


def test_payload_round_trip(benchmark) -> None:  # type: ignore[no-untyped-def]
    value = {"user_id": "u1", "items": list(range(20)), "meta": {"a": "b"}}
    assert benchmark(lambda: decode(encode(value))) == value


def test_new_run_id(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(new_run_id, "p0").endswith("-p0")
