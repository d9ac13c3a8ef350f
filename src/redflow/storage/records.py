"""Internal records as stored in Redis, decoded with msgspec.

Every record has readable attribute names here and short names on the wire (the run header is written
by Lua, which uses the short names; every run carries one). Step records are JSON lines appended by
``step.lua``; attempt records are written by the transitions that end an attempt.
"""

from __future__ import annotations

from typing import Any

import msgspec


def _wire(name: str) -> Any:
    return msgspec.field(name=name)


class RunHeader(msgspec.Struct, omit_defaults=True):
    """A run's header. Lua scripts read and write it with the wire names (the short names below)."""

    workflow: str = _wire("w")
    queue: str = _wire("q")
    status: str = msgspec.field(default="queued", name="s")
    attempt: int = msgspec.field(default=0, name="a")  # 0 before the first claim
    max_attempts: int = msgspec.field(default=3, name="m")
    created_at_ms: int = msgspec.field(default=0, name="c")
    available_at_ms: int | None = msgspec.field(default=None, name="av")  # due time
    attempt_started_at_ms: int | None = msgspec.field(default=None, name="st")
    started_at_ms: int | None = msgspec.field(default=None, name="sa")  # first attempt's start
    finished_at_ms: int | None = msgspec.field(default=None, name="f")
    owner: str | None = msgspec.field(default=None, name="o")  # worker id holding the run
    lapses: int | None = msgspec.field(default=None, name="x")  # consecutive worker deaths in this attempt
    hook_pending: int | None = msgspec.field(default=None, name="h")  # 1 while on_failure has not run
    resumed: int | None = msgspec.field(default=None, name="rc")  # requeued without ending its attempt
    parent_id: str | None = msgspec.field(default=None, name="p")
    cancel_requested_at_ms: int | None = msgspec.field(default=None, name="cr")
    cancel_reason: str | None = msgspec.field(default=None, name="cx")
    error_stored: int | None = msgspec.field(default=None, name="e")  # an earlier attempt's error is kept
    held_member: str | None = msgspec.field(default=None, name="hd")  # waiting for capacity or a mutex
    mutex_field: str | None = msgspec.field(default=None, name="mf")  # <tag(workflow)><mutex key>
    throttle_member: str | None = msgspec.field(default=None, name="tq")  # place in a throttle queue
    throttle_group: str | None = msgspec.field(default=None, name="tg")  # <tag(workflow)><throttle key>
    debounced: int | None = msgspec.field(default=None, name="db")  # created through a debounce key
    debounce_deadline_ms: int | None = msgspec.field(default=None, name="dl")  # latest start of a debounce


class StepRecord(msgspec.Struct, omit_defaults=True):
    """One line of a run's step history. A later line for the same name supersedes earlier ones.

    ``state`` is "ok" for a completed step, "wait" for a durable wait in progress, and "done" for
    the resolution of a wait (``resolution``: "timeout", "event", "input", or the child's final
    status). A wait's line is replaced by its resolution, which keeps the wait's start and deadline.
    """

    name: str = _wire("n")
    position: int = _wire("q")  # position of the step in the handler's sequence of steps, from 1
    attempt: int = _wire("a")  # attempt that recorded it
    output: msgspec.Raw = msgspec.field(default=msgspec.Raw(b"null"), name="o")  # output JSON
    started_at_ms: int = msgspec.field(default=0, name="t0")
    finished_at_ms: int = msgspec.field(default=0, name="t1")
    state: str = msgspec.field(default="ok", name="s")  # ok | wait | done
    kind: str = msgspec.field(default="run", name="k")  # run | sleep | event | child | input | emit
    resolution: str | None = msgspec.field(default=None, name="r")
    wait_until_ms: int | None = msgspec.field(default=None, name="u")  # a wait's deadline (server clock)
    child_id: str | None = msgspec.field(default=None, name="ch")


class AttemptRecord(msgspec.Struct, omit_defaults=True):
    """How one attempt ended (written by the transition that ended it; a success is the run itself)."""

    attempt: int = _wire("a")
    payload: msgspec.Raw = msgspec.field(default=msgspec.Raw(b"null"), name="o")  # error (or output) JSON
    started_at_ms: int = msgspec.field(default=0, name="t0")
    finished_at_ms: int = msgspec.field(default=0, name="t1")
    status: str = msgspec.field(default="failed", name="r")


class WaitRecord(msgspec.Struct, omit_defaults=True):
    """The durable wait a suspended run is in (hash ``waits``)."""

    name: str = _wire("n")
    position: int = _wire("q")
    kind: str = _wire("k")  # sleep | event | child | input
    started_at_ms: int | None = msgspec.field(default=None, name="t0")
    wait_until_ms: int | None = msgspec.field(default=None, name="u")
    child_id: str | None = msgspec.field(default=None, name="ch")
    waiter_member: str | None = msgspec.field(default=None, name="m")  # entry in `waiters`
    line: int | None = msgspec.field(default=None, name="ln")  # history line the resolution replaces
    info: str | None = None  # an input wait's details, JSON text ({msg, schema})


_header_decoder = msgspec.json.Decoder(RunHeader)
_attempt_decoder = msgspec.json.Decoder(AttemptRecord)
_wait_decoder = msgspec.json.Decoder(WaitRecord)
_step_decoder = msgspec.json.Decoder(StepRecord)
_step_encoder = msgspec.json.Encoder()


def decode_header(data: bytes) -> RunHeader:
    return _header_decoder.decode(data)


def decode_steps(data: bytes) -> list[StepRecord]:
    if not data:
        return []
    return [_step_decoder.decode(line) for line in data.split(b"\n") if line]


def decode_attempt(data: bytes) -> AttemptRecord:
    return _attempt_decoder.decode(data)


def decode_wait(data: bytes) -> WaitRecord:
    return _wait_decoder.decode(data)


def encode_step(record: StepRecord) -> bytes:
    return _step_encoder.encode(record) + b"\n"


class ClaimedRun(msgspec.Struct):
    id: str
    kind: str  # "run", "hook", or "admit" (a first start that must pass throttle / rate limit)
    token: bytes
    header: RunHeader
    input: bytes
    steps: list[StepRecord]
    error: bytes


def parse_claim(reply: list[Any]) -> tuple[int, list[ClaimedRun]]:
    """(ms until the next scheduled run or -1, claimed runs) from a claim.lua reply."""
    runs = []
    for i in range(2, len(reply), 7):
        runs.append(
            ClaimedRun(
                id=reply[i].decode(),
                kind=reply[i + 1].decode(),
                token=reply[i + 2] if isinstance(reply[i + 2], bytes) else str(reply[i + 2]).encode(),
                header=_header_decoder.decode(reply[i + 3]),
                input=reply[i + 4],
                steps=decode_steps(reply[i + 5]),
                error=reply[i + 6],
            )
        )
    return int(reply[1]), runs
