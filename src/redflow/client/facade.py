"""RedflowClient: start runs, read their state, wait for results; and create_client."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from .._redis.client import RedisClient, ServerAddress
from .._redis.pubsub import Subscriber
from ..encoding import decode, max_payload_bytes
from ..errors import ConfigurationError
from ..registry import WorkflowRegistry, get_default_registry
from ..storage.event_store import EventStore
from ..storage.keys import DEFAULT_PARTITION, PartitionKeys
from ..storage.partitions import check_partitions, partitions_from_env
from ..storage.records import encode_record, workflow_meta
from ..storage.store import Store
from .actions import Actions
from .events import Events
from .handle import DEFAULT_RESULT_TIMEOUT_MS, RunHandle, wait_for_outcome
from .queries import Queries
from .runs import Runs
from .starts import Starts

DEFAULT_URL = "redis://localhost:6379"
DEFAULT_PREFIX = "redflow:v1"
DEFAULT_RETENTION_DAYS = 30.0
META_TTL_S = 30.0  # how long a client trusts a workflow's metadata read from a worker's registration


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


P = ParamSpec("P")
R = TypeVar("R")


def _forward(part: str, method: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[RedflowClient, P], R]:
    """A RedflowClient method that calls the method of the same name of one of its parts."""
    name = method.__name__

    @functools.wraps(method)
    def forwarded(self: RedflowClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound: Callable[P, R] = getattr(getattr(self, part), name)
        return bound(*args, **kwargs)

    return forwarded


class RedflowClient:
    """Access to one redflow deployment (a Redis server and a key prefix)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str = DEFAULT_PREFIX,
        app: str | None = None,
        run_history_retention_ms: int | None = None,
        registry: WorkflowRegistry | None = None,
        *,
        partitions: int | None = None,
    ) -> None:
        self.redis = redis
        self.app = app or ""
        self.keys = PartitionKeys(prefix, DEFAULT_PARTITION)
        requested = partitions_from_env() if partitions is None else check_partitions(partitions)
        self.store = Store(redis, self.keys, partitions=requested)
        self.registry = registry
        self.retention_ms = run_history_retention_ms or retention_ms_from_env()
        self.max_payload_bytes = max_payload_bytes()
        self._subscriber: Subscriber | None = None
        self.events = EventStore(self.store)
        self._remote_meta: dict[str, tuple[float, dict[str, Any]]] = {}  # name -> (read at, metadata)
        self._starts = Starts(self)
        self._runs = Runs(self)
        self._events_api = Events(self)
        self._queries = Queries(self)
        self._actions = Actions(self)

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    @property
    def partition_count(self) -> int:
        """The prefix's number of partitions (1 until the client has connected)."""
        return len(self.store.partitions)

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
        now_ms = await self.store.server_time_ms()
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

    async def _workflow_meta(self, name: str) -> dict[str, Any] | None:
        """A workflow's published metadata, read again after ``META_TTL_S`` (a deploy may change it:
        its queue, or a limit, which decides where its runs are placed)."""
        cached = self._remote_meta.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[0] < META_TTL_S:
            return cached[1]
        await self.store.ensure_ready()
        raw = await self.store.read_workflow(name)
        if raw is None:
            return None
        meta: dict[str, Any] = decode(raw)
        self._remote_meta[name] = (now, meta)
        return meta

    # --- reading ------------------------------------------------------------------------------------
    def make_run_handle(self, run_id: str) -> RunHandle:
        return RunHandle(self, run_id)

    async def wait_for_result(self, run_id: str, *, timeout_ms: int = DEFAULT_RESULT_TIMEOUT_MS) -> Any:
        """Wait until the run ends; woken by the run's completion message, never by polling."""
        await self.store.ensure_ready()
        if self._subscriber is None:
            self._subscriber = Subscriber(self.redis, route_key=self.keys.base)
        channel = self.store.of(run_id).keys.done_channel(run_id)
        return await wait_for_outcome(self.store, self._subscriber, channel, run_id, timeout_ms)

    # --- parts: starting runs, reading runs, events and cancellation, queries, operator actions -----
    enqueue_definition = _forward("_starts", Starts.enqueue_definition)
    enqueue_many = _forward("_starts", Starts.enqueue_many)
    run_by_name = _forward("_starts", Starts.run_by_name)
    emit_workflow = _forward("_starts", Starts.emit_workflow)

    get_run = _forward("_runs", Runs.get_run)
    get_run_steps = _forward("_runs", Runs.get_run_steps)
    get_run_attempts = _forward("_runs", Runs.get_run_attempts)
    get_run_stream = _forward("_runs", Runs.get_run_stream)
    read_stream = _forward("_runs", Runs.read_stream)
    resume_run = _forward("_runs", Runs.resume_run)

    emit_event = _forward("_events_api", Events.emit_event)
    emit_event_detailed = _forward("_events_api", Events.emit_event_detailed)
    get_event = _forward("_events_api", Events.get_event)
    list_events = _forward("_events_api", Events.list_events)
    list_event_definitions = _forward("_events_api", Events.list_event_definitions)
    list_cron_triggers = _forward("_events_api", Events.list_cron_triggers)
    list_workers = _forward("_events_api", Events.list_workers)
    cancel_run = _forward("_events_api", Events.cancel_run)
    cancel_descendants = _forward("_events_api", Events.cancel_descendants)

    index_page = _forward("_queries", Queries.index_page)
    list_runs = _forward("_queries", Queries.list_runs)
    search_runs = _forward("_queries", Queries.search_runs)
    list_workflows = _forward("_queries", Queries.list_workflows)
    get_workflow_meta = _forward("_queries", Queries.get_workflow_meta)
    list_workflows_meta = _forward("_queries", Queries.list_workflows_meta)
    get_stats = _forward("_queries", Queries.get_stats)
    cleanup_expired_runs_now = _forward("_queries", Queries.cleanup_expired_runs_now)
    cleanup_expired_events_now = _forward("_queries", Queries.cleanup_expired_events_now)
    reset_runs = _forward("_queries", Queries.reset_runs)
    reset_state = _forward("_queries", Queries.reset_state)

    retry_run = _forward("_actions", Actions.retry_run)
    replay_run = _forward("_actions", Actions.replay_run)
    retry_runs = _forward("_actions", Actions.retry_runs)
    cancel_runs = _forward("_actions", Actions.cancel_runs)
    list_failures = _forward("_actions", Actions.list_failures)
    explain_run = _forward("_actions", Actions.explain_run)

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
    partitions: int | None = None,
) -> RedflowClient:
    """A client for ``url`` (else ``REDIS_URL``, else redis://localhost:6379) and ``prefix``.

    ``redis`` may be a redis-py client: redflow reads its address and credentials and opens its own
    pipelined connections. Never starts a server. ``partitions`` (else ``REDFLOW_PARTITIONS``) is
    the partition count of a prefix this client creates; for an existing prefix it must match the
    recorded count, and when unset the recorded count is adopted (docs/scaling.md).
    """
    if redis is not None:
        address = ServerAddress.from_redis_py(redis) if not isinstance(redis, RedisClient) else redis.address
    else:
        address = ServerAddress.from_url(url or os.environ.get("REDIS_URL") or DEFAULT_URL)
    return RedflowClient(
        RedisClient(address),
        prefix=prefix or default_prefix(),
        app=app or os.environ.get("REDFLOW_APP"),
        partitions=partitions,
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
