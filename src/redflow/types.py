"""Public value types: options, policies, contexts and the records queries return."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar

if TYPE_CHECKING:
    from .registry import WorkflowRegistry
    from .step import StepApi
    from .streams import WorkflowStreamWriter

RunStatus = Literal["scheduled", "queued", "running", "succeeded", "failed", "canceled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

DEFAULT_MAX_ATTEMPTS = 3
IDEMPOTENCY_TTL_SEC = 7 * 24 * 3600

InputT = TypeVar("InputT")


def is_terminal_status(status: str | None) -> bool:
    return status in TERMINAL_STATUSES


@dataclass(frozen=True, slots=True)
class RunContext:
    """What a handler, hook or policy knows about its run."""

    id: str
    workflow: str
    queue: str
    attempt: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class WorkflowResumeContext:
    """The human input a run was resumed with (``client.resume_run(..., form=...)``)."""

    form: Any


@dataclass(slots=True)
class WorkflowHandlerContext(Generic[InputT]):
    """The single argument of a workflow handler."""

    input: InputT
    run: RunContext
    signal: asyncio.Event
    step: StepApi
    resume: WorkflowResumeContext | None = None
    stream: WorkflowStreamWriter | None = None  # set for workflows defined with stream=True


@dataclass(frozen=True, slots=True)
class OnFailureContext:
    error: BaseException
    input: Any
    run: RunContext


@dataclass(frozen=True, slots=True)
class RetryPolicyRunContext:
    id: str
    workflow: str
    queue: str
    attempt: int
    max_attempts: int
    next_attempt: int


@dataclass(frozen=True, slots=True)
class RetryPolicyContext:
    error: BaseException
    input: Any
    run: RetryPolicyRunContext


DelayValue = int | float | str
RetryDelay = DelayValue | Callable[[RetryPolicyContext], DelayValue | Awaitable[DelayValue]]
ShouldRetry = Callable[[RetryPolicyContext], bool | Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class WorkflowRetryPolicy:
    """How failed attempts are retried. ``max_attempts`` counts the first attempt."""

    max_attempts: int | None = None
    delay: RetryDelay | None = None
    should_retry: ShouldRetry | None = None


@dataclass(frozen=True, slots=True)
class CronTrigger:
    expression: str
    timezone: str | None = None
    input: Any = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class EventTrigger:
    name: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowDebounceOptions:
    key: Callable[[Any], str]
    period: int | str
    timeout: int | str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowRateLimitOptions:
    key: Callable[[Any], str]
    limit: int
    period: int | str


class ReceivedEvent(TypedDict):
    id: str
    name: str
    data: Any
    ts: int


class RunState(TypedDict, total=False):
    id: str
    workflow: str
    queue: str
    status: RunStatus
    input: Any
    output: Any
    error: dict[str, Any] | None
    attempt: int
    max_attempts: int
    created_at: int
    available_at: int | None
    started_at: int | None
    finished_at: int | None
    cancel_requested_at: int | None
    cancel_reason: str | None
    parent_run_id: str | None
    stream_enabled: bool
    replayed_from: str  # present only on a run started by replay_run: the run it replays


class EventWaitInfo(TypedDict):
    """The wait of a ``wait_for_event`` step: resolved_by is None while it waits."""

    kind: Literal["event"]
    event: str | None
    correlation_key: str | None
    event_id: str | None  # the event that resolved it
    resolved_by: Literal["event", "timeout"] | None
    ts: int | None  # that event's time


class InputWaitInfo(TypedDict):
    """The wait of a step that raised ``wait_for_input``: resolved_by is None while it waits."""

    kind: Literal["input"]
    message: str
    input_json_schema: dict[str, Any] | None
    resolved_by: Literal["input", "timeout"] | None


WaitInfo = EventWaitInfo | InputWaitInfo


class StepState(TypedDict, total=False):
    name: str
    seq: int
    attempt: int
    status: str  # running (a wait in progress) | succeeded | failed | canceled
    started_at: int
    finished_at: int
    output: Any
    error: dict[str, Any] | None  # the error of a failed or canceled step (None otherwise)
    kind: str  # sleep | event | child | emit (absent for step.run)
    wait: WaitInfo  # event and input waits only
    wait_until_at: int
    child_run_id: str


StepTrace = StepState  # a step of an attempt trace (get_run_attempts) has the shape of a step state


class AttemptTrace(TypedDict):
    attempt: int
    status: str  # succeeded | failed | canceled
    started_at: int
    finished_at: int
    output: Any
    error: dict[str, Any] | None
    steps: list[StepTrace]  # the step records made during this attempt, in order


@dataclass(slots=True)
class ListRunsParams:
    status: RunStatus | None = None
    workflow: str | None = None
    cursor: str | None = None  # a run id: the page starts after it
    limit: int = 50
    sort: Literal["asc", "desc"] = "desc"


@dataclass(slots=True)
class SearchRunsParams:
    status: RunStatus | None = None
    workflow: str | None = None
    queue: str | None = None
    parent_run_id: str | None = None
    query: str | None = None  # substring of the run id, workflow, input, output or error (bounded scan)
    created_after: int | None = None  # epoch ms
    created_before: int | None = None  # epoch ms
    cursor: str | None = None
    limit: int = 50
    sort: Literal["asc", "desc"] = "desc"


class ListedRun(TypedDict):
    id: str
    workflow: str
    queue: str
    status: str
    error: dict[str, Any] | None
    created_at: int
    cursor: str
    available_at: int | None
    started_at: int | None
    finished_at: int | None
    attempt: int
    max_attempts: int
    parent_run_id: str | None


class SearchRunsResult(TypedDict):
    runs: list[ListedRun]
    scanned: int
    cursor: str | None


class RunStats(TypedDict):
    total: int
    by_status: dict[str, int]
    backlog: dict[str, dict[str, int]]  # queue -> {"ready": n, "scheduled": n}


@dataclass(slots=True)
class ListEventsParams:
    name: str | None = None
    cursor: str | None = None  # an event id: the page starts after it
    fanout_status: str | None = None  # pending | completed | partial | failed | no-subscribers
    limit: int = 50
    sort: Literal["asc", "desc"] = "desc"


class EmitEventResult(TypedDict):
    event_id: str
    handles: list[Any]
    resumed_run_ids: list[str]


class EventDelivery(TypedDict, total=False):
    """One subscriber's run of an event."""

    subscriber_event_id: str  # <event id>:<workflow>
    workflow: str
    queue: str
    status: str  # delivered | failed
    run_id: str | None
    error: str | None


class ListedEvent(TypedDict):
    """An event as ``list_events`` returns it."""

    id: str
    name: str
    ts: int
    correlation_key: str | None
    parent_run_id: str | None
    next_process_at: int | None
    processing_attempts: int
    subscriber_count: int
    resumed_run_count: int
    delivery_count: int
    failed_delivery_count: int
    fanout_status: str  # pending | completed | no-subscribers
    finished_at: int | None
    expires_at: int | None
    error: dict[str, Any] | None
    last_process_error: dict[str, Any] | None
    deliveries: list[EventDelivery]
    resumed_run_ids: list[str]


class EventRecord(ListedEvent, total=False):
    """An event as ``get_event`` returns it: a listed event with its data."""

    data: Any


class CronTriggerMeta(TypedDict):
    expression: str
    timezone: str | None
    input: Any
    id: str  # the trigger id (given, or derived from the trigger)
    next_run_at: int | None  # epoch ms of the next slot; None for an expression that never fires again


class EventTriggerMeta(TypedDict):
    name: str
    id: str | None


class WorkflowMeta(TypedDict):
    """What a registration (a worker start or ``client.sync_registry``) publishes about a workflow."""

    name: str
    app: str
    queue: str
    max_concurrency: int | None  # None: unlimited
    max_attempts: int
    cron: list[CronTriggerMeta]
    event: list[EventTriggerMeta]
    input_json_schema: dict[str, Any] | None
    stream_enabled: bool
    updated_at: int  # epoch ms of the registration
    admission: dict[str, Any]  # throttle / rate_limit as [limit, period ms], mutex: true


@dataclass(slots=True)
class StartWorkerOptions:
    """Options of :func:`redflow.start_worker`. Times carry their unit in the name."""

    app: str = ""
    redis: Any = None
    url: str | None = None
    prefix: str | None = None
    registry: WorkflowRegistry | None = None
    queues: list[str] | None = None
    concurrency: int = 1
    lease_ms: int = 5000
    blmove_timeout_sec: float = 5.0
    reaper_interval_ms: int | None = None
    reaper_batch_size: int = 100
    watchdog_enabled: bool = True
    watchdog_interval_ms: int | None = None
    watchdog_stalled_for_ms: int = 15000
    run_history_cleanup_interval_ms: int = 60000
    registry_recovery_interval_ms: int | None = None
    grace_period_ms: int = 10000
    max_recoveries: int = 3
    claim_batch_size: int = 64


class BulkQuery(TypedDict, total=False):
    """Which runs a bulk action (retry_runs, cancel_runs) covers; every given field must match."""

    workflow: str
    status: RunStatus
    queue: str
    created_after_ms: int
    created_before_ms: int


class BulkResult(TypedDict):
    """Progress of a bulk action. ``job_id`` resumes it after an interruption; ``finished`` once every
    matching run was visited (``matched`` counts them; ``done`` were changed, ``skipped`` were not:
    they had moved on in the meantime)."""

    job_id: str
    dry_run: bool
    matched: int
    done: int
    skipped: int
    finished: bool


class FailureGroup(TypedDict):
    """Failed runs of one workflow that failed the same way (see ``list_failures``)."""

    workflow: str
    category: Literal["exhausted", "non_retriable", "crashed", "other"]
    fingerprint: str
    error_name: str
    error_kind: str
    message: str  # the latest run's message
    step: str | None  # the step that failed, None when the handler itself raised
    count: int
    first_seen_ms: int
    last_seen_ms: int
    sample_run_ids: list[str]  # newest first


class RunExplanation(TypedDict):
    """Why a run is where it is (see ``explain_run``): ``reason`` is a short code, ``message`` the
    same in words, ``details`` the data behind it."""

    run_id: str
    status: RunStatus
    reason: str
    message: str
    details: dict[str, Any]
