"""``run_inline``: execute a workflow handler in-process, without Redis, for unit tests.

Steps run for real unless ``step_overrides`` gives their output. ``wait_for`` sleeps for real (keep
targets short in tests); ``wait_for_event`` returns the override or, without one, a synthetic event at
once; ``run_workflow`` needs an override; ``emit_workflow`` returns a synthetic child id and
``emit_event`` an empty list (no subscriber runs exist inline).
"""

from __future__ import annotations

import asyncio
import builtins
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .encoding import decode, encode, encode_output, encode_payload, max_payload_bytes
from .errors import RedflowError, TimeoutError
from .step import StepApi
from .storage.records import StepRecord
from .types import RunContext, WorkflowHandlerContext
from .workflow import WorkflowDefinition


@dataclass(slots=True)
class InlineStepResult:
    name: str
    status: str
    output: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class InlineRunResult:
    output: Any = None
    error: BaseException | None = None
    steps: list[InlineStepResult] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.error is None


class _InlineBackend:
    def __init__(self, run_id: str, steps: list[InlineStepResult], overrides: dict[str, Any]) -> None:
        self._run_id = run_id
        self._steps = steps
        self._overrides = overrides
        self._counter = 0

    async def record(self, record: StepRecord) -> None:
        self._steps.append(InlineStepResult(name=record.name, status="succeeded", output=decode(record.output)))

    async def suspend(
        self, name: str, position: int, kind: str, *, delay_ms: int = -1, due_ms: int = 0,
        event: tuple[str, str] | None = None, child_id: str = "", consumed: tuple[str, ...] = (),
        info: bytes = b"",
    ) -> tuple[str, bytes]:
        if kind == "sleep":
            wait_ms = due_ms - int(time.time() * 1000) if due_ms else delay_ms
            await asyncio.sleep(max(0, wait_ms) / 1000)
            self._steps.append(InlineStepResult(name=name, status="succeeded"))
            return "timeout", b"null"
        if name in self._overrides:
            value = self._overrides[name]
            self._steps.append(InlineStepResult(name=name, status="overridden", output=value))
            if kind == "event":
                return ("event" if value is not None else "timeout"), encode(value)
            return "succeeded", encode(value)
        if kind == "event":
            assert event is not None
            fake = {"id": f"inline-event-{position}", "name": event[0], "data": None, "ts": int(time.time() * 1000)}
            self._steps.append(InlineStepResult(name=name, status="succeeded", output=fake))
            return "event", encode(fake)
        if kind == "input":
            raise RedflowError(f"run_inline: step {name!r} waits for input; give its output in step_overrides")
        raise RedflowError(f"run_inline: step {name!r} starts a child workflow; give its output in step_overrides")

    async def start_child(self, name: str, workflow: Any, input: Any, **_: Any) -> str:
        self._counter += 1
        return f"{self._run_id}-child-{self._counter}"

    async def emit_event(self, event_name: str, input: Any, **_: Any) -> list[str]:
        return []

    async def cancel_child(self, child_id: str, reason: str) -> None:
        return None


async def run_inline(
    definition: WorkflowDefinition[Any],
    input: Any = None,
    *,
    run_id: str = "test-run-1",
    attempt: int = 1,
    max_attempts: int | None = None,
    timeout_s: float = 30.0,
    step_overrides: dict[str, Any] | None = None,
) -> InlineRunResult:
    """Run ``definition``'s handler once; errors are captured in ``.error``, never raised.

    Input and outputs go through JSON as they would on a worker: the input is validated with the
    workflow's ``input_schema`` and the handler gets the validated object; an output JSON cannot
    encode is an ``OutputSerializationError``; the workflow's ``timeout_ms`` applies.
    """
    result = InlineRunResult()
    overrides = dict(step_overrides or {})
    history = [
        StepRecord(name=name, position=0, attempt=attempt, output=msgspec.Raw(encode(value)))
        for name, value in overrides.items()
    ]
    run = RunContext(
        id=run_id, workflow=definition.name, queue=definition.options.queue, attempt=attempt,
        max_attempts=max_attempts if max_attempts is not None else definition.max_attempts,
    )
    signal = asyncio.Event()
    backend = _InlineBackend(run_id, result.steps, overrides)
    limit = max_payload_bytes()
    steps = _InlineSteps(run, signal, history, backend, limit)
    steps.results = result.steps
    try:
        value = decode(encode_payload(input, f"input of workflow {definition.name!r}", limit))
        if definition.input_schema is not None:
            value = definition.input_schema.validate(value)
        ctx = WorkflowHandlerContext(input=value, run=run, signal=signal, step=steps)
        async with asyncio.timeout(timeout_s):
            output = await _handler_output(definition, ctx)
        result.output = decode(encode_output(output, f"output of workflow {definition.name!r} in run {run_id}",
                                             limit))
    except (Exception, asyncio.CancelledError) as error:
        result.error = error if isinstance(error, Exception) else RedflowError("canceled")
    for name in overrides:
        if steps.was_called(name) and not any(s.name == name for s in result.steps):
            result.steps.append(InlineStepResult(name=name, status="overridden", output=overrides[name]))
    return result


async def _handler_output(definition: WorkflowDefinition[Any], ctx: WorkflowHandlerContext[Any]) -> Any:
    timeout_ms = definition.options.timeout_ms
    if timeout_ms is None:
        return await definition.handler(ctx)
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            return await definition.handler(ctx)
    except builtins.TimeoutError:
        raise TimeoutError(f"workflow {definition.name!r} timed out after {timeout_ms} ms") from None


class _InlineSteps(StepApi):
    """Overrides replace a step's outcome wherever the handler calls it (no replay positions)."""

    results: list[InlineStepResult]

    async def _record_failure(
        self, name: str, position: int, kind: str, started: int, state: str, error: BaseException
    ) -> None:
        if self.results and self.results[-1].name == name:  # a sleep cut short by its timeout_ms
            self.results.pop()
        self.results.append(InlineStepResult(name=name, status=state, error=error))

    def _enter(self, name: str) -> tuple[int, StepRecord | None]:
        if name in self._seen:
            return super()._enter(name)
        self._seen.add(name)
        self._position += 1
        record = self._latest.get(name)
        if record is not None and record.kind == "run" and record.state == "ok":
            return self._position, record
        return self._position, None

