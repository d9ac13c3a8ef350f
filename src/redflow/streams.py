"""Run streams: a workflow with ``stream=True`` writes values with ``ctx.stream.write(value)``;
clients read them live with ``client.read_stream`` (resumable by cursor) or at once with
``client.get_run_stream``.

Values are appended as the handler runs, replays included (each value carries its attempt). A run's
stream ends with an end entry written when the run ends; it expires with the retention window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from ._redis.connection import Connection
from ._redis.errors import ConnectionClosedError, ResponseError
from .encoding import decode, encode_output
from .errors import ConfigurationError
from .step import LeaseLostError
from .storage.codes import Code
from .types import TERMINAL_STATUSES

if TYPE_CHECKING:
    from .storage.store import Store

MAX_STREAM_ENTRIES = 10_000
DEFAULT_READ_LIMIT = 256
DEFAULT_BLOCK_MS = 30_000


MOVE_RETRY_S = 30.0  # how long a blocking stream read keeps retrying across a cluster change
_MOVE_REPLIES = ("MOVED ", "UNBLOCKED", "TRYAGAIN", "CLUSTERDOWN")

class RunStreamRecord(TypedDict):
    attempt: int
    ts: int
    value: Any


@dataclass(frozen=True, slots=True)
class RunStreamChunk:
    record: RunStreamRecord
    cursor_id: str | None = None  # pass as ``resumable`` to continue after this value


class WorkflowStreamWriter:
    """``ctx.stream`` of a streaming workflow."""

    def __init__(self, store: Store, run_id: str, token: bytes, attempt: int, retention_ms: int,
                 max_payload_bytes: int) -> None:
        self._store = store
        self._run_id = run_id
        self._token = token
        self.attempt = attempt
        self._retention_ms = retention_ms
        self._max_payload = max_payload_bytes

    async def write(self, value: Any) -> RunStreamRecord:
        data = encode_output(value, f"stream value of run {self._run_id}", self._max_payload)
        code, _, ts = await self._store.stream_write(
            self._run_id, self._token, self.attempt, data, self._retention_ms, MAX_STREAM_ENTRIES
        )
        if code is Code.STALE:
            raise LeaseLostError(self._run_id)
        return RunStreamRecord(attempt=self.attempt, ts=ts, value=decode(data))


def end_attempt(fields: list[bytes]) -> int | None:
    """The attempt an ``end`` entry closed (0 for one written without it); None for a value entry."""
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    if b"end" not in pairs:
        return None
    return int(pairs.get(b"a", b"0"))


def stream_record(fields: list[bytes]) -> RunStreamRecord | None:
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    if b"end" in pairs:
        return None
    return RunStreamRecord(attempt=int(pairs[b"a"]), ts=int(pairs[b"t"]), value=decode(pairs[b"v"]))


class RunStreamReader:
    """Async iterator over a run's stream; stops at the run's end (or, with ``drain``, when caught up)."""

    def __init__(self, store: Store, run_id: str, *, drain: bool, block_ms: int, limit: int, after: str) -> None:
        self._store = store
        self._run_id = run_id
        self._drain = drain
        self._block_ms = block_ms
        self._limit = limit
        self._after = after
        self._conn: Connection | None = None
        self._closed = False

    def __aiter__(self) -> AsyncIterator[RunStreamChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RunStreamChunk]:
        store = self._store
        try:
            while not self._closed:
                if self._drain:
                    entries = await store.stream_read(self._run_id, self._after, self._limit)
                else:
                    entries = await self._blocking_read()
                for entry_id, fields in entries:
                    self._after = entry_id.decode()
                    record = stream_record(fields)
                    if record is None:
                        header = await self._store.read_header(self._run_id)
                        ended = end_attempt(fields) or 0
                        retried = header is not None and (
                            header.status not in TERMINAL_STATUSES or header.attempt > ended > 0
                        )
                        if retried:
                            continue  # the end of an attempt an operator retried: its next one streams on
                        return
                    yield RunStreamChunk(record=record, cursor_id=self._after)
                if not entries:
                    if self._drain:
                        return
                    header = await self._store.read_header(self._run_id)
                    if header is None or header.status in TERMINAL_STATUSES:
                        return  # ended without streaming anything after the cursor
        finally:
            await self.aclose()

    async def _blocking_read(self) -> list[tuple[bytes, list[bytes]]]:
        """One blocking XREAD from the cursor. Reads change nothing, so when the stream's node stops
        holding it (MOVED, UNBLOCKED, TRYAGAIN, CLUSTERDOWN: a resharding or failover) or the
        connection drops, the read is made again on a fresh connection, for up to MOVE_RETRY_S."""
        store, pause, waited = self._store, 0.05, 0.0
        while True:
            if self._conn is None or self._conn.closed:
                self._conn = await store.blocking_connection(self._run_id)
            try:
                return await store.stream_read(self._run_id, self._after, self._limit, self._block_ms, self._conn)
            except (ResponseError, ConnectionClosedError) as exc:
                retriable = isinstance(exc, ConnectionClosedError) or str(exc).startswith(_MOVE_REPLIES)
                if not retriable or waited >= MOVE_RETRY_S or self._closed:
                    raise
                self._conn.close()
                self._conn = None
                store.redis.routes_stale()
                await asyncio.sleep(pause)
                waited += pause
                pause = min(pause * 2, 1.0)

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def check_read_args(limit: int | None, block_ms: int | None) -> tuple[int, int]:
    lim = DEFAULT_READ_LIMIT if limit is None else limit
    if not isinstance(lim, int) or not 1 <= lim <= 1000:
        raise ConfigurationError(f"limit must be an integer from 1 to 1000, got {limit!r}")
    block = DEFAULT_BLOCK_MS if block_ms is None else block_ms
    if not isinstance(block, int) or block < 1:
        raise ConfigurationError(f"block_ms must be a positive integer, got {block_ms!r}")
    return lim, block
