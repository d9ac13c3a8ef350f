"""Executes one claimed run (or its on_failure hook) and records the outcome.

Ordering invariants:
- a step output is written (fenced) before the handler continues past the step;
- a terminal failure is durable (finish.lua) before on_failure runs, and the run stays owned until
  hook_done, so a crash during the hook hands the hook to another worker;
- a STALE reply means another worker owns the run now: this attempt stops without writing anything;
- a run whose cancellation was requested ends as canceled (finish.lua enforces it) and never calls
  on_failure;
- a cancel interrupts only the handler (its own task), never the writes that settle an outcome, so a
  cancel cannot leave a run owned and unsettled;
- after on_failure ran, hook_done is retried (same token) rather than the hook handed back: a lost
  reply never makes on_failure run twice.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._redis.errors import RedisError
from ..durations import duration_ms
from ..encoding import decode, encode, encode_output
from ..errors import (
    CanceledError,
    RateLimitExceededError,
    RedflowError,
    TimeoutError,
    UnknownWorkflowError,
    WaitForInputError,
)
from ..observability import count_run, observe, observe_step, tracing
from ..observability.logs import log_outcome
from ..retries import retry_delay_ms, serialize_error
from ..step import LeaseLostError, StepApi, Suspended, input_wait_info
from ..storage.codes import Code
from ..storage.handoffs import Outbox
from ..storage.keys import event_member_prefix, partition_of
from ..storage.records import ClaimedRun, StepRecord, encode_step
from ..streams import WorkflowStreamWriter
from ..types import OnFailureContext, RunContext, WorkflowHandlerContext, WorkflowResumeContext

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("redflow.worker")

UNKNOWN_WORKFLOW_DEFER_MS = 5_000


@dataclass(slots=True)
class Execution:
    """A run in flight on this worker."""

    claimed: ClaimedRun
    signal: asyncio.Event
    task: asyncio.Task[None] | None = None
    handler_task: asyncio.Future[Any] | None = None  # the user's handler; a cancel interrupts only this
    steps: StepApi | None = None
    settled: bool = False  # its outcome (terminal, retry, suspend) is written: nothing to hand back
    cancel_requested: bool = False
    started: float = field(default_factory=time.monotonic)

    def record_outcome(self, outcome: str, error: bytes | None = None, delay_ms: int | None = None) -> None:
        """Metrics and the log line of what this execution ended with."""
        h = self.claimed.header
        if outcome in ("held", "throttled", "rate_limited"):
            observe("admission", 1, outcome)
            if outcome != "rate_limited":
                return
        execution_s = time.monotonic() - self.started
        count_run(h.workflow, "failed" if outcome == "rate_limited" else outcome, execution_s)
        if outcome in ("succeeded", "failed", "canceled", "rate_limited") and h.started_at_ms:
            observe("run_seconds", max(0.0, time.time() - h.started_at_ms / 1000), h.workflow)
        decoded = decode(error) if error else None
        tracing.outcome(outcome, decoded if isinstance(decoded, dict) else None)
        if outcome in ("succeeded", "failed", "retried", "canceled", "deferred", "rate_limited"):
            log_outcome(outcome, run_id=self.claimed.id, workflow=h.workflow, queue=h.queue,
                        attempt=max(h.attempt, 1), max_attempts=h.max_attempts, duration_ms=execution_s * 1000,
                        error=decoded if isinstance(decoded, dict) else None, delay_ms=delay_ms)

    def stop_here(self) -> None:
        """Stop executing the run in this process (the worker stops, or lost the run): set its
        signals and cancel its task. Whether anything is handed back is the caller's decision."""
        self.signal.set()
        if self.steps is not None:
            self.steps.cancel_active()
        if self.task is not None:
            self.task.cancel()

    def request_cancel(self) -> None:
        """Cancel the run's handler; its outcome is then written as canceled."""
        if self.cancel_requested or self.claimed.kind == "hook":
            return
        self.cancel_requested = True
        self.signal.set()
        if self.steps is not None:
            self.steps.canceled = True  # steps in flight are recorded as canceled
            self.steps.cancel_active()
        if self.handler_task is not None:
            self.handler_task.cancel()


class _RedisBackend:
    """The step API's durable operations for one execution, on the worker's store and client."""

    __slots__ = ("_ex", "_worker")

    def __init__(self, worker: Worker, ex: Execution) -> None:
        self._worker = worker
        self._ex = ex

    async def record(self, record: StepRecord) -> None:
        run = self._ex.claimed
        code = await self._worker.store.record_step(run.id, run.token, encode_step(record))
        if code in (Code.STALE, Code.WRONG_STATUS):
            raise LeaseLostError(run.id)
        if record.kind == "run":
            observe_step(run.header.workflow, (record.finished_at_ms - record.started_at_ms) / 1000)

    async def suspend(
        self, name: str, position: int, kind: str, *, delay_ms: int = -1, due_ms: int = 0,
        event: tuple[str, str] | None = None, child_id: str = "", consumed: tuple[str, ...] = (),
        info: bytes = b"",
    ) -> tuple[str, bytes]:
        run = self._ex.claimed
        member = buffer_prefix = ""
        if event is not None:
            buffer_prefix = event_member_prefix(*event)
            member = buffer_prefix + run.id
            info = info or encode({"event": event[0], "key": event[1]})  # what get_run_steps reports
        code, resolution, raw = await self._worker.store.suspend(
            run.id, run.token, self._worker.id, run.header.queue, name, position, kind, delay_ms=delay_ms,
            due_ms=due_ms, waiter_member=member, child_id=child_id, buffer_prefix=buffer_prefix,
            consumed_events=consumed, info=info,
        )
        if code is Code.RESOLVED:
            return resolution, raw
        if code in (Code.STALE, Code.WRONG_STATUS):
            raise LeaseLostError(run.id)
        if code is Code.CANCELED:
            self._ex.cancel_requested = True
            raise CanceledError(f"run {run.id} was canceled")
        self._ex.settled = True
        tracing.event("suspend", **{"redflow.step": name, "redflow.wait.kind": kind})
        self._ex.record_outcome("suspended")
        raise Suspended(run.id)

    async def start_child(
        self, name: str, workflow: Any, input: Any, *, wait: bool, run_at: datetime | None,
        queue_override: str | None, idempotency_key: str, idempotency_ttl: int | None,
    ) -> str:
        run = self._ex.claimed
        workflow_name = workflow if isinstance(workflow, str) else getattr(workflow, "name", None)
        if not isinstance(workflow_name, str):
            raise RedflowError(
                f"step {name!r} in run {run.id}: workflow must be a name or a definition, got {workflow!r}"
            )
        handle = await self._worker.client.run_by_name(
            workflow_name, input, idempotency_key=idempotency_key, idempotency_ttl=idempotency_ttl,
            run_at=run_at, queue_override=queue_override, parent_run_id=run.id,
        )
        return handle.id

    async def emit_event(
        self, event_name: str, input: Any, *, correlation_key: str | None, event_id: str,
        idempotency_key: str | None, idempotency_ttl: int | None, emit_at: datetime | None,
    ) -> list[str]:
        handles = await self._worker.client.emit_event(
            event_name, input, correlation_key=correlation_key, event_id=event_id,
            idempotency_key=idempotency_key, idempotency_ttl=idempotency_ttl, emit_at=emit_at,
            parent_run_id=self._ex.claimed.id,
        )
        return [h.id for h in handles]

    async def cancel_child(self, child_id: str, reason: str) -> None:
        await self._worker.client.cancel_run(child_id, reason=reason)


async def execute(worker: Worker, ex: Execution) -> None:
    claimed = ex.claimed
    h = claimed.header
    try:
        with tracing.execution(claimed.id, h.workflow, h.queue, h.attempt, h.trace_context):
            if claimed.kind == "hook":
                await _run_hook(worker, ex)
            elif claimed.kind != "admit" or await _admit(worker, ex):
                await _run(worker, ex)
    except LeaseLostError:
        log.warning("run %s: lost ownership to another worker; this attempt stops", claimed.id)
        ex.settled = True
    parent = claimed.header.parent_id
    if parent and partition_of(parent) != partition_of(claimed.id):
        # Its end was recorded in this partition's outbox; applied now, its parent resumes without
        # waiting for the leader (which applies it if this fails).
        try:
            await Outbox(worker.store).apply_child_end(claimed.id, worker.retention_ms)
        except RedisError as exc:
            log.warning("run %s: the hand-off of its end to parent run %s is left to the leader (%s)",
                        claimed.id, parent, exc)


async def _admit(worker: Worker, ex: Execution) -> bool:
    """Apply mutex, rate limit and throttle to a first start; True when the run may execute now."""
    claimed = ex.claimed
    h = claimed.header
    definition = worker.registry.get(h.workflow)
    if definition is None:
        # Attempt 0 stays 0 (no keep-attempt flag), so the next claim sends it to admission again.
        error = serialize_error(UnknownWorkflowError(h.workflow))
        code = await worker.store.retry(claimed.id, claimed.token, worker.id, h.queue, UNKNOWN_WORKFLOW_DEFER_MS,
                                        error)
        if code is Code.CANCELED:
            await _finish_canceled(worker, ex)
            return False
        _settled(ex, code, "deferred", error, UNKNOWN_WORKFLOW_DEFER_MS)
        return False
    options = definition.options
    limits: list[tuple[str, int, int] | None] = []
    try:
        value = decode(claimed.input)
        if definition.input_schema is not None:
            value = definition.input_schema.validate(value)
        for config in (options.throttle, options.rate_limit):
            limits.append(None if config is None else (
                admission_key(h.workflow, config.key, value), config.limit, duration_ms(config.period, "period")
            ))
        mutex_key = None if options.mutex is None else admission_key(h.workflow, options.mutex, value)
    except Exception as error:
        # A key function that fails (or invalid input) fails the run: it can never be admitted.
        payload = serialize_error(error)
        code, status = await worker.store.finish(
            claimed.id, claimed.token, worker.id, "failed", payload, False, worker.retention_ms, h.queue,
        )
        _settled(ex, code, status or "failed", payload)
        return False
    hook = options.on_failure is not None
    code, detail = await worker.store.admit(
        claimed.id, claimed.token, worker.id, h.queue, h.workflow, limits[0], limits[1], hook, worker.retention_ms,
        mutex_key,
    )
    if code is Code.OK:
        claimed.header = detail
        claimed.kind = "run"
        return True
    limited_error = None
    if code is Code.RATE_LIMITED:
        limited_error = encode({"name": "RateLimitExceededError", "kind": "rate_limited", "retryAfterMs": detail,
                                "message": f"over the rate limit of workflow {h.workflow!r}; retry after {detail} ms"})
    _settled(ex, code, code.name.lower(), limited_error)
    if code is Code.RATE_LIMITED and hook:
        run = RunContext(id=claimed.id, workflow=h.workflow, queue=h.queue, attempt=h.attempt + 1,
                         max_attempts=h.max_attempts)
        limited = RateLimitExceededError(f"run {claimed.id} of workflow {h.workflow!r} exceeded its rate limit", detail)
        await _call_hook(worker, ex, run, decode(claimed.input), limited)
    return False


def admission_key(workflow: str, key_fn: Any, value: Any) -> str:
    key = key_fn(value)
    if not isinstance(key, str) or not key.strip():
        raise RedflowError(f"workflow {workflow!r}: an admission key function returned {key!r}; it must return a "
                           "non-empty string")
    return key.strip()


async def _run(worker: Worker, ex: Execution) -> None:
    claimed = ex.claimed
    h = claimed.header
    store = worker.store
    definition = worker.registry.get(h.workflow)
    if definition is None:
        # Another worker may have the definition (rolling deploy): defer, keeping the attempt.
        error = serialize_error(UnknownWorkflowError(h.workflow))
        code = await store.retry(claimed.id, claimed.token, worker.id, h.queue, UNKNOWN_WORKFLOW_DEFER_MS, error, True)
        if code is Code.CANCELED:
            await _finish_canceled(worker, ex)
            return
        _settled(ex, code, "deferred", error, UNKNOWN_WORKFLOW_DEFER_MS)
        return
    run = RunContext(id=claimed.id, workflow=h.workflow, queue=h.queue, attempt=h.attempt, max_attempts=h.max_attempts)
    first_start = h.attempt == 1 and h.started_at_ms == h.attempt_started_at_ms
    count_run(h.workflow, "started" if first_start else "resumed")
    if h.available_at_ms and h.attempt_started_at_ms:
        observe("queue_wait_seconds", max(0.0, (h.attempt_started_at_ms - h.available_at_ms) / 1000), h.queue)
    input_value = raw_input = decode(claimed.input)
    backend = _RedisBackend(worker, ex)
    steps = StepApi(run, ex.signal, claimed.steps, backend, worker.max_payload_bytes)
    steps.input_timeout_ms = worker.retention_ms
    ex.steps = steps
    resume = WorkflowResumeContext(form=steps.resume_form[0]) if steps.resume_form is not None else None
    if h.cancel_requested_at_ms is not None:
        ex.cancel_requested = True
    try:
        if ex.cancel_requested:
            raise CanceledError(f"run {claimed.id} was canceled")
        if definition.input_schema is not None:
            input_value = definition.input_schema.validate(raw_input)
        writer = None
        if definition.options.stream:
            writer = WorkflowStreamWriter(store, claimed.id, claimed.token, h.attempt, worker.retention_ms,
                                          worker.max_payload_bytes)
        ctx = WorkflowHandlerContext(input=input_value, run=run, signal=ex.signal, step=steps, resume=resume,
                                     stream=writer)
        try:
            ex.handler_task = asyncio.ensure_future(definition.handler(ctx))
            if ex.cancel_requested:  # requested while the handler was being set up
                ex.handler_task.cancel()
            output = await _await_handler(ex, definition.options.timeout_ms)
        except WaitForInputError as wait:
            # Raised by the handler itself: the whole handler replays once input arrives.
            await backend.suspend("", 0, "input", delay_ms=worker.retention_ms, info=input_wait_info(wait))
            raise
        data = encode_output(output, f"output of workflow {h.workflow!r} in run {claimed.id}",
                             worker.max_payload_bytes)
    except Suspended:
        return
    except (LeaseLostError, RedisError):
        # Redis failing under the run (a durable write of a step, a child start) is not the run's
        # failure: the attempt is not consumed; the worker hands the run back instead.
        raise
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not ex.cancel_requested or (task is not None and task.cancelling()):
            raise  # this worker is stopping or losing its lease: the run is handed back
        await _finish_canceled(worker, ex)
        return
    except Exception as error:
        if ex.cancel_requested:
            await _finish_canceled(worker, ex)
            return
        await _fail_attempt(worker, ex, run, raw_input, error)
        return
    code, status = await store.finish(
        claimed.id, claimed.token, worker.id, "succeeded", data, False, worker.retention_ms, h.queue,
    )
    _settled(ex, code, status or "succeeded")


HANDLER_UNWIND_S = 1.0  # how long a handler canceled by its workflow timeout may take to unwind


async def _await_handler(ex: Execution, timeout_ms: int | None) -> Any:
    """The handler's output. Past the workflow's ``timeout_ms`` the handler is canceled (its steps in
    flight recorded as canceled) and the attempt fails with TimeoutError. Only the handler is
    interrupted, never this task, so the writes that settle the attempt run to the end."""
    task = ex.handler_task
    assert task is not None
    if timeout_ms is None:
        return await task
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_ms / 1000)
    except asyncio.CancelledError:
        task.cancel()  # this worker is stopping: the handler stops with it, as when awaited directly
        raise
    if done:
        return task.result()
    if ex.steps is not None:
        ex.steps.canceled = True
        ex.steps.cancel_active()
    ex.signal.set()
    task.cancel()
    # A handler that swallows the cancellation is abandoned after a grace period; its later writes
    # are refused (the run is no longer running on this attempt).
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    await asyncio.wait({task}, timeout=HANDLER_UNWIND_S)
    h = ex.claimed.header
    raise TimeoutError(f"run {ex.claimed.id} of workflow {h.workflow!r} timed out after {timeout_ms} ms "
                       f"(attempt {h.attempt})")


def _settled(
    ex: Execution, code: Code, outcome: str, error: bytes | None = None, delay_ms: int | None = None
) -> None:
    """Mark an outcome written; STALE (or a status the run left) means another owner has it."""
    ex.settled = True
    if code in (Code.STALE, Code.WRONG_STATUS):
        raise LeaseLostError(ex.claimed.id)
    ex.record_outcome(outcome, error, delay_ms)


async def _finish_canceled(worker: Worker, ex: Execution) -> None:
    claimed = ex.claimed
    payload = encode({"name": "CanceledError", "kind": "canceled", "message": f"run {claimed.id} was canceled"})
    code, _ = await worker.store.finish(
        claimed.id, claimed.token, worker.id, "canceled", payload, False, worker.retention_ms, claimed.header.queue,
    )
    _settled(ex, code, "canceled")


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
    if delay is not None:
        code = await worker.store.retry(claimed.id, claimed.token, worker.id, run.queue, delay, payload)
        if code is Code.CANCELED:
            await _finish_canceled(worker, ex)
            return
        _settled(ex, code, "retried", payload, delay)
        return
    hook = definition.options.on_failure is not None
    code, status = await worker.store.finish(
        claimed.id, claimed.token, worker.id, "failed", payload, hook, worker.retention_ms, claimed.header.queue,
    )
    _settled(ex, code, status or "failed", payload)
    if hook and status == "failed":
        await _call_hook(worker, ex, run, input_value, error)


async def _run_hook(worker: Worker, ex: Execution) -> None:
    """on_failure of a run whose failure was recorded by another worker (or the reaper)."""
    claimed = ex.claimed
    h = claimed.header
    if worker.registry.get(h.workflow) is None:
        # Another worker may have the definition (rolling deploy): defer the hook as runs are.
        log.warning("run %s: workflow %r is not defined in this worker; deferring its on_failure",
                    claimed.id, h.workflow)
        error = claimed.error or serialize_error(UnknownWorkflowError(h.workflow))
        code = await worker.store.retry(claimed.id, claimed.token, worker.id, h.queue, UNKNOWN_WORKFLOW_DEFER_MS,
                                        error, True)
        _settled(ex, code, "deferred")
        return
    run = RunContext(id=claimed.id, workflow=h.workflow, queue=h.queue, attempt=h.attempt, max_attempts=h.max_attempts)
    stored = decode(claimed.error) if claimed.error else {}
    await _call_hook(worker, ex, run, decode(claimed.input), StoredError(stored))


HOOK_DONE_ATTEMPTS = 8


async def _call_hook(worker: Worker, ex: Execution, run: RunContext, input_value: Any, error: BaseException) -> None:
    claimed = ex.claimed
    ex.settled = False  # until hook_done is written, the run is this worker's to hand back
    definition = worker.registry.get(run.workflow)
    hook = definition.options.on_failure if definition is not None else None
    if hook is not None:
        try:
            result = hook(OnFailureContext(error=error, input=input_value, run=run))
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_failure of run %s (workflow %r) raised", claimed.id, run.workflow)
    # The hook ran: it must not run again, so a failed hook_done is retried with the same token (a
    # repeat after a lost reply is harmless) instead of handing the run back for its hook.
    ex.settled = True
    delay = 0.05
    for attempt in range(HOOK_DONE_ATTEMPTS):
        try:
            code = await worker.store.hook_done(claimed.id, claimed.token, worker.id)
        except RedisError as exc:
            if attempt == HOOK_DONE_ATTEMPTS - 1:
                raise
            log.warning("run %s: recording that on_failure ran failed (%s); retrying", claimed.id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        if code is not Code.OK:
            # After a lost reply the earlier call was applied, or the run was taken back meanwhile.
            log.info("run %s: hook_done returned %s", claimed.id, code.name)
        return


class StoredError(RedflowError):
    """A failure recorded earlier (for example by the reaper), as seen by on_failure."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record.get("message", ""))
        self.record = record
        self.kind = str(record.get("kind", "error"))
        self.name = str(record.get("name", "Error"))
