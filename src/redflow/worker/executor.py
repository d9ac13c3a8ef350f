"""Executes one claimed run (or its on_failure hook) and records the outcome.

Ordering invariants:
- a step output is written (fenced) before the handler continues past the step;
- a terminal failure is durable (finish.lua) before on_failure runs, and the run stays owned until
  hook_done, so a crash during the hook hands the hook to another worker;
- a STALE reply means another worker owns the run now: this attempt stops without writing anything.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..encoding import decode, encode_output
from ..errors import RedflowError, UnknownWorkflowError
from ..retries import retry_delay_ms, serialize_error
from ..step import LeaseLostError, StepApi
from ..storage.codes import Code
from ..storage.records import ClaimedRun, StepRecord, encode_step
from ..types import OnFailureContext, RunContext, WorkflowHandlerContext

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("redflow.worker")

UNKNOWN_WORKFLOW_DEFER_MS = 5_000


class _RedisRecorder:
    __slots__ = ("_run", "_store")

    def __init__(self, store: Any, run: ClaimedRun) -> None:
        self._store = store
        self._run = run

    async def record(self, record: StepRecord) -> None:
        code = await self._store.record_step(self._run.id, self._run.token, encode_step(record))
        if code is Code.STALE:
            raise LeaseLostError(self._run.id)


@dataclass(slots=True)
class Execution:
    """A run in flight on this worker."""

    claimed: ClaimedRun
    signal: asyncio.Event
    task: asyncio.Task[None] | None = None
    steps: StepApi | None = None
    settled: bool = False  # a terminal, retry or release write was sent: nothing to hand back


async def execute(worker: Worker, ex: Execution) -> None:
    claimed = ex.claimed
    try:
        if claimed.kind == "hook":
            await _run_hook(worker, ex)
        else:
            await _run(worker, ex)
    except LeaseLostError:
        log.warning("run %s: lost ownership to another worker; this attempt stops", claimed.id)
        ex.settled = True


async def _run(worker: Worker, ex: Execution) -> None:
    claimed = ex.claimed
    h = claimed.header
    store = worker.store
    definition = worker.registry.get(h.w)
    if definition is None:
        # Another worker may have the definition (rolling deploy): defer, keeping the attempt.
        log.warning("run %s: workflow %r is not defined in this worker; deferring it", claimed.id, h.w)
        error = serialize_error(UnknownWorkflowError(h.w))
        ex.settled = True
        await store.retry(claimed.id, claimed.token, worker.id, h.q, UNKNOWN_WORKFLOW_DEFER_MS, error, True)
        return
    run = RunContext(id=claimed.id, workflow=h.w, queue=h.q, attempt=h.a, max_attempts=h.m)
    input_value = decode(claimed.input)
    cached = {r.n: r for r in claimed.steps}
    steps = StepApi(run, ex.signal, cached, _RedisRecorder(store, claimed), worker.max_payload_bytes)
    ex.steps = steps
    ctx = WorkflowHandlerContext(input=input_value, run=run, signal=ex.signal, step=steps)
    try:
        output = await definition.handler(ctx)
        data = encode_output(
            output, f"output of workflow {h.w!r} in run {claimed.id}", worker.max_payload_bytes
        )
    except (LeaseLostError, asyncio.CancelledError):
        raise
    except Exception as error:
        await _fail_attempt(worker, ex, run, input_value, error)
        return
    ex.settled = True
    code = await store.finish(claimed.id, claimed.token, worker.id, "succeeded", data, False, worker.retention_ms)
    if code is Code.STALE:
        raise LeaseLostError(claimed.id)


async def _fail_attempt(
    worker: Worker, ex: Execution, run: RunContext, input_value: Any, error: BaseException
) -> None:
    claimed = ex.claimed
    definition = worker.registry.get(run.workflow)
    assert definition is not None
    try:
        delay = await retry_delay_ms(error, input_value, run, definition.options.retries)
    except Exception as policy_error:
        log.warning("run %s: retry policy raised %r; failing the run", claimed.id, policy_error)
        error, delay = policy_error, None
    payload = serialize_error(error)
    ex.settled = True
    if delay is not None:
        code = await worker.store.retry(claimed.id, claimed.token, worker.id, run.queue, delay, payload)
        if code is Code.STALE:
            raise LeaseLostError(claimed.id)
        return
    hook = definition.options.on_failure is not None
    code = await worker.store.finish(
        claimed.id, claimed.token, worker.id, "failed", payload, hook, worker.retention_ms
    )
    if code is Code.STALE:
        raise LeaseLostError(claimed.id)
    if hook:
        await _call_hook(worker, claimed, run, input_value, error)


async def _run_hook(worker: Worker, ex: Execution) -> None:
    """on_failure of a run whose failure was recorded by another worker (or the reaper)."""
    claimed = ex.claimed
    h = claimed.header
    run = RunContext(id=claimed.id, workflow=h.w, queue=h.q, attempt=h.a, max_attempts=h.m)
    stored = decode(claimed.error) if claimed.error else {}
    error = StoredError(stored)
    ex.settled = True
    await _call_hook(worker, claimed, run, decode(claimed.input), error)


async def _call_hook(
    worker: Worker, claimed: ClaimedRun, run: RunContext, input_value: Any, error: BaseException
) -> None:
    definition = worker.registry.get(run.workflow)
    hook = definition.options.on_failure if definition is not None else None
    if hook is not None:
        try:
            result = hook(OnFailureContext(error=error, input=input_value, run=run))
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_failure of run %s (workflow %r) raised", claimed.id, run.workflow)
    code = await worker.store.hook_done(claimed.id, claimed.token, worker.id)
    if code is Code.STALE:
        raise LeaseLostError(claimed.id)


class StoredError(RedflowError):
    """A failure recorded earlier (for example by the reaper), as seen by on_failure."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record.get("message", ""))
        self.record = record
        self.kind = str(record.get("kind", "error"))
        self.name = str(record.get("name", "Error"))
