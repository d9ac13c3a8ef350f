"""Every exception redflow raises derives from :class:`RedflowError`; ``kind`` is the stored tag."""

from __future__ import annotations

import builtins
import traceback
from typing import Any


class RedflowError(Exception):
    """Base class of all redflow errors."""

    kind = "error"


class InputValidationError(RedflowError):
    """Workflow input failed its schema; ``issues`` lists each problem."""

    kind = "validation"

    def __init__(self, message: str, issues: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.issues = issues or []


class UnknownWorkflowError(RedflowError):
    """No workflow of that name is defined locally or registered in Redis."""

    kind = "unknown_workflow"

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"unknown workflow {name!r}: it is neither defined in this process "
                         "nor registered by any worker under this prefix")
        self.name = name


class CanceledError(RedflowError):
    """The run was canceled."""

    kind = "canceled"


class TimeoutError(RedflowError, builtins.TimeoutError):
    """A step, a wait or a result() call ran out of time."""

    kind = "timeout"


class OutputSerializationError(RedflowError):
    """A step or workflow returned a value that cannot be encoded as JSON."""

    kind = "serialization"

    def __init__(self, message: str, cause_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause_error = cause_error


class PayloadEncodingError(RedflowError, TypeError):
    """A value given to redflow (an input, an event payload) cannot be encoded as JSON."""

    kind = "serialization"


class PayloadTooLargeError(RedflowError):
    """An encoded payload exceeds REDFLOW_MAX_PAYLOAD_BYTES."""

    kind = "payload_too_large"


class NonRetriableError(RedflowError):
    """Raise from a handler or step to fail the run at once, without retries."""

    kind = "non_retriable"


class RetryAfterError(RedflowError):
    """Raise to retry after ``retry_after`` (milliseconds, duration string or datetime)."""

    kind = "retry_after"

    def __init__(self, message: str, retry_after: Any) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitExceededError(RedflowError):
    """The workflow's rate limit refused the run. ``retry_after`` (milliseconds, a duration string
    such as "2s", or a datetime) says when budget returns; it is kept as ``retry_after_ms`` and
    stored as ``retryAfterMs``."""

    kind = "rate_limited"

    def __init__(self, message: str, retry_after: Any = None) -> None:
        from .durations import delay_ms

        super().__init__(message)
        self.retry_after = retry_after
        self.retry_after_ms = 0 if retry_after is None else delay_ms(retry_after, "retry_after")


class WaitForInputError(RedflowError):
    """Raised to pause a run until ``client.resume_run`` supplies input."""

    kind = "wait_for_input"

    def __init__(self, message: str, schema: Any = None) -> None:
        super().__init__(message)
        self.schema = schema


class RunFailedError(RedflowError):
    """``result()`` of a run that failed; ``error`` is the stored error record."""

    kind = "run_failed"

    def __init__(self, run_id: str, error: dict[str, Any]) -> None:
        name = error.get("name", "Error")
        super().__init__(f"Run failed: run {run_id}: {name}: {error.get('message', '')}")
        self.run_id = run_id
        self.error = error


class RunNotFoundError(RedflowError):
    """No run with that id exists (never created, or removed by retention)."""

    kind = "not_found"


class InvalidRunStateError(RedflowError):
    """An action that needs the run in another state (retrying a run that has not ended, ...)."""

    def __init__(self, run_id: str, status: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.status = status


class NonDeterminismError(RedflowError):
    """A replay asked for different steps than the stored history of the run."""

    kind = "non_determinism"


class DuplicateStepError(RedflowError):
    """A handler used one step name twice in a run (never retried: it would fail the same way)."""

    kind = "duplicate_step"


class StorageLayoutError(RedflowError):
    """The key prefix holds data written by another storage layout."""

    kind = "storage_layout"


class ConfigurationError(RedflowError, ValueError):
    """An option or definition is invalid."""

    kind = "configuration"


class CrashedError(RedflowError):
    """The run's worker died repeatedly during the same attempt."""

    kind = "crashed"


FAILED_STEP_ATTR = "__redflow_step__"  # set on an exception by the step it escaped from


def serialize_error(error: BaseException) -> dict[str, Any]:
    """The error as runs store it: ``{name, message, kind, stack, retryAfterMs?, step?}``; ``step``
    names the step the error escaped from, when it came from one."""
    record: dict[str, Any] = {
        "name": type(error).__name__,
        "message": str(error),
        "kind": str(error.kind) if isinstance(error, RedflowError) else "error",
        "stack": "".join(traceback.format_exception(error))[-8000:],
    }
    step = getattr(error, FAILED_STEP_ATTR, None)
    if isinstance(step, str):
        record["step"] = step
    if isinstance(error, RateLimitExceededError):
        record["retryAfterMs"] = error.retry_after_ms
    elif isinstance(error, RetryAfterError):
        from .durations import delay_ms

        try:
            record["retryAfterMs"] = delay_ms(error.retry_after, "retry_after")
        except ConfigurationError:
            pass
    return record


NON_RETRYABLE_KINDS = frozenset(
    {
        "validation",
        "unknown_workflow",
        "serialization",
        "canceled",
        "non_retriable",
        "rate_limited",
        "payload_too_large",
        "non_determinism",
        "duplicate_step",
        "configuration",
        "crashed",
    }
)
