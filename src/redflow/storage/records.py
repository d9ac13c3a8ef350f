"""Internal records as stored in Redis, decoded with msgspec.

The run header is written by Lua (cjson) and read here; field names are kept short because every run
carries one. Step records are JSON lines appended by ``step.lua``.
"""

from __future__ import annotations

from typing import Any

import msgspec


class RunHeader(msgspec.Struct, omit_defaults=True):
    w: str  # workflow
    q: str  # queue
    s: str = "queued"  # status
    a: int = 0  # attempt (0 before the first claim)
    m: int = 3  # max attempts
    c: int = 0  # created at, ms
    av: int | None = None  # available at (due), ms
    st: int | None = None  # current attempt started at, ms
    sa: int | None = None  # first attempt started at, ms
    f: int | None = None  # finished at, ms
    o: str | None = None  # owning worker id
    x: int | None = None  # liveness lapses during the current attempt
    h: int | None = None  # 1 while the on_failure hook is pending
    rc: int | None = None  # 1 when requeued without ending the attempt
    p: str | None = None  # parent run id
    pq: str | None = None  # parent's queue, when the parent waits for this run to end
    cr: int | None = None  # cancel requested at, ms
    e: int | None = None  # 1 while an error from an earlier attempt is stored


class StepRecord(msgspec.Struct, omit_defaults=True):
    """One line of a run's step history. A later line for the same name supersedes earlier ones.

    ``s`` is "ok" for a completed step, "wait" for a durable wait in progress, and "done" for the
    resolution of a wait (``r``: "timeout", "event", or the child's final status).
    """

    n: str  # name
    q: int  # position of the step in the handler's sequence of steps, from 1
    a: int  # attempt that recorded it
    o: msgspec.Raw = msgspec.Raw(b"null")  # output JSON (for a resolved wait: the event or child outcome)
    t0: int = 0  # started at, ms
    t1: int = 0  # finished at, ms
    s: str = "ok"  # ok | wait | done
    k: str = "run"  # run | sleep | event | child | emit
    r: str | None = None  # how a wait was resolved
    u: int | None = None  # a wait's deadline, ms (server clock)
    ch: str | None = None  # child run id


_header_decoder = msgspec.json.Decoder(RunHeader)
_step_decoder = msgspec.json.Decoder(StepRecord)
_step_encoder = msgspec.json.Encoder()


def decode_header(data: bytes) -> RunHeader:
    return _header_decoder.decode(data)


def decode_steps(data: bytes) -> list[StepRecord]:
    if not data:
        return []
    return [_step_decoder.decode(line) for line in data.split(b"\n") if line]


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
