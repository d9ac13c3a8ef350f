"""Starting runs: by definition, in batches, debounced, by name: a part of RedflowClient."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..durations import datetime_ms, duration_ms
from ..encoding import encode_payload
from ..errors import CanceledError, ConfigurationError, UnknownWorkflowError
from ..ids import new_run_id
from ..observability import tracing
from ..storage.codes import Code
from ..storage.scripts import check_queue_name
from ..types import IDEMPOTENCY_TTL_SEC
from ..workflow import WorkflowDefinition
from .handle import RunHandle

if TYPE_CHECKING:
    from .facade import RedflowClient


class Starts:
    """enqueue_definition, enqueue_many, run_by_name and emit_workflow; RedflowClient forwards its
    methods of those names here."""

    def __init__(self, client: RedflowClient) -> None:
        self._client = client
        self.store = client.store
        self.keys = client.keys

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
        limit = self._client.max_payload_bytes
        encoded = [encode_payload(definition.prepare_input(value), what, limit) for value in inputs]
        await self.store.ensure_ready()
        queue = check_queue_name(queue_override or definition.options.queue)
        run_at_ms = datetime_ms(run_at) if run_at is not None else 0
        partition = self.keys.partition
        ids = [new_run_id(partition) for _ in encoded]
        await asyncio.gather(*(
            self.store.enqueue_batch(ids[i:i + chunk_size], definition.name, queue, encoded[i:i + chunk_size],
                                     definition.max_attempts, run_at_ms)
            for i in range(0, len(ids), chunk_size)
        ))
        return [RunHandle(self._client, run_id) for run_id in ids]

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
        data = encode_payload(stored, f"input of workflow {definition.name!r}", self._client.max_payload_bytes)
        period = duration_ms(options.period, f"debounce period of workflow {definition.name!r}")
        timeout = 0 if options.timeout is None else duration_ms(options.timeout, "debounce timeout")
        await self.store.ensure_ready()
        code, run_id, _ = await self.store.debounce(
            new_run_id(self.keys.partition), definition.name, queue_override or definition.options.queue, data,
            definition.max_attempts, key.strip(), period, timeout, parent_run_id,
        )
        if code is Code.CANCELED:
            raise CanceledError(f"run {parent_run_id} was canceled: it cannot start a run of {definition.name!r}")
        return RunHandle(self._client, run_id)

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
        definition = self._client.registry_or_default().get(workflow_name)
        if definition is not None and definition.options.debounce is not None:
            return await self._enqueue_debounced(definition, input, queue_override, parent_run_id)
        if definition is not None:
            queue, max_attempts = definition.options.queue, definition.max_attempts
            input = definition.prepare_input(input)
        else:
            meta = await self._client._workflow_meta(workflow_name)
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
        check_queue_name(queue)  # a queue_override no script could name is refused before anything is written
        what = f"input of workflow {workflow!r}"
        data = encode_payload(input, what, self._client.max_payload_bytes)
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
        with tracing.producer(queue, workflow, run_id) as trace_context:
            code, bound_id, _ = await self.store.enqueue(
                run_id, workflow, queue, data, max_attempts, run_at_ms, idempotency_key, ttl, parent_run_id,
                trace_context,
            )
        if code is Code.CANCELED:
            raise CanceledError(f"run {parent_run_id} was canceled: it cannot start a run of {workflow!r}")
        return RunHandle(self._client, bound_id)
