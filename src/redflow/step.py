"""The durable step API handed to handlers as ``ctx.step``.

Durable execution by replay: each call names a step; its position in the handler's sequence and its
outcome are recorded once, and a replay gets the recorded outcome back (decoded from JSON, also on the
first run, so both see the same types). A replay that asks for a different step at a recorded position
fails with NonDeterminismError. Waits (sleep, event, child) suspend the run through the backend, which
raises :class:`Suspended`; the run leaves its worker and replays when the wait is resolved.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import time
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

import msgspec

from .durations import datetime_ms, duration_ms
from .encoding import decode, encode, encode_output
from .errors import (
    FAILED_STEP_ATTR,
    CanceledError,
    DuplicateStepError,
    NonDeterminismError,
    RedflowError,
    TimeoutError,
    WaitForInputError,
)
from .observability import tracing
from .retries import serialize_error
from .storage.records import StepRecord
from .types import ReceivedEvent, RunContext
from .validation import check_event_name


class Suspended(BaseException):
    """The run is now durably waiting; the handler must unwind. Not meant to be caught."""


class LeaseLostError(BaseException):
    """The run's fencing token is no longer current: another worker owns it. Not user-catchable."""


def wait_for_input(message: str, schema: Any = None) -> WaitForInputError:
    """The exception to raise (from a step function or the handler) to pause the run until
    ``client.resume_run`` supplies input; ``schema`` validates the form: a pydantic model class, a
    msgspec Struct class or a JSON Schema dict, as ``input_schema`` accepts."""
    return WaitForInputError(message, form_schema(schema))


def form_schema(schema: Any) -> dict[str, Any] | None:
    """The JSON Schema of a wait_for_input form schema (None: any form)."""
    if schema is None:
        return None
    from .validation import schema_adapter

    if isinstance(schema, dict):
        return schema
    try:
        return schema_adapter("wait_for_input", schema).json_schema()
    except RedflowError:
        raise RedflowError(
            "wait_for_input schema must be a pydantic model class, a msgspec Struct class or a JSON Schema "
            f"dict, got {schema!r}"
        ) from None


def input_wait_info(error: WaitForInputError) -> bytes:
    return encode({"msg": str(error), "schema": form_schema(error.schema)})


class StepBackend(Protocol):
    async def record(self, record: StepRecord) -> None:
        """Persist a step record; raises LeaseLostError when the run is no longer ours."""

    async def suspend(
        self, name: str, position: int, kind: str, *, delay_ms: int = -1, due_ms: int = 0,
        event: tuple[str, str] | None = None, child_id: str = "", consumed: tuple[str, ...] = (),
        info: bytes = b"",
    ) -> tuple[str, bytes]:
        """Start a durable wait. Returns (resolution, output JSON) when it is satisfied at once;
        otherwise raises Suspended."""

    async def start_child(
        self, name: str, workflow: Any, input: Any, *, wait: bool, run_at: datetime | None,
        queue_override: str | None, idempotency_key: str, idempotency_ttl: int | None,
    ) -> str:
        """Start (idempotently) a child run of this run and return its id."""

    async def emit_event(
        self, event_name: str, input: Any, *, correlation_key: str | None, event_id: str,
        idempotency_key: str | None, idempotency_ttl: int | None, emit_at: datetime | None,
    ) -> list[str]:
        """Emit an event on behalf of this run; returns the subscriber run ids."""

    async def cancel_child(self, child_id: str, reason: str) -> None:
        """Cancel a child run (and its descendants)."""


@lru_cache(maxsize=2048)
def _accepts_signal(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "signal" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def accepts_signal(fn: Callable[..., Any]) -> bool:
    try:
        return _accepts_signal(fn)
    except TypeError:  # unhashable callable
        return _accepts_signal.__wrapped__(fn)


def _is_async(fn: Callable[..., Any]) -> bool:
    target = getattr(fn, "func", fn)  # functools.partial
    if inspect.iscoroutinefunction(target):
        return True
    call = type(target).__dict__.get("__call__")  # an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _timeout_info(limit_ms: int) -> bytes:
    return encode({"timeout_ms": limit_ms})


def _cut_short(record: StepRecord) -> bool:
    """Whether a resolved sleep ended at its timeout rather than at its target."""
    if record.kind != "sleep" or not record.info:
        return False
    info = decode(record.info)
    return isinstance(info, dict) and "timeout_ms" in info


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a step function and await what it returns, whatever returns it: an async function, or a
    plain callable returning an awaitable (``lambda: compute(5)``)."""
    if _is_async(fn):
        result = fn(*args, **kwargs)
    else:
        # A plain function runs in a thread so it cannot stall the event loop (heartbeats, other
        # runs) and its timeout applies.
        result = await asyncio.to_thread(fn, *args, **kwargs)
    while inspect.isawaitable(result):
        result = await result
    return result


class StepApi:
    def __init__(
        self,
        run: RunContext,
        run_signal: asyncio.Event,
        history: list[StepRecord],
        backend: StepBackend,
        max_payload_bytes: int,
    ) -> None:
        self._run = run
        self._run_signal = run_signal
        self._backend = backend
        self._max_payload = max_payload_bytes
        self._latest: dict[str, StepRecord] = {}
        self._names_at: dict[int, str] = {}
        self.resume_form: tuple[Any] | None = None  # the form of the latest resolved input wait
        for record in history:
            if record.kind == "input" and record.state == "done" and record.resolution == "input":
                self.resume_form = (decode(record.output),)
            if record.name == "":  # an input wait raised by the handler itself, not a step
                continue
            self._latest[record.name] = record
            self._names_at.setdefault(record.position, record.name)
        self._seen: set[str] = set()
        self._position = 0
        self.input_timeout_ms = -1  # how long an input wait lasts; the worker sets the retention window
        self._active_signals: set[asyncio.Event] = set()
        self.canceled = False  # the run's cancellation was requested (the worker sets it)

    # --- bookkeeping ----------------------------------------------------------------------------------
    def cancel_active(self) -> None:
        """Set the ``signal`` of every step in flight (the run is being canceled)."""
        for signal in self._active_signals:
            signal.set()

    def was_called(self, name: str) -> bool:
        return name in self._seen

    def _where(self, name: str) -> str:
        return f"step {name!r} in run {self._run.id} of workflow {self._run.workflow!r}"

    def _enter(self, name: str) -> tuple[int, StepRecord | None]:
        """Claim the next position for ``name``; returns it and the step's recorded state, if any."""
        if not isinstance(name, str) or not name:
            raise RedflowError(f"run {self._run.id}: step name must be a non-empty string, got {name!r}")
        if name in self._seen:
            raise DuplicateStepError(
                f"run {self._run.id} of workflow {self._run.workflow!r}: duplicate step name {name!r}; "
                "step names must be unique within a run"
            )
        self._seen.add(name)
        self._position += 1
        position = self._position
        recorded = self._names_at.get(position)
        record = self._latest.get(name)
        if (recorded is not None and recorded != name) or (record is not None and record.position != position):
            raise NonDeterminismError(
                f"run {self._run.id} of workflow {self._run.workflow!r}: the handler asked for step {name!r} "
                f"as step #{position}, but the run's history has "
                + (f"{recorded!r} there" if recorded is not None and recorded != name else
                   f"{name!r} as step #{record.position if record else '?'}")
                + "; the handler code changed in a way that cannot replay this run"
            )
        return position, record

    def _encode(self, value: Any, name: str) -> bytes:
        return encode_output(value, f"output of {self._where(name)}", self._max_payload)

    async def _record(self, name: str, position: int, data: bytes, kind: str, started: int, **extra: Any) -> None:
        record = StepRecord(
            name=name, position=position, attempt=self._run.attempt, output=msgspec.Raw(data), started_at_ms=started,
            finished_at_ms=_now_ms(), kind=kind, **extra
        )
        await self._backend.record(record)
        self._latest[name] = record

    async def _record_failure(
        self, name: str, position: int, kind: str, started: int, state: str, error: BaseException
    ) -> None:
        """Record that a step failed (or was canceled) with its error. The line supersedes nothing
        completed: a replay runs the step again."""
        if state == "failed" and not hasattr(error, FAILED_STEP_ATTR):
            try:
                setattr(error, FAILED_STEP_ATTR, name)  # the run's error then names its failing step
            except AttributeError:
                pass
        record = StepRecord(
            name=name, position=position, attempt=self._run.attempt, started_at_ms=started,
            finished_at_ms=_now_ms(), kind=kind, state=state, error=msgspec.Raw(serialize_error(error)),
        )
        await self._backend.record(record)
        self._latest[name] = record

    def _resolved(self, name: str, position: int, kind: str, resolution: str, raw: bytes, **extra: Any) -> None:
        """Mirror a wait resolved at once by the backend (it recorded the resolution itself)."""
        self._latest[name] = StepRecord(
            name=name, position=position, attempt=self._run.attempt, output=msgspec.Raw(raw), state="done", kind=kind,
            resolution=resolution, **extra
        )

    # --- steps ------------------------------------------------------------------------------------------
    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        timeout_ms: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this run and return its recorded output."""
        position, record = self._enter(name)
        if record is not None and record.state == "ok":
            return decode(record.output)
        if record is not None and record.kind == "input" and record.state == "done" and record.resolution == "timeout":
            raise TimeoutError(f"{self._where(name)}: nobody answered its wait_for_input in time")
        signal = asyncio.Event()
        if self._run_signal.is_set():
            signal.set()
        if accepts_signal(fn):
            kwargs["signal"] = signal
        started = _now_ms()
        self._active_signals.add(signal)
        run = self._run
        try:
            with tracing.step(name, run.id, run.workflow, run.attempt):
                if timeout_ms is None:
                    result = await _call(fn, args, kwargs)
                else:
                    try:
                        async with asyncio.timeout(timeout_ms / 1000):
                            result = await _call(fn, args, kwargs)
                    except builtins.TimeoutError:
                        signal.set()
                        raise TimeoutError(f"{self._where(name)} timed out after {timeout_ms} ms") from None
            data = self._encode(result, name)
        except WaitForInputError as wait:
            # Only this step runs again once input arrives; recorded steps are kept.
            await self._backend.suspend(name, position, "input", delay_ms=self.input_timeout_ms,
                                        info=input_wait_info(wait))
            raise AssertionError("unreachable: suspend raises") from None
        except Exception as error:
            await self._record_failure(name, position, "run", started, "failed", error)
            raise
        except asyncio.CancelledError:
            if self.canceled:
                try:
                    await self._record_failure(name, position, "run", started, "canceled",
                                               CanceledError(f"{self._where(name)} was canceled with its run"))
                except Exception:  # best effort: the cancellation itself must go on
                    pass
            raise
        finally:
            self._active_signals.discard(signal)
        await self._record(name, position, data, "run", started)
        return decode(data)

    async def wait_for(self, name: str, target: Any, timeout_ms: int | None = None) -> None:
        """Sleep durably until ``target`` (ms, a duration string, or a datetime); frees the worker slot.

        With ``timeout_ms``, a sleep that would last longer ends after ``timeout_ms`` instead and the
        step fails with :class:`TimeoutError` (retried by the workflow's policy; the next attempt
        sleeps again).
        """
        position, record = self._enter(name)
        limit = None if timeout_ms is None else duration_ms(timeout_ms, f"timeout_ms of {self._where(name)}")
        if record is not None and record.state in ("failed", "canceled"):
            record = None  # an earlier attempt's sleep failed: this attempt sleeps again
        if record is not None and record.state in ("ok", "done"):
            if record.state == "done" and _cut_short(record):
                info = decode(record.info or "{}")
                await self._timed_out(name, position, record.started_at_ms, int(info["timeout_ms"]))
            return None
        if record is not None and record.wait_until_ms is not None:
            info = record.info.encode() if record.info else b""
            await self._backend.suspend(name, position, "sleep", due_ms=record.wait_until_ms, info=info)
            return None
        now = _now_ms()
        if isinstance(target, datetime):
            due = datetime_ms(target)
            if due <= now:
                await self._record(name, position, b"null", "sleep", now)
                return None
            if limit is not None and due - now > limit:
                # Cut short by its timeout: the wait's details say so, for the replay that wakes.
                await self._backend.suspend(name, position, "sleep", due_ms=now + limit, info=_timeout_info(limit))
                await self._timed_out(name, position, now, limit)
            await self._backend.suspend(name, position, "sleep", due_ms=due)
        else:
            delay = duration_ms(target, f"wait_for target of {self._where(name)}")
            if delay == 0:
                await self._record(name, position, b"null", "sleep", now)
                return None
            if limit is not None and delay > limit:
                await self._backend.suspend(name, position, "sleep", delay_ms=limit, info=_timeout_info(limit))
                await self._timed_out(name, position, now, limit)
            await self._backend.suspend(name, position, "sleep", delay_ms=delay)
        return None

    async def _timed_out(self, name: str, position: int, started: int, limit: int) -> None:
        """A sleep ended by its timeout: record the failed step and raise TimeoutError."""
        error = TimeoutError(f"{self._where(name)} timed out after {limit} ms")
        await self._record_failure(name, position, "sleep", started, "failed", error)
        raise error

    async def wait_for_event(
        self, name: str, event_name: str, correlation_key: str, timeout: Any  # noqa: ASYNC109 (public API)
    ) -> ReceivedEvent | None:
        """Wait durably for an event with this name and correlation key; None when ``timeout`` passes."""
        for label, value in (("event_name", event_name), ("correlation_key", correlation_key)):
            check_event_name(value, f"{self._where(name)}: {label}")  # the rule emit_event applies
        position, record = self._enter(name)
        if record is not None and record.state == "done":
            return decode(record.output) if record.resolution == "event" else None
        consumed = tuple(
            decode(r.output)["id"] for r in self._latest.values()
            if r.kind == "event" and r.resolution == "event" and r.name != name
        )
        kwargs: dict[str, Any] = {"event": (event_name, correlation_key), "consumed": consumed}
        if record is not None and record.wait_until_ms is not None:
            kwargs["due_ms"] = record.wait_until_ms
        elif isinstance(timeout, datetime):
            kwargs["due_ms"] = datetime_ms(timeout)
        else:
            kwargs["delay_ms"] = duration_ms(timeout, f"timeout of {self._where(name)}")
        resolution, raw = await self._backend.suspend(name, position, "event", **kwargs)
        self._resolved(name, position, "event", resolution, raw)
        return decode(raw) if resolution == "event" else None

    async def run_workflow(
        self,
        name: str,
        workflow: Any,
        input: Any = None,
        *,
        timeout_ms: int | None = None,
        run_at: datetime | None = None,
        queue_override: str | None = None,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
    ) -> Any:
        """Start a child run and return its output; the parent waits durably (slot freed)."""
        position, record = self._enter(name)
        attempt = self._run.attempt
        if record is not None and record.state == "done" and (
            record.resolution == "succeeded" or record.attempt == attempt
        ):
            return await self._child_outcome(name, record.resolution or "", record.output, record.child_id or "")
        child_id = None
        if record is not None and record.state == "wait" and record.attempt == attempt:
            child_id = record.child_id
        if child_id is None:
            child_id = await self._backend.start_child(
                name, workflow, input, wait=True, run_at=run_at, queue_override=queue_override,
                idempotency_key=idempotency_key or f"step-child:{self._run.id}:{name}:{attempt}",
                idempotency_ttl=idempotency_ttl,
            )
        delay = -1 if timeout_ms is None else duration_ms(timeout_ms, f"timeout_ms of {self._where(name)}")
        resolution, raw = await self._backend.suspend(name, position, "child", delay_ms=delay, child_id=child_id)
        self._resolved(name, position, "child", resolution, raw, child_id=child_id)
        return await self._child_outcome(name, resolution, raw, child_id)

    async def _child_outcome(self, name: str, resolution: str, raw: bytes, child_id: str) -> Any:
        if resolution == "succeeded":
            return decode(raw)
        if resolution == "timeout":
            reason = f"parent run {self._run.id} stopped waiting ({name!r} timed out)"
            await self._backend.cancel_child(child_id, reason)
            raise TimeoutError(f"{self._where(name)}: child run {child_id} did not finish in time")
        error = decode(raw) if raw else {}
        message = error.get("message", "") if isinstance(error, dict) else ""
        if resolution == "canceled":
            raise CanceledError(f"{self._where(name)}: child run {child_id} was canceled: {message}")
        raise RedflowError(f"{self._where(name)}: child run {child_id} failed: {message}")

    async def emit_workflow(
        self,
        name: str,
        workflow: Any,
        input: Any = None,
        *,
        timeout_ms: int | None = None,
        run_at: datetime | None = None,
        queue_override: str | None = None,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
    ) -> str:
        """Start a child run without waiting for it; returns its id (the same id on every replay)."""
        position, record = self._enter(name)
        if record is not None and record.state == "ok":
            return str(decode(record.output))
        started = _now_ms()
        child_id = await self._backend.start_child(
            name, workflow, input, wait=False, run_at=run_at, queue_override=queue_override,
            idempotency_key=idempotency_key or f"step-child:{self._run.id}:{name}", idempotency_ttl=idempotency_ttl,
        )
        await self._record(name, position, self._encode(child_id, name), "emit", started, child_id=child_id)
        return child_id

    async def emit_event(
        self,
        name: str,
        event_name: str,
        input: Any = None,
        *,
        correlation_key: str | None = None,
        emit_at: datetime | None = None,
        event_id: str | None = None,
        timeout_ms: int | None = None,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
    ) -> list[str]:
        """Emit an event from this run (once, whatever the replays); returns the subscriber run ids."""
        position, record = self._enter(name)
        if record is not None and record.state == "ok":
            return list(decode(record.output))
        started = _now_ms()
        run_ids = await self._backend.emit_event(
            event_name, input, correlation_key=correlation_key,
            event_id=event_id or f"step-event:{self._run.id}:{name}", idempotency_key=idempotency_key,
            idempotency_ttl=idempotency_ttl, emit_at=emit_at,
        )
        await self._record(name, position, self._encode(run_ids, name), "emit", started)
        return run_ids
