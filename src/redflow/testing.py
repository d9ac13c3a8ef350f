"""``run_inline``: execute a workflow handler in-process, without Redis, for unit tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .encoding import decode, encode, max_payload_bytes
from .errors import RedflowError
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


class _MemoryRecorder:
    def __init__(self, steps: list[InlineStepResult]) -> None:
        self._steps = steps

    async def record(self, record: StepRecord) -> None:
        self._steps.append(InlineStepResult(name=record.n, status="succeeded", output=decode(record.o)))


async def run_inline(
    definition: WorkflowDefinition[Any],
    input: Any = None,
    *,
    run_id: str = "test-run-1",
    attempt: int = 1,
    max_attempts: int = 3,
    timeout_s: float = 30.0,
    step_overrides: dict[str, Any] | None = None,
) -> InlineRunResult:
    """Run ``definition``'s handler once; step outputs come from ``step_overrides`` where given.

    Input and outputs go through JSON as they would on a worker. Errors are captured in ``.error``.
    """
    result = InlineRunResult()
    limit = max_payload_bytes()
    cached: dict[str, StepRecord] = {}
    for seq, (name, value) in enumerate((step_overrides or {}).items(), start=1):
        cached[name] = StepRecord(n=name, q=seq, a=attempt, o=msgspec.Raw(encode(value)))
    run = RunContext(
        id=run_id, workflow=definition.name, queue=definition.options.queue, attempt=attempt,
        max_attempts=max_attempts,
    )
    signal = asyncio.Event()
    recorder = _MemoryRecorder(result.steps)
    steps = StepApi(run, signal, cached, recorder, limit)
    try:
        ctx = WorkflowHandlerContext(input=decode(encode(input)), run=run, signal=signal, step=steps)
        async with asyncio.timeout(timeout_s):
            output = await definition.handler(ctx)
        result.output = decode(encode(output))
    except (Exception, asyncio.CancelledError) as error:
        result.error = error if isinstance(error, Exception) else RedflowError("canceled")
    for name, record in cached.items():
        if step_overrides and name in step_overrides and steps.was_called(name):
            result.steps.append(InlineStepResult(name=name, status="overridden", output=decode(record.o)))
    return result
