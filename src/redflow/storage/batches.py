"""Transitions of one loop tick leave in one script call.

Under load a worker writes many step records and ends many runs at once. Each single call carries
its script's KEYS (a finish names about twenty keys: with a long prefix over a kilobyte per run)
and pays the script's prelude on the server and a command's overhead in the client. The ``*_many``
scripts carry the keys once for every request a store's callers made in the same loop tick and
decide each request on its own, exactly as the single script decides it, in the order the requests
were made, so each caller gets the reply it would have had alone.

A request is committed when ``submit`` is called, as a single call's command is when it is queued:
the batch leaves within the next loop iterations whether or not the caller still waits. A direct
transition of a run (suspend, retry, release, finish) first waits for the replies to that run's
batched requests (``settled``), so the server sees a run's writes in the order they were made. A lost
connection fails every caller of the batch, as it fails every command pipelined with it. A request
the batch script leaves untouched (a finish that hands work on to a queue the call did not name) is
made again alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")

MAX_ITEMS = 100  # requests per batch call
MAX_BYTES = 256 * 1024  # payload bytes per batch call; a request over a quarter of it goes alone


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


@dataclass(frozen=True, slots=True)
class StepRequest:
    run_id: str
    token: bytes
    line: bytes


class Coalescer(Generic[Req, Res]):
    """Collects the requests of one loop tick and sends them as batch calls grouped by ``group``;
    ``many`` answers each request, or None for one to be made again alone with ``one``."""

    def __init__(
        self,
        one: Callable[[Req], Awaitable[Res]],
        many: Callable[[list[Req]], Awaitable[Sequence[Res | None]]],
        group: Callable[[Req], Hashable],
        size: Callable[[Req], int],
        run_of: Callable[[Req], str],
    ) -> None:
        self._one, self._many, self._group, self._size, self._run_of = one, many, group, size, run_of
        self._pending: list[tuple[Req, asyncio.Future[Res]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._unanswered: dict[str, set[asyncio.Future[Res]]] = {}  # run id -> requests not answered yet

    def reset(self) -> None:
        """Forget requests of another event loop (after a fork)."""
        self._pending = []
        self._tasks = set()
        self._unanswered = {}

    def submit(self, request: Req) -> asyncio.Future[Res]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Res] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((request, fut))
        run_id = self._run_of(request)
        self._unanswered.setdefault(run_id, set()).add(fut)
        fut.add_done_callback(lambda f: self._answered(run_id, f))
        return fut

    def _answered(self, run_id: str, fut: asyncio.Future[Res]) -> None:
        futs = self._unanswered.get(run_id)
        if futs is not None:
            futs.discard(fut)
            if not futs:
                del self._unanswered[run_id]

    async def settled(self, run_id: str) -> None:
        """Wait until every request submitted for ``run_id`` has its reply (whatever it is). A direct
        transition of the run waits here, so it never overtakes a batched one made before it: a
        batch leaves a few loop iterations after its requests, a direct call at once."""
        futs = self._unanswered.get(run_id)
        if futs:
            await asyncio.wait(list(futs))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            self._start(self._alone(*pending[0]))
            return
        batches: dict[Hashable, list[tuple[Req, asyncio.Future[Res]]]] = {}
        sizes: dict[Hashable, int] = {}
        for item in pending:
            size = self._size(item[0])
            if size > MAX_BYTES // 4:
                # Sent alone, after what was submitted before it: requests leave in submission order.
                for batch in batches.values():
                    self._start(self._alone(*batch[0]) if len(batch) == 1 else self._together(batch))
                batches.clear()
                sizes.clear()
                self._start(self._alone(*item))
                continue
            key = self._group(item[0])
            batch = batches.setdefault(key, [])
            batch.append(item)
            sizes[key] = sizes.get(key, 0) + size
            if len(batch) >= MAX_ITEMS or sizes[key] >= MAX_BYTES:
                self._start(self._together(batch))
                del batches[key], sizes[key]
        for batch in batches.values():
            self._start(self._alone(*batch[0]) if len(batch) == 1 else self._together(batch))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _alone(self, request: Req, fut: asyncio.Future[Res]) -> None:
        try:
            result = await self._one(request)
        except BaseException as exc:
            _fail(fut, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not fut.done():
            fut.set_result(result)

    async def _together(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        try:
            replies = await self._many([request for request, _ in batch])
        except BaseException as exc:
            for _, fut in batch:
                _fail(fut, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (request, fut), reply in zip(batch, replies, strict=True):
            if reply is None:
                self._start(self._alone(request, fut))
            elif not fut.done():
                fut.set_result(reply)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if fut.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(exc)
