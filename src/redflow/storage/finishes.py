"""Finishes of one loop tick leave in one script call.

A worker ends many runs at once under load. Each ``finish.lua`` call carries the full list of KEYS
(about twenty key names, which with a long prefix is over a kilobyte per run) and pays the script's
prelude; ``finish_many.lua`` carries them once for every run a store's callers finished in the same
loop tick. Each run is still decided on its own, exactly as ``finish.lua`` decides it, and each
caller gets its own reply.

The request is committed when ``submit`` is called, as a single call's command is when it is
queued: the batch leaves on the next loop iteration whether or not the caller still waits. A lost
connection fails every caller of the batch, as it fails every command pipelined with it; a run
whose handed-on work needs a queue it was not given is finished alone (``finish.lua`` asks for
queues until it has them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .codes import Code

if TYPE_CHECKING:
    from .store import Store

MAX_RUNS = 100  # runs per finish_many call
MAX_BYTES = 256 * 1024  # outputs and errors per call; a larger payload is finished alone


@dataclass(frozen=True, slots=True)
class FinishRequest:
    run_id: str
    token: bytes
    worker_id: str
    status: str
    payload: bytes
    hook: bool
    retention_ms: int
    queue: str


class FinishBatcher:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[tuple[FinishRequest, asyncio.Future[tuple[Code, str]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def reset(self) -> None:
        """Forget requests of another event loop (after a fork)."""
        self._pending = []
        self._tasks = set()

    def submit(self, request: FinishRequest) -> asyncio.Future[tuple[Code, str]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Code, str]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((request, fut))
        return fut

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        batches: dict[tuple[str, int], list[tuple[FinishRequest, asyncio.Future[tuple[Code, str]]]]] = {}
        for item in pending:
            request = item[0]
            if len(request.payload) > MAX_BYTES // 4:
                self._start(self._one(*item))
                continue
            key = (request.worker_id, request.retention_ms)
            batch = batches.setdefault(key, [])
            batch.append(item)
            if len(batch) >= MAX_RUNS or sum(len(r.payload) for r, _ in batch) >= MAX_BYTES:
                self._start(self._many(batch))
                del batches[key]
        for batch in batches.values():
            self._start(self._one(*batch[0]) if len(batch) == 1 else self._many(batch))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _one(self, request: FinishRequest, fut: asyncio.Future[tuple[Code, str]]) -> None:
        try:
            result = await self._store.finish_one(request)
        except BaseException as exc:
            _fail(fut, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not fut.done():
            fut.set_result(result)

    async def _many(self, batch: list[tuple[FinishRequest, asyncio.Future[tuple[Code, str]]]]) -> None:
        requests = [request for request, _ in batch]
        try:
            replies = await self._store.finish_many(requests)
        except BaseException as exc:
            for _, fut in batch:
                _fail(fut, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (request, fut), (code, detail) in zip(batch, replies, strict=True):
            if code is Code.NEED_QUEUES:
                self._start(self._one(request, fut))
            elif not fut.done():
                fut.set_result((code, detail if code is Code.OK else ""))


def _fail(fut: asyncio.Future[tuple[Code, str]], exc: BaseException) -> None:
    if fut.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(exc)
