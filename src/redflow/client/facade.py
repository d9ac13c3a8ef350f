"""RedflowClient: start runs, read their state, wait for results; and create_client."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from typing import Any

from .._redis.client import RedisClient, ServerAddress
from .._redis.pubsub import Subscriber
from ..durations import datetime_ms, duration_ms
from ..encoding import decode, encode_payload, max_payload_bytes
from ..errors import (
    CanceledError,
    ConfigurationError,
    UnknownWorkflowError,
)
from ..ids import new_run_id
from ..registry import WorkflowRegistry, get_default_registry
from ..storage.codes import Code
from ..storage.event_store import EventStore
from ..storage.keys import DEFAULT_PARTITION, PartitionKeys
from ..storage.records import StepRecord, encode_record, workflow_meta
from ..storage.store import Store
from ..streams import RunStreamReader, RunStreamRecord, check_read_args, stream_record
from ..types import (
    IDEMPOTENCY_TTL_SEC,
    TERMINAL_STATUSES,
    AttemptTrace,
    BulkQuery,
    BulkResult,
    FailureGroup,
    RunExplanation,
    RunState,
    StepState,
)
from ..validation import json_schema_issues, validation_error
from ..workflow import WorkflowDefinition
from .actions import UNSET, Actions
from .events import EventsMixin
from .explain import explain_run
from .failures import list_failures
from .handle import DEFAULT_RESULT_TIMEOUT_MS, RunHandle, wait_for_outcome
from .queries import QueriesMixin
from .states import run_state, step_state, wait_info

DEFAULT_URL = "redis://localhost:6379"
DEFAULT_PREFIX = "redflow:v1"
DEFAULT_RETENTION_DAYS = 30.0


def default_prefix() -> str:
    return os.environ.get("REDFLOW_PREFIX") or DEFAULT_PREFIX


def retention_ms_from_env() -> int:
    raw = os.environ.get("REDFLOW_RUN_RETENTION_DAYS")
    if not raw:
        return int(DEFAULT_RETENTION_DAYS * 86_400_000)
    try:
        days = float(raw)
    except ValueError:
        raise ConfigurationError(f"REDFLOW_RUN_RETENTION_DAYS must be a number of days, got {raw!r}") from None
    if days <= 0:
        raise ConfigurationError(f"REDFLOW_RUN_RETENTION_DAYS must be positive, got {raw!r}")
    return int(days * 86_400_000)


class RedflowClient(EventsMixin, QueriesMixin):
    """Access to one redflow deployment (a Redis server and a key prefix)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str = DEFAULT_PREFIX,
        app: str | None = None,
        run_history_retention_ms: int | None = None,
        registry: WorkflowRegistry | None = None,
    ) -> None:
        self.redis = redis
        self.app = app or ""
        self.keys = PartitionKeys(prefix, DEFAULT_PARTITION)
        self.store = Store(redis, self.keys)
        self.registry = registry
        self.retention_ms = run_history_retention_ms or retention_ms_from_env()
        self.max_payload_bytes = max_payload_bytes()
        self._subscriber: Subscriber | None = None
        self._events: EventStore | None = None
        self._remote_meta: dict[str, dict[str, Any]] = {}
        self._actions = Actions(self)

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    def registry_or_default(self) -> WorkflowRegistry:
        return self.registry if self.registry is not None else get_default_registry()

    # --- registration -----------------------------------------------------------------------------
    async def sync_registry(self, registry: WorkflowRegistry | None = None, *, app: str | None = None) -> None:
        """Publish a registry's workflows under this prefix without starting a worker: their metadata
        (so clients without the definitions can start them), cron triggers, event subscriptions and
        event contracts. Defaults to the client's registry (else the default registry) and app.
        A registry whose event contracts disagree with the registered ones is refused with a
        ConfigurationError before anything is written. Workers call this when they start."""
        from ..leader.cron import cron_records

        reg = registry if registry is not None else self.registry_or_default()
        definitions = reg.definitions()
        await self.store.ensure_ready()
        sec, usec = await self.redis.execute("TIME")
        now_ms = int(sec) * 1000 + int(usec) // 1000
        metas = {d.name: d.meta() for d in definitions}
        subscriptions = {d.name: [t.name for t in (d.options.event or [])] for d in definitions}
        # Contracts are checked first inside register(): a refused registry writes nothing.
        await self.events.register(metas, subscriptions, cron_records(definitions), now_ms)
        owner = self.app if app is None else app
        await self.store.write_workflows({
            name: encode_record(workflow_meta({**meta, "app": owner, "updated_at": now_ms}))
            for name, meta in metas.items()
        })
        for name in metas:
            self._remote_meta.pop(name, None)

    # --- starting runs ----------------------------------------------------------------------------
    async def enqueue_definition(
        self,
        definition: WorkflowDefinition[Any],
        input: Any,
        *,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
        run_at: datetime | None = None,
        queue_override: str | None = None,
        parent_run_id: str | None = None,
    ) -> RunHandle:
        debounce = definition.options.debounce
        if debounce is not None:
            return await self._enqueue_debounced(definition, input, queue_override, parent_run_id)
        return await self._enqueue(
            definition.name,
            queue_override or definition.options.queue,
            definition.max_attempts,
            definition.prepare_input(input),
            idempotency_key=idempotency_key,
            idempotency_ttl=idempotency_ttl,
            run_at=run_at,
            parent_run_id=parent_run_id,
        )

    async def enqueue_many(
        self,
        definition: WorkflowDefinition[Any],
        inputs: list[Any],
        *,
        run_at: datetime | None = None,
        queue_override: str | None = None,
        chunk_size: int = 1000,
    ) -> list[RunHandle]:
        """Start one run per input with one Redis command per ``chunk_size`` runs (the batched
        enqueue path). Inputs are validated and encoded before anything is written; idempotency keys
        and debounce do not apply here."""
        if not 1 <= chunk_size <= 5000:
            raise ConfigurationError(f"chunk_size must be between 1 and 5000, got {chunk_size}")
        if run_at is not None and not isinstance(run_at, datetime):
            raise ConfigurationError(f"run_at for workflow {definition.name!r} must be a datetime, got {run_at!r}")
        what = f"input of workflow {definition.name!r}"
        encoded = [encode_payload(definition.prepare_input(value), what, self.max_payload_bytes) for value in inputs]
        await self.store.ensure_ready()
        queue = queue_override or definition.options.queue
        run_at_ms = datetime_ms(run_at) if run_at is not None else 0
        partition = self.keys.partition
        ids = [new_run_id(partition) for _ in encoded]
        await asyncio.gather(*(
            self.store.enqueue_batch(ids[i:i + chunk_size], definition.name, queue, encoded[i:i + chunk_size],
                                     definition.max_attempts, run_at_ms)
            for i in range(0, len(ids), chunk_size)
        ))
        return [RunHandle(self, run_id) for run_id in ids]

    async def _enqueue_debounced(
        self, definition: WorkflowDefinition[Any], input: Any, queue_override: str | None, parent_run_id: str | None
    ) -> RunHandle:
        options = definition.options.debounce
        assert options is not None
        value = definition.input_schema.validate(input) if definition.input_schema is not None else input
        key = options.key(value)
        if not isinstance(key, str) or not key.strip():
            raise ConfigurationError(f"workflow {definition.name!r}: the debounce key function returned {key!r}; "
                                     "it must return a non-empty string")
        stored = definition.input_schema.to_json(value) if definition.input_schema is not None else value
        data = encode_payload(stored, f"input of workflow {definition.name!r}", self.max_payload_bytes)
        period = duration_ms(options.period, f"debounce period of workflow {definition.name!r}")
        timeout = 0 if options.timeout is None else duration_ms(options.timeout, "debounce timeout")
        await self.store.ensure_ready()
        code, run_id, _ = await self.store.debounce(
            new_run_id(self.keys.partition), definition.name, queue_override or definition.options.queue, data,
            definition.max_attempts, key.strip(), period, timeout, parent_run_id,
        )
        if code is Code.CANCELED:
            raise CanceledError(f"run {parent_run_id} was canceled: it cannot start a run of {definition.name!r}")
        return RunHandle(self, run_id)

    async def run_by_name(
        self,
        workflow_name: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
        run_at: datetime | None = None,
        queue_override: str | None = None,
        max_attempts_override: int | None = None,
        parent_run_id: str | None = None,
    ) -> RunHandle:
        """Start a run of a workflow known by name, locally or from a worker's registration."""
        definition = self.registry_or_default().get(workflow_name)
        if definition is not None and definition.options.debounce is not None:
            return await self._enqueue_debounced(definition, input, queue_override, parent_run_id)
        if definition is not None:
            queue, max_attempts = definition.options.queue, definition.max_attempts
            input = definition.prepare_input(input)
        else:
            meta = await self._workflow_meta(workflow_name)
            if meta is None:
                if queue_override is None:
                    raise UnknownWorkflowError(workflow_name)
                meta = {}
            queue, max_attempts = meta.get("queue", "default"), int(meta.get("max_attempts", 3))
        return await self._enqueue(
            workflow_name,
            queue_override or queue,
            max_attempts_override or max_attempts,
            input,
            idempotency_key=idempotency_key,
            idempotency_ttl=idempotency_ttl,
            run_at=run_at,
            parent_run_id=parent_run_id,
        )

    async def emit_workflow(
        self,
        workflow_name: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        idempotency_ttl: int | None = None,
        run_at: datetime | None = None,
        parent_run_id: str | None = None,
    ) -> RunHandle:
        """Start a run by workflow name (``run_by_name`` without overrides)."""
        return await self.run_by_name(
            workflow_name,
            input,
            idempotency_key=idempotency_key,
            idempotency_ttl=idempotency_ttl,
            run_at=run_at,
            parent_run_id=parent_run_id,
        )

    async def _workflow_meta(self, name: str) -> dict[str, Any] | None:
        meta = self._remote_meta.get(name)
        if meta is None:
            await self.store.ensure_ready()
            raw = await self.store.read_workflow(name)
            if raw is None:
                return None
            meta = decode(raw)
            self._remote_meta[name] = meta
        return meta

    async def _enqueue(
        self,
        workflow: str,
        queue: str,
        max_attempts: int,
        input: Any,
        *,
        idempotency_key: str | None,
        idempotency_ttl: int | None,
        run_at: datetime | None,
        parent_run_id: str | None,
    ) -> RunHandle:
        what = f"input of workflow {workflow!r}"
        data = encode_payload(input, what, self.max_payload_bytes)
        run_at_ms = 0
        if run_at is not None:
            if not isinstance(run_at, datetime):
                raise ConfigurationError(f"run_at for workflow {workflow!r} must be a datetime, got {run_at!r}")
            run_at_ms = datetime_ms(run_at)
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key):
            raise ConfigurationError(
                f"idempotency_key for workflow {workflow!r} must be a non-empty string, got {idempotency_key!r}"
            )
        ttl = IDEMPOTENCY_TTL_SEC if idempotency_ttl is None else int(idempotency_ttl)
        if idempotency_key is not None and ttl <= 0:
            raise ConfigurationError(f"idempotency_ttl for workflow {workflow!r} must be positive, got {ttl}")
        await self.store.ensure_ready()
        run_id = new_run_id(self.keys.partition)
        code, bound_id, _ = await self.store.enqueue(
            run_id, workflow, queue, data, max_attempts, run_at_ms, idempotency_key, ttl, parent_run_id,
        )
        if code is Code.CANCELED:
            raise CanceledError(f"run {parent_run_id} was canceled: it cannot start a run of {workflow!r}")
        return RunHandle(self, bound_id)

    # --- reading ------------------------------------------------------------------------------------
    def make_run_handle(self, run_id: str) -> RunHandle:
        return RunHandle(self, run_id)

    async def get_run(self, run_id: str) -> RunState | None:
        await self.store.ensure_ready()
        found = await self.store.read_run(run_id)
        if found is None:
            return None
        header, inp, out, err = found
        state = run_state(run_id, header, inp, out, err)
        state["stream_enabled"] = await self._streams(header.workflow)
        return state

    async def _streams(self, workflow: str) -> bool:
        """Whether the workflow streams: from its local definition, else its registered metadata."""
        definition = self.registry_or_default().get(workflow)
        if definition is not None:
            return bool(definition.options.stream)
        meta = await self._workflow_meta(workflow)
        return bool(meta and meta.get("stream_enabled"))

    async def get_run_steps(self, run_id: str) -> list[StepState]:
        """The run's steps in handler order, each in its latest recorded state."""
        await self.store.ensure_ready()
        history, pending = await asyncio.gather(self.store.read_steps(run_id), self.store.read_wait(run_id))
        latest: dict[str, StepRecord] = {}
        waits: dict[str, StepRecord] = {}  # the latest event or input wait of each step
        for record in history:
            if record.name:  # not the handler's own input waits
                latest[record.name] = record
                if record.kind in ("event", "input"):
                    waits[record.name] = record
        states = []
        for r in sorted(latest.values(), key=lambda r: r.position):
            state = step_state(r, pending if pending is not None and pending.name == r.name else None)
            wait = waits.get(r.name)
            if "wait" not in state and wait is not None and wait.position == r.position:
                # A step that raised wait_for_input and then completed: its wait is part of its story.
                info = wait_info(wait, None)
                if info is not None:
                    state["wait"] = info
            states.append(state)
        return states

    async def get_run_attempts(self, run_id: str) -> list[AttemptTrace]:
        """One trace per attempt that ended (failed and retried, or final), with its steps."""
        await self.store.ensure_ready()
        header = await self.store.read_header(run_id)
        if header is None:
            return []
        history, ended = await asyncio.gather(
            self.store.read_steps(run_id), self.store.read_attempts(run_id, header.attempt)
        )
        attempts: dict[int, AttemptTrace] = {}
        for r in ended:
            attempts[r.attempt] = AttemptTrace(
                attempt=r.attempt, status=r.status, started_at=r.started_at_ms, finished_at=r.finished_at_ms,
                output=decode(r.payload) if r.status == "succeeded" else None,
                error=decode(r.payload) if r.status != "succeeded" else None, steps=[],
            )
        if header.status == "succeeded" and header.attempt not in attempts:
            # A succeeded attempt has no attempt record: the run record describes it.
            out = await self.store.read_output(run_id)
            attempts[header.attempt] = AttemptTrace(
                attempt=header.attempt, status="succeeded", started_at=header.attempt_started_at_ms or 0,
                finished_at=header.finished_at_ms or 0, output=None if out is None else decode(out), error=None,
                steps=[],
            )
        for step in history:
            if step.name and step.attempt in attempts:
                attempts[step.attempt]["steps"].append(step_state(step))
        return [attempts[a] for a in sorted(attempts)]

    async def get_run_stream(self, run_id: str, *, limit: int | None = None) -> list[RunStreamRecord]:
        """The values a run streamed so far (oldest first)."""
        await self.store.ensure_ready()
        args: list[Any] = ["XRANGE", self.keys.stream(run_id), "-", "+"]
        if limit is not None:
            args += ["COUNT", check_read_args(limit, None)[0]]
        entries = await self.redis.execute(*args)
        return [r for _, fields in entries if (r := stream_record(fields)) is not None]

    async def read_stream(
        self,
        run_id: str,
        *,
        drain: bool = False,
        block_ms: int | None = None,
        limit: int | None = None,
        resumable: str | bool | None = None,
    ) -> RunStreamReader | None:
        """A live reader of the run's stream; None when the run does not exist. ``resumable`` is a
        chunk's cursor_id to start after it; True, False or None start at the beginning (every chunk
        carries its cursor_id either way). With ``drain`` it stops once caught up instead of waiting."""
        lim, block = check_read_args(limit, block_ms)
        if isinstance(resumable, bool):
            resumable = None
        elif resumable is not None and not isinstance(resumable, str):
            raise ConfigurationError(f"resumable must be a cursor_id string or a bool, got {resumable!r}")
        await self.store.ensure_ready()
        if await self.store.read_header(run_id) is None:
            return None
        return RunStreamReader(self.store, run_id, drain=drain, block_ms=block, limit=lim, after=resumable or "0-0")

    async def resume_run(self, run_id: str, input: Any = None, *, form: Any = None) -> RunHandle | None:
        """Answer a run waiting in wait_for_input: ``form`` is validated against the wait's schema;
        ``input``, when not None, replaces the run's input. Returns the handle, or None when the run
        is not waiting for input (a run already queued or running returns its handle)."""
        await self.store.ensure_ready()
        header = await self.store.read_header(run_id)
        if header is None or header.status in TERMINAL_STATUSES:
            return None
        if header.status in ("queued", "running"):
            return RunHandle(self, run_id)
        wait = await self.store.read_wait(run_id)
        if wait is None or wait.kind != "input":
            return None
        schema = decode(wait.info).get("schema") if wait.info else None
        if schema:
            issues = json_schema_issues(schema, form)
            if issues:
                raise validation_error(f"form for run {run_id}", issues)
        form_json = encode_payload(form, f"form for run {run_id}", self.max_payload_bytes)
        new_input = None if input is None else encode_payload(
            input, f"input of run {run_id}", self.max_payload_bytes
        )
        code, _ = await self.store.resume_input(run_id, header.queue, form_json, new_input)
        return RunHandle(self, run_id) if code is Code.OK else None

    async def wait_for_result(self, run_id: str, *, timeout_ms: int = DEFAULT_RESULT_TIMEOUT_MS) -> Any:
        """Wait until the run ends; woken by the run's completion message, never by polling."""
        await self.store.ensure_ready()
        if self._subscriber is None:
            self._subscriber = Subscriber(self.redis)
        return await wait_for_outcome(self.store, self._subscriber, self.keys.done_channel(run_id), run_id, timeout_ms)

    # --- operator actions (client/actions.py, failures.py, explain.py) -----------------------------
    async def retry_run(self, run_id: str) -> RunHandle:
        """Run a failed or canceled run again as its next attempt, keeping its recorded step outputs
        (failed and canceled steps run again), with a fresh attempt budget and through admission
        control. Raises RunNotFoundError, or InvalidRunStateError when the run has not ended that way."""
        return await self._actions.retry_run(run_id)

    async def replay_run(
        self, run_id: str, *, from_step: str | None = None, input: Any = UNSET, queue: str | None = None
    ) -> RunHandle:
        """Start a new run of an ended run's workflow, linked to it (``replayed_from``): the steps
        recorded before ``from_step`` return their recorded outputs without running (none are reused
        without ``from_step``); ``input`` and ``queue`` default to the original's."""
        return await self._actions.replay_run(run_id, from_step=from_step, input=input, queue=queue)

    async def retry_runs(self, query: BulkQuery, *, dry_run: bool = False, job_id: str | None = None) -> BulkResult:
        """Retry every failed or canceled run ``query`` matches, in batches; ``dry_run`` only counts
        them. Progress is saved after each batch: call again with the returned ``job_id`` to resume."""
        return await self._actions.retry_runs(query, dry_run=dry_run, job_id=job_id)

    async def cancel_runs(
        self, query: BulkQuery, *, dry_run: bool = False, reason: str = "", job_id: str | None = None
    ) -> BulkResult:
        """Cancel every queued, scheduled or running run ``query`` matches (like ``retry_runs``)."""
        return await self._actions.cancel_runs(query, dry_run=dry_run, reason=reason, job_id=job_id)

    async def list_failures(self, *, workflow: str | None = None, limit: int = 1000) -> list[FailureGroup]:
        """The newest ``limit`` failed runs grouped by workflow, category (exhausted, non_retriable,
        crashed, other), error, failing step and message shape, biggest groups first."""
        return await list_failures(self, workflow, limit)

    async def explain_run(self, run_id: str) -> RunExplanation:
        """Why the run is where it is right now: ``reason`` (a code), ``message`` (words), ``details``."""
        return await explain_run(self, run_id)

    async def close(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.close()
        await self.redis.close()


def create_client(
    *,
    app: str | None = None,
    redis: Any = None,
    url: str | None = None,
    prefix: str | None = None,
) -> RedflowClient:
    """A client for ``url`` (else ``REDIS_URL``, else redis://localhost:6379) and ``prefix``.

    ``redis`` may be a redis-py client: redflow reads its address and credentials and opens its own
    pipelined connections. Never starts a server.
    """
    if redis is not None:
        address = ServerAddress.from_redis_py(redis) if not isinstance(redis, RedisClient) else redis.address
    else:
        address = ServerAddress.from_url(url or os.environ.get("REDIS_URL") or DEFAULT_URL)
    return RedflowClient(
        RedisClient(address),
        prefix=prefix or default_prefix(),
        app=app or os.environ.get("REDFLOW_APP"),
    )


_default_client: RedflowClient | None = None


def get_default_client() -> RedflowClient:
    """The process-wide client; created from the environment on first use."""
    global _default_client
    if _default_client is None:
        _default_client = create_client()
    return _default_client


def set_default_client(client: RedflowClient | None) -> None:
    global _default_client
    _default_client = client
