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
from ..storage.handoffs import Outbox
from ..storage.scripts import check_queue_name
from ..types import IDEMPOTENCY_TTL_SEC
from ..workflow import WorkflowDefinition
from .handle import RunHandle

if TYPE_CHECKING:
    from ..storage.store import Store
    from .facade import RedflowClient


def _limited(meta: dict[str, Any]) -> bool:
    """Whether a workflow (by its published metadata) has a limit counted in one place."""
    return bool(meta.get("max_concurrency")) or bool(meta.get("admission"))


def _defines_limit(definition: WorkflowDefinition[Any]) -> bool:
    o = definition.options
    return bool(o.max_concurrency) or any(x is not None for x in (o.mutex, o.throttle, o.rate_limit))


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
            limited=_defines_limit(definition),
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
        # Without a limit the runs are dealt over the partitions, each partition's share in chunks.
        parts = [self.store] if _defines_limit(definition) else self.store.partitions
        shares = [list(range(len(encoded)))[i::len(parts)] for i in range(len(parts))]
        ids = [""] * len(encoded)
        batches = []
        for store, share in zip(parts, shares, strict=True):
            for i in share:
                ids[i] = new_run_id(store.keys.partition)
            for c in range(0, len(share), chunk_size):
                chunk = share[c:c + chunk_size]
                batches.append(store.enqueue_batch([ids[i] for i in chunk], definition.name, queue,
                                                   [encoded[i] for i in chunk], definition.max_attempts, run_at_ms))
        await asyncio.gather(*batches)
        return [RunHandle(self._client, run_id) for run_id in ids]

    def _placed(
        self, workflow: str, limited: bool, parent_run_id: str | None, affinity: str | None, *, elsewhere: bool = True,
    ) -> Store:
        """The store of the partition a new run goes to (storage/partitions.py says why). A limited
        child of a parent outside p0 goes to p0, started through its parent's outbox (``elsewhere``)."""
        store = self.store
        if len(store.partitions) == 1:
            return store
        if parent_run_id:
            parent = store.of(parent_run_id)
            if limited and parent is not store:
                if elsewhere:
                    return store
                raise ConfigurationError(
                    f"workflow {workflow!r} has a limit and a debounce, so its runs live in partition p0, and "
                    f"parent run {parent_run_id} lives in another partition: a debounced child cannot be "
                    "started across partitions (docs/scaling.md)"
                )
            return parent
        if limited:
            return store
        if affinity is not None:
            return store.at(store.placement.by_key(affinity))
        return store.at(store.placement.spread())

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
        queue = queue_override or definition.options.queue
        # The key's record (db:<workflow>:<key>) does not name the queue: neither does its placement.
        target = self._placed(definition.name, _defines_limit(definition), parent_run_id,
                              f"debounce:{len(definition.name)}:{definition.name}:{key.strip()}", elsewhere=False)
        code, run_id, _ = await self.store.debounce(
            new_run_id(target.keys.partition), definition.name, queue, data,
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
        limited = False
        if definition is not None:
            queue, max_attempts = definition.options.queue, definition.max_attempts
            input = definition.prepare_input(input)
            limited = _defines_limit(definition)
        else:
            meta = await self._client._workflow_meta(workflow_name)
            if meta is None:
                if queue_override is None:
                    raise UnknownWorkflowError(workflow_name)
                meta = {}
                limited = True  # not registered yet: it may turn out to have a limit, counted in p0
            else:
                limited = _limited(meta)
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
            limited=limited,
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
        limited: bool,
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
        affinity = None if idempotency_key is None else f"idempotency:{len(workflow)}:{workflow}:{idempotency_key}"
        target = self._placed(workflow, limited, parent_run_id, affinity)
        run_id = new_run_id(target.keys.partition)
        with tracing.producer(queue, workflow, run_id) as trace_context:
            if parent_run_id and self.store.of(parent_run_id) is not target:
                code, bound_id = await Outbox(self.store.of(parent_run_id)).start_child_elsewhere(
                    target, run_id, workflow, queue, data, max_attempts, run_at_ms, idempotency_key, ttl,
                    parent_run_id, trace_context, self._client.retention_ms,
                )
            else:
                code, bound_id, _ = await self.store.enqueue(
                    run_id, workflow, queue, data, max_attempts, run_at_ms, idempotency_key, ttl, parent_run_id,
                    trace_context,
                )
        if code is Code.CANCELED:
            raise CanceledError(f"run {parent_run_id} was canceled: it cannot start a run of {workflow!r}")
        return RunHandle(self._client, bound_id)
