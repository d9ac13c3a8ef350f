"""The handle of a started run, and waiting for a run's outcome."""

from __future__ import annotations

import asyncio
import builtins
from typing import TYPE_CHECKING, Any

from .._redis.pubsub import Subscriber
from ..encoding import decode
from ..errors import CanceledError, RunFailedError, RunNotFoundError, TimeoutError
from ..storage.store import Store
from ..types import TERMINAL_STATUSES, RunState

if TYPE_CHECKING:
    from .facade import RedflowClient

DEFAULT_RESULT_TIMEOUT_MS = 30_000


class RunHandle:
    """A started run: its ``id``, its state, and its result once it ends."""

    __slots__ = ("_client", "id")

    def __init__(self, client: RedflowClient, run_id: str) -> None:
        self._client = client
        self.id = run_id

    async def get_state(self) -> RunState | None:
        return await self._client.get_run(self.id)

    async def result(self, *, timeout_ms: int = DEFAULT_RESULT_TIMEOUT_MS) -> Any:
        """The run's output; raises RunFailedError, CanceledError or TimeoutError."""
        return await self._client.wait_for_result(self.id, timeout_ms=timeout_ms)

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r})"


async def wait_for_outcome(store: Store, subscriber: Subscriber, channel: bytes, run_id: str, timeout_ms: int) -> Any:
    """The run's output once it ends, woken by its completion message on ``channel`` (never polled);
    raises RunFailedError, CanceledError, RunNotFoundError or, after ``timeout_ms``, TimeoutError."""
    changed = asyncio.Event()
    pushed: list[bytes] = []

    def on_message(payload: bytes | None) -> None:
        if payload is not None:
            pushed.append(payload)
        changed.set()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_ms / 1000
    # A single server delivers a message only to connections subscribed when it was published, so
    # one that arrives after the subscription is confirmed reports an end no older than the read
    # below. A cluster relays PUBLISH between nodes over its bus, late: a message from an end that
    # an operator's retry has since undone can arrive after the subscription. There a message only
    # wakes the read.
    trust_messages = not store.redis.is_cluster
    await subscriber.subscribe(channel, on_message)
    try:
        while True:
            changed.clear()
            outcome = await store.read_outcome(run_id)
            if outcome is None:
                raise RunNotFoundError(f"run {run_id} not found (never created, or removed by retention)")
            status, out, err = outcome
            if status in TERMINAL_STATUSES:
                return result_of(run_id, status, out, err)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"run {run_id} did not finish within {timeout_ms} ms (status {status})")
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except builtins.TimeoutError:
                continue
            for message in pushed if trust_messages else ():
                head, sep, body = message.partition(b"\n")
                done = head.decode()
                if sep and done in TERMINAL_STATUSES:
                    # The completion message carries the outcome: no read needed.
                    return result_of(run_id, done, body if done == "succeeded" else None,
                                     None if done == "succeeded" else body)
            pushed.clear()
    finally:
        subscriber.unsubscribe(channel, on_message)


def result_of(run_id: str, status: str, out: bytes | None, err: bytes | None) -> Any:
    """The output of an ended run, or the exception its ending raises."""
    if status == "succeeded":
        return None if out is None else decode(out)
    error = decode(err) if err else {"name": "Error", "message": "unknown error", "kind": "error"}
    if status == "canceled":
        raise CanceledError(f"Run canceled: run {run_id}: {error.get('message', '')}")
    raise RunFailedError(run_id, error)
