"""Retry decisions: whether a failed attempt is retried, and after how long."""

from __future__ import annotations

import inspect
import random
from typing import Any

from .durations import delay_ms
from .encoding import encode
from .errors import NON_RETRYABLE_KINDS, RedflowError, RetryAfterError
from .errors import serialize_error as error_record
from .types import RetryPolicyContext, RetryPolicyRunContext, RunContext, WorkflowRetryPolicy

BASE_DELAY_MS = 250
MAX_DELAY_MS = 30_000


def error_kind(error: BaseException) -> str:
    return str(error.kind) if isinstance(error, RedflowError) else "error"


def is_retryable(error: BaseException) -> bool:
    return error_kind(error) not in NON_RETRYABLE_KINDS


def default_backoff_ms(attempt: int) -> int:
    """Exponential backoff from 250 ms, capped at 30 s, with up to 25% jitter."""
    base: int = min(MAX_DELAY_MS, BASE_DELAY_MS << min(max(0, attempt - 1), 20))
    return base + random.randint(0, base // 4)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def retry_delay_ms(
    error: BaseException, input: Any, run: RunContext, policy: WorkflowRetryPolicy | None
) -> int | None:
    """Delay before the next attempt, or None when the run must fail now.

    Errors raised by a policy callable propagate: the caller fails the run with them.
    """
    if not is_retryable(error) or run.attempt >= run.max_attempts:
        return None
    ctx = RetryPolicyContext(
        error=error,
        input=input,
        run=RetryPolicyRunContext(
            id=run.id, workflow=run.workflow, queue=run.queue, attempt=run.attempt,
            max_attempts=run.max_attempts, next_attempt=run.attempt + 1,
        ),
    )
    if policy is not None and policy.should_retry is not None:
        if not await _maybe_await(policy.should_retry(ctx)):
            return None
    if isinstance(error, RetryAfterError):
        return delay_ms(error.retry_after, f"retry_after of {type(error).__name__}")
    if policy is not None and policy.delay is not None:
        value = policy.delay(ctx) if callable(policy.delay) else policy.delay
        return delay_ms(await _maybe_await(value), f"retry delay of workflow {run.workflow!r}")
    return default_backoff_ms(run.attempt)


def serialize_error(error: BaseException) -> bytes:
    """The stored JSON of an error (``redflow.errors.serialize_error``, encoded)."""
    return encode(error_record(error))
