"""Workflow definitions: ``define_workflow`` and the ``@workflow`` decorator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .durations import duration_ms
from .errors import ConfigurationError
from .registry import WorkflowRegistry, get_default_registry
from .types import (
    DEFAULT_MAX_ATTEMPTS,
    CronTrigger,
    EventTrigger,
    OnFailureContext,
    WorkflowDebounceOptions,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    WorkflowRetryPolicy,
)
from .validation import InputSchema, check_event_name, schema_adapter

if TYPE_CHECKING:
    from .client import RunHandle

OutputT = TypeVar("OutputT")
Handler = Callable[[WorkflowHandlerContext[Any]], Awaitable[OutputT]]
OnFailure = Callable[[OnFailureContext], Any]


@dataclass(slots=True)
class DefineWorkflowOptions:
    name: str
    queue: str = "default"
    max_concurrency: int | None = None
    max_attempts: int | None = None
    cron: list[CronTrigger] | None = None
    event: list[EventTrigger] | None = None
    debounce: WorkflowDebounceOptions | None = None
    on_failure: OnFailure | None = None
    mutex: Callable[[Any], str] | None = None
    rate_limit: WorkflowRateLimitOptions | None = None
    retries: WorkflowRetryPolicy | None = None
    stream: bool = False
    throttle: WorkflowRateLimitOptions | None = None
    input_schema: Any = None
    timeout_ms: int | None = None  # per attempt: a handler still running after it fails the attempt (kind timeout)

    def resolved_max_attempts(self) -> int:
        if self.retries is not None and self.retries.max_attempts is not None:
            return self.retries.max_attempts
        if self.max_attempts is not None:
            return self.max_attempts
        return DEFAULT_MAX_ATTEMPTS




class WorkflowDefinition(Generic[OutputT]):
    """A named workflow: its handler and options. Call :meth:`run` to start a run."""

    def __init__(self, options: DefineWorkflowOptions, handler: Handler[OutputT]) -> None:
        _validate(options, handler)
        self.options = options
        self.handler = handler
        self.input_schema: InputSchema | None = (
            None if options.input_schema is None else schema_adapter(options.name, options.input_schema)
        )

    def prepare_input(self, value: Any) -> Any:
        """Validate ``value`` (if the workflow has a schema) and return its JSON-compatible form."""
        if self.input_schema is None:
            return value
        return self.input_schema.to_json(self.input_schema.validate(value))

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def max_attempts(self) -> int:
        return self.options.resolved_max_attempts()

    def meta(self) -> dict[str, Any]:
        """The metadata workers publish, so clients without the definition can enqueue it."""
        return {
            "name": self.name,
            "queue": self.options.queue,
            "max_attempts": self.max_attempts,
            "max_concurrency": self.options.max_concurrency,
            "stream_enabled": self.options.stream,
            "input_json_schema": None if self.input_schema is None else self.input_schema.json_schema(),
            "cron": [
                {"expression": t.expression, "timezone": t.timezone, "input": t.input, "id": t.id}
                for t in self.options.cron or []
            ],
            "event": [{"name": t.name, "id": t.id} for t in self.options.event or []],
            "admission": {
                **{
                    name: [config.limit, duration_ms(config.period, name)]
                    for name, config in (("throttle", self.options.throttle), ("rate_limit", self.options.rate_limit))
                    if config is not None
                },
                **({"mutex": True} if self.options.mutex is not None else {}),
            },
        }

    async def run(
        self,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
        run_at: datetime | None = None,
        queue_override: str | None = None,
    ) -> RunHandle:
        """Start a run through the default client (one Redis command)."""
        from .client import get_default_client

        return await get_default_client().enqueue_definition(
            self,
            input,
            idempotency_key=idempotency_key,
            idempotency_ttl=idempotency_ttl,
            run_at=run_at,
            queue_override=queue_override,
        )

    def __repr__(self) -> str:
        return f"WorkflowDefinition({self.name!r}, queue={self.options.queue!r})"


def _validate(options: DefineWorkflowOptions, handler: Any) -> None:
    name = options.name
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"workflow name must be a non-empty string, got {name!r}")
    if not callable(handler):
        raise ConfigurationError(f"workflow {name!r}: handler must be an async function, got {handler!r}")
    if not isinstance(options.queue, str) or not options.queue.strip():
        raise ConfigurationError(f"workflow {name!r}: queue must be a non-empty string, got {options.queue!r}")
    attempts = options.resolved_max_attempts()
    if not isinstance(attempts, int) or attempts < 1:
        raise ConfigurationError(f"workflow {name!r}: max_attempts must be an integer >= 1, got {attempts!r}")
    mc = options.max_concurrency
    if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc < 1):
        raise ConfigurationError(f"workflow {name!r}: max_concurrency must be an integer >= 1 or None, got {mc!r}")
    from .leader.cron import validate_trigger

    for trigger in options.cron or []:
        validate_trigger(name, trigger)
    for event in options.event or []:
        if not isinstance(event, EventTrigger) or not isinstance(event.name, str) or not event.name.strip():
            raise ConfigurationError(f"workflow {name!r}: event triggers must be EventTrigger(name=...), got {event!r}")
        check_event_name(event.name, f"workflow {name!r}: event trigger name")
    for option_name in ("throttle", "rate_limit"):
        config = getattr(options, option_name)
        if config is None:
            continue
        if not isinstance(config, WorkflowRateLimitOptions) or not callable(config.key):
            raise ConfigurationError(f"workflow {name!r}: {option_name} must be WorkflowRateLimitOptions(key=callable, "
                                     f"limit, period), got {config!r}")
        if not isinstance(config.limit, int) or config.limit < 1:
            raise ConfigurationError(f"workflow {name!r}: {option_name}.limit must be an integer >= 1")
        if duration_ms(config.period, f"workflow {name!r}: {option_name}.period") <= 0:
            raise ConfigurationError(f"workflow {name!r}: {option_name}.period must be positive")
    timeout = options.timeout_ms
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1):
        raise ConfigurationError(f"workflow {name!r}: timeout_ms must be an integer >= 1 or None, got {timeout!r}")
    if options.mutex is not None and not callable(options.mutex):
        raise ConfigurationError(f"workflow {name!r}: mutex must be a function of the input returning a key")
    debounce = options.debounce
    if debounce is not None:
        if not isinstance(debounce, WorkflowDebounceOptions) or not callable(debounce.key):
            raise ConfigurationError(f"workflow {name!r}: debounce must be WorkflowDebounceOptions(key=callable, "
                                     f"period, timeout), got {debounce!r}")
        if duration_ms(debounce.period, f"workflow {name!r}: debounce.period") <= 0:
            raise ConfigurationError(f"workflow {name!r}: debounce.period must be positive")
        if debounce.timeout is not None and duration_ms(debounce.timeout, f"workflow {name!r}: debounce.timeout") <= 0:
            raise ConfigurationError(f"workflow {name!r}: debounce.timeout must be positive")


def define_workflow(
    name: str,
    *,
    handler: Handler[OutputT],
    queue: str = "default",
    max_concurrency: int | None = None,
    max_attempts: int | None = None,
    cron: list[CronTrigger] | None = None,
    event: list[EventTrigger] | None = None,
    debounce: WorkflowDebounceOptions | None = None,
    mutex: Callable[[Any], str] | None = None,
    rate_limit: WorkflowRateLimitOptions | None = None,
    retries: WorkflowRetryPolicy | None = None,
    throttle: WorkflowRateLimitOptions | None = None,
    on_failure: OnFailure | None = None,
    input_schema: Any = None,
    stream: bool = False,
    timeout_ms: int | None = None,
    registry: WorkflowRegistry | None = None,
) -> WorkflowDefinition[OutputT]:
    """Define a workflow and register it (in ``registry`` or the process-wide default)."""
    options = DefineWorkflowOptions(
        name=name,
        queue=queue,
        max_concurrency=max_concurrency,
        max_attempts=max_attempts,
        cron=cron,
        event=event,
        debounce=debounce,
        on_failure=on_failure,
        mutex=mutex,
        rate_limit=rate_limit,
        retries=retries,
        stream=stream,
        throttle=throttle,
        input_schema=input_schema,
        timeout_ms=timeout_ms,
    )
    definition = WorkflowDefinition(options, handler)
    (registry if registry is not None else get_default_registry()).register(definition)
    return definition


def workflow(
    name: str, **options: Any
) -> Callable[[Handler[OutputT]], WorkflowDefinition[OutputT]]:
    """Decorator form of :func:`define_workflow`; returns the definition."""

    def decorate(handler: Handler[OutputT]) -> WorkflowDefinition[OutputT]:
        return define_workflow(name, handler=handler, **options)

    return decorate
