"""Typed wrappers of the Lua transitions and the reads: the only place that orders KEYS and ARGV."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

from .._redis.client import RedisClient
from .._redis.connection import Connection
from .._redis.errors import ConnectionClosedError
from ..errors import StorageLayoutError
from .batches import Coalescer, FinishRequest, StepRequest
from .codes import Code
from .index import RunIndex
from .keys import (
    CLUSTER_PARTITIONS,
    PARTITIONED_VERSION,
    STORAGE_VERSION,
    PartitionKeys,
    partition_index,
    partition_name,
    tag,
)
from .partitions import Placement, agree
from .records import (
    AttemptRecord,
    ClaimedRun,
    RunHeader,
    StepRecord,
    WaitRecord,
    decode_attempt,
    decode_header,
    decode_steps,
    decode_wait,
    parse_claim,
)
from .scripts import ScriptRunner

log = logging.getLogger("redflow.storage")

UNCLAIMABLE_LOG_EVERY_S = 60.0  # a run a claim cannot take is logged at most this often (see Store.claim)

BULK_JOB_TTL_S = 7 * 86_400  # how long a bulk action can be resumed
EXPLAIN_SCAN = 10_000  # how far explain_run looks for a run in its ready list


class Heartbeat(NamedTuple):
    state: int  # 0 no entry (new, or reaped), 1 renewed, 2 lapsed but not reaped
    leader: str  # "<worker id>:<epoch>" or ""
    lapsed_workers: int
    server_ms: int
    cron_version: int
    next_event_due_ms: int  # -1 when no delayed event is pending
    cascades_pending: int  # cancel cascades a client left half done


_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for store in list(_stores):
        store._ready = None  # a future of the parent's event loop
        store._is_ready = False
        store._finishes.reset()
        store._steps.reset()


os.register_at_fork(after_in_child=_forget_after_fork)


P = ParamSpec("P")
R = TypeVar("R")


def _routed(
    method: Callable[Concatenate[Store, str, P], Awaitable[R]],
) -> Callable[Concatenate[Store, str, P], Awaitable[R]]:
    """A per-run method, run by the store of the partition its run id names."""

    @functools.wraps(method)
    async def routed(self: Store, run_id: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await method(self.of(run_id), run_id, *args, **kwargs)

    return routed


class Store:
    """The scripts and reads of one partition. The store of ``p0`` (the home store, the one clients
    hold) also knows the prefix's other partitions once ready: per-run methods called on it run on
    the store of the run's partition, and ``partitions`` lists them all for partition-wide work."""

    def __init__(
        self, redis: RedisClient, keys: PartitionKeys, *, partitions: int | None = None, home: Store | None = None,
    ) -> None:
        _stores.add(self)
        self.redis = redis
        self.keys = keys
        self.home = home if home is not None else self
        self.requested_partitions = partitions
        self.partitions: list[Store] = [self]  # filled in by the home store's preparation
        self._script_nodes: set[int] | None = None  # a sibling's: the nodes its partitions loaded scripts on
        self.placement = Placement(1)
        self._layout = STORAGE_VERSION  # the layout name found in this partition
        self.scripts = ScriptRunner(redis, keys)
        self.index = RunIndex(redis, keys)
        self._finishes: Coalescer[FinishRequest, tuple[Code, str]] = Coalescer(
            lambda r: self.finish_one(r), lambda rs: self._finish_batch(rs), lambda r: (r.worker_id, r.retention_ms),
            lambda r: len(r.payload), lambda r: r.run_id,
        )
        self._steps: Coalescer[StepRequest, Code] = Coalescer(
            lambda r: self.record_step_one(r), lambda rs: self.record_steps(rs), lambda r: 0, lambda r: len(r.line),
            lambda r: r.run_id,
        )
        self._ready: asyncio.Future[None] | None = None
        self._is_ready = False
        self._unclaimable_logged: dict[str, float] = {}  # run id -> when a claim last logged it

    async def ensure_ready(self) -> None:
        """Check the storage layout and load the scripts, once per store."""
        if self._is_ready:
            return
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._prepare())
        try:
            await asyncio.shield(self._ready)
        except BaseException:
            self._ready = None
            raise
        self._is_ready = True

    def of(self, run_id: str) -> Store:
        """The store of the partition ``run_id`` names (the home store for an id naming none)."""
        parts = self.home.partitions
        if len(parts) == 1:
            return parts[0]
        index = partition_index(run_id)
        return parts[index] if index is not None and index < len(parts) else parts[0]

    def at(self, index: int) -> Store:
        return self.home.partitions[index]

    async def _prepare(self) -> None:
        if self.home is not self:
            await self._prepare_layout(None)
            return
        recorded = await self._prepare_layout(self.requested_partitions)
        count = agree(self.keys.prefix, recorded, self.requested_partitions)
        if (count > 1) != (self._layout == PARTITIONED_VERSION):
            raise StorageLayoutError(
                f"the key prefix {self.keys.prefix!r} records {count} partition(s) but storage layout "
                f"{self._layout!r}: its metadata is inconsistent; use another prefix"
            )
        if count > 1:
            siblings = [Store(self.redis, PartitionKeys(self.keys.prefix, partition_name(i)), home=self)
                        for i in range(1, count)]
            loaded = {id(await self.redis.node_for(self.keys.base))}  # p0's node has them (above)
            for sibling in siblings:
                sibling._script_nodes = loaded
            await asyncio.gather(*(s.ensure_ready() for s in siblings))
            self.partitions = [self, *siblings]
            self.placement = Placement(count)

    async def _prepare_layout(self, requested: int | None) -> bytes | None:
        """Check (or claim) this partition's layout version and load the scripts; in ``p0`` also
        record the partition count of a new prefix, and return the recorded count. A prefix with
        several partitions has its own layout name, so a redflow that predates partitions refuses
        it instead of reading one partition of it."""
        k = self.keys
        home = self.home is self
        version = await self.redis.execute("GET", k.version)
        if version is None:
            # Only a prefix not claimed yet is checked for other layouts' markers. One EXISTS per
            # key: on a cluster they live in other slots, on masters that may be down later on.
            previous, *foreign = await asyncio.gather(
                self.redis.execute("GET", k.previous_version()),
                *(self.redis.execute("EXISTS", marker) for marker in k.foreign_markers()),
            )
            if previous is not None:
                raise StorageLayoutError(
                    f"the key prefix {k.prefix!r} holds storage layout {previous.decode()!r} (its keys "
                    f"have the hash tag {{p0}}); this version of redflow uses {STORAGE_VERSION!r}, whose "
                    "tag includes the prefix. Let its runs finish and use a new prefix (REDFLOW_PREFIX)"
                )
            if any(foreign):
                raise StorageLayoutError(
                    f"the key prefix {k.prefix!r} holds data of another storage layout (for example "
                    "from redflow 0.1.x); use another prefix (REDFLOW_PREFIX) or remove that data"
                )
            if home:  # the count first: a version without a count means a prefix made before counts
                default = CLUSTER_PARTITIONS if self.redis.is_cluster else 1  # known after the first reply
                await self.redis.execute("SET", k.partitions, requested or default, "NX")
                count = int(await self.redis.execute("GET", k.partitions))
                layout = PARTITIONED_VERSION if count > 1 else STORAGE_VERSION
            else:
                layout = self.home._layout
            await self.redis.execute("SET", k.version, layout, "NX")
            version = await self.redis.execute("GET", k.version)
        if version.decode() not in (STORAGE_VERSION, PARTITIONED_VERSION):
            raise StorageLayoutError(
                f"the key prefix {k.prefix!r} holds storage layout {version.decode()!r}; this version "
                f"of redflow uses {STORAGE_VERSION!r}. Use another prefix or migrate the data"
            )
        self._layout = version.decode()
        recorded: bytes | None = await self.redis.execute("GET", k.partitions) if home else None
        await self.scripts.load_all(self._script_nodes)
        return recorded

    # --- runs ------------------------------------------------------------------------------------
    @_routed
    async def enqueue(
        self,
        run_id: str,
        workflow: str,
        queue: str,
        input_json: bytes,
        max_attempts: int,
        run_at_ms: int,
        idempotency_key: str | None,
        idempotency_ttl_s: int,
        parent_run_id: str | None,
        trace_context: str = "",
    ) -> tuple[Code, str, str]:
        """Create a run: (CREATED | EXISTING, run id, status), or (CANCELED, '', '') when its parent
        was canceled."""
        k = self.keys
        ttl = idempotency_ttl_s if idempotency_key is not None else 0
        reply = await self.scripts.run(
            "enqueue",
            (run_id, workflow, queue, input_json, max_attempts, run_at_ms, ttl, parent_run_id or "",
             trace_context, idempotency_key or ""),
            ready=k.ready(queue), scheduled=k.scheduled(queue), bell=k.bell(queue),
            # Read only when a TTL is given; otherwise a key of the same slot stands in.
            idempotency=k.idempotency(workflow, idempotency_key or ""),
        )
        if reply[0] == Code.CANCELED:
            return Code.CANCELED, "", ""
        return Code(reply[0]), reply[1].decode(), reply[2].decode()

    async def enqueue_batch(
        self, run_ids: list[str], workflow: str, queue: str, inputs: list[bytes], max_attempts: int, run_at_ms: int
    ) -> int:
        k = self.keys
        reply = await self.scripts.run(
            "enqueue_batch", (workflow, queue, max_attempts, len(run_ids), run_at_ms, *run_ids, *inputs),
            ready=k.ready(queue), scheduled=k.scheduled(queue), bell=k.bell(queue),
        )
        return int(reply[1])

    @_routed
    async def debounce(
        self, run_id: str, workflow: str, queue: str, input_json: bytes, max_attempts: int, key: str,
        period_ms: int, timeout_ms: int, parent_run_id: str | None,
    ) -> tuple[Code, str, str]:
        k = self.keys
        reply = await self.scripts.run(
            "debounce", (run_id, workflow, queue, input_json, max_attempts, period_ms, timeout_ms, parent_run_id or ""),
            ready=k.ready(queue), scheduled=k.scheduled(queue), bell=k.bell(queue), debounce=k.debounce(workflow, key),
        )
        if reply[0] == Code.CANCELED:
            return Code.CANCELED, "", ""
        return Code(reply[0]), reply[1].decode(), reply[2].decode()

    async def claim(
        self, worker_id: str, queues: Sequence[str], max_runs: int, promote: int
    ) -> tuple[Code, int, list[ClaimedRun]]:
        reply = await self.scripts.run(
            "claim", (worker_id, max_runs, promote, os.urandom(8).hex()), queues=queues,
            owned=self.keys.owned(worker_id),
        )
        code = Code(reply[0])
        if code is not Code.OK:
            return code, -1, []
        next_due, runs, unclaimable = parse_claim(reply)
        if unclaimable:
            self._log_unclaimable(unclaimable)
        return code, next_due, runs

    def _log_unclaimable(self, unclaimable: list[tuple[str, str]]) -> None:
        """One line for the runs a claim put back that were not logged in the last minute: a poison run
        stays at the head of a moving queue (new runs go behind it), so every claim pops it again."""
        now = asyncio.get_running_loop().time()
        logged = self._unclaimable_logged
        if len(logged) > 10_000:
            for run_id in [r for r, at in logged.items() if now - at >= UNCLAIMABLE_LOG_EVERY_S]:
                del logged[run_id]
        fresh = [(r, e) for r, e in unclaimable
                 if now - logged.get(r, -UNCLAIMABLE_LOG_EVERY_S) >= UNCLAIMABLE_LOG_EVERY_S]
        if not fresh:
            return
        for run_id, _ in fresh:
            logged[run_id] = now
        shown = "; ".join(f"run {r}: {e}" for r, e in fresh[:5])
        more = f" (and {len(fresh) - 5} more)" if len(fresh) > 5 else ""
        log.error("%d run(s) could not be claimed and were put back in their queue (ready or scheduled), each "
                  "logged at most once a minute: %s%s; a run's header or a key of its partition is damaged",
                  len(fresh), shown, more)

    @_routed
    async def record_step(self, run_id: str, token: bytes, line: bytes) -> Code:
        """Append a step record if ``token`` is the run's current one and it is running. Records
        written in the same loop tick leave in one script call (see :mod:`.batches`)."""
        return await self._steps.submit(StepRequest(run_id, token, line))

    async def record_step_one(self, r: StepRequest) -> Code:
        reply = await self.scripts.run("step", (r.run_id, r.token, r.line))
        return Code(reply[0])

    async def record_steps(self, requests: Sequence[StepRequest]) -> list[Code]:
        """``step_many.lua``: a code per record."""
        args: list[Any] = []
        for r in requests:
            args += (r.run_id, r.token, r.line)
        reply = await self.scripts.run("step_many", args)
        return [Code(c) for c in reply[1:]]

    def _queues(self, queue: str) -> list[str]:
        """The queues a transition of a run on ``queue`` is given up front; others it asks for."""
        return [queue]

    @_routed
    async def finish(
        self, run_id: str, token: bytes, worker_id: str, status: str, payload: bytes, hook: bool,
        retention_ms: int, queue: str,
    ) -> tuple[Code, str]:
        """End a running run; returns the final status (canceled when cancellation was requested).
        Finishes called in the same loop tick leave in one script call (see :mod:`.batches`)."""
        await self._steps.settled(run_id)
        return await self._finishes.submit(
            FinishRequest(run_id, token, worker_id, status, payload, hook, retention_ms, queue)
        )

    async def finish_one(self, r: FinishRequest) -> tuple[Code, str]:
        k = self.keys
        reply = await self.scripts.run(
            "finish",
            (r.run_id, r.token, r.status, r.payload, 1 if r.hook else 0, r.retention_ms, k.done_channel(r.run_id)),
            queues=self._queues(r.queue), owned=k.owned(r.worker_id), stream=k.stream(r.run_id),
        )
        code = Code(reply[0])
        return code, reply[1].decode() if code is Code.OK else ""

    async def finish_many(self, requests: Sequence[FinishRequest]) -> list[tuple[Code, str]]:
        """``finish_many.lua`` for runs of one worker and one retention: a (code, detail) per run."""
        k = self.keys
        first = requests[0]
        queues = list(dict.fromkeys(q for r in requests for q in self._queues(r.queue)))
        script = self.scripts.scripts["finish_many"]
        keys = [*self.scripts.key_list(script, {"owned": k.owned(first.worker_id)}, queues),
                *(k.stream(r.run_id) for r in requests)]
        args: list[Any] = [first.retention_ms, k.done_channel_prefix(), "\n".join(queues)]
        for r in requests:
            args += (r.run_id, r.token, r.status, r.payload, 1 if r.hook else 0)
        reply = await self.scripts.call("finish_many", keys, args)
        return [(Code(reply[i]), reply[i + 1].decode()) for i in range(1, len(reply), 2)]

    async def _finish_batch(self, requests: list[FinishRequest]) -> list[tuple[Code, str] | None]:
        """A reply per run for the batcher; None for a run to finish alone (it needs more queues)."""
        return [None if code is Code.NEED_QUEUES else (code, detail if code is Code.OK else "")
                for code, detail in await self.finish_many(requests)]

    @_routed
    async def hook_done(self, run_id: str, token: bytes, worker_id: str) -> Code:
        reply = await self.scripts.run("hook_done", (run_id, token), owned=self.keys.owned(worker_id))
        return Code(reply[0])

    @_routed
    async def retry(
        self, run_id: str, token: bytes, worker_id: str, queue: str, delay_ms: int, error: bytes,
        keep_attempt: bool = False,
    ) -> Code:
        await self._steps.settled(run_id)
        reply = await self.scripts.run(
            "retry", (run_id, token, delay_ms, error, 1 if keep_attempt else 0),
            queues=self._queues(queue), owned=self.keys.owned(worker_id),
        )
        return Code(reply[0])

    @_routed
    async def suspend(
        self,
        run_id: str,
        token: bytes,
        worker_id: str,
        queue: str,
        step: str,
        position: int,
        kind: str,
        *,
        delay_ms: int = -1,
        due_ms: int = 0,
        waiter_member: str = "",
        child_id: str = "",
        buffer_prefix: str = "",
        consumed_events: tuple[str, ...] = (),
        info: bytes = b"",
    ) -> tuple[Code, str, bytes]:
        """Start a durable wait: (OK, '', b'') when suspended, (RESOLVED, resolution, output) when it
        was satisfied at once, or (STALE | CANCELED | WRONG_STATUS, '', b'')."""
        await self._steps.settled(run_id)
        reply = await self.scripts.run(
            "suspend",
            (run_id, token, step, position, kind, delay_ms, due_ms, waiter_member, child_id, buffer_prefix, info,
             *consumed_events),
            queues=self._queues(queue), owned=self.keys.owned(worker_id),
        )
        code = Code(reply[0])
        if code is Code.RESOLVED:
            return code, reply[1].decode(), reply[2]
        return code, "", b""

    @_routed
    async def cancel(self, run_id: str, reason: str, retention_ms: int) -> tuple[Code, str]:
        """Cancel one run: (OK, 'canceled' | 'requested'), (TERMINAL, status) or (NOT_FOUND, '')."""
        k = self.keys
        header = await self.read_header(run_id)
        if header is None:
            return Code.NOT_FOUND, ""
        reply = await self.scripts.run(
            "cancel", (run_id, reason, retention_ms, k.done_channel(run_id), k.control_channel_prefix()),
            queues=self._queues(header.queue),
        )
        code = Code(reply[0])
        return code, reply[1].decode() if len(reply) > 1 else ""

    async def cascade_pending(self, limit: int) -> list[str]:
        """Canceled runs whose descendants are still being canceled, oldest first."""
        ids = await self.redis.execute("ZRANGE", self.keys.cascade, 0, limit - 1)
        return [i.decode() for i in ids]

    @_routed
    async def cascade_done(self, run_id: str) -> None:
        await self.redis.execute("ZREM", self.keys.cascade, run_id)

    @_routed
    async def admit(
        self, run_id: str, token: bytes, worker_id: str, queue: str, workflow: str,
        throttle: tuple[str, int, int] | None, rate: tuple[str, int, int] | None, hook: bool, retention_ms: int,
        mutex_key: str | None = None,
    ) -> tuple[Code, Any]:
        """Admission of a first start; throttle and rate are (key, limit, period ms)."""
        k = self.keys
        placeholder = k.throttle(workflow, "")
        reply = await self.scripts.run(
            "admit",
            (run_id, token, throttle[1] if throttle else 0, throttle[2] if throttle else 0,
             rate[1] if rate else 0, rate[2] if rate else 0, 1 if hook else 0, retention_ms, k.done_channel(run_id),
             tag(mutex_key) if mutex_key is not None else "",  # one mutex per key within a prefix
             tag(workflow) + tag(throttle[0]) if throttle else ""),
            queues=self._queues(queue), owned=k.owned(worker_id),
            throttle_counter=k.throttle(workflow, throttle[0]) if throttle else placeholder,
            rate_counter=k.rate_limit(workflow, rate[0]) if rate else placeholder,
        )
        code = Code(reply[0])
        if code is Code.OK:
            return code, decode_header(reply[1])
        return code, int(reply[1]) if len(reply) > 1 else None

    @_routed
    async def stream_write(
        self, run_id: str, token: bytes, attempt: int, value: bytes, retention_ms: int, max_len: int
    ) -> tuple[Code, str, int]:
        reply = await self.scripts.run(
            "stream_write", (run_id, token, attempt, value, retention_ms, max_len), stream=self.keys.stream(run_id)
        )
        code = Code(reply[0])
        if code is not Code.OK:
            return code, "", 0
        return code, reply[1].decode(), int(reply[2])

    @_routed
    async def read_wait(self, run_id: str) -> WaitRecord | None:
        raw = await self.redis.execute("HGET", self.keys.waits, run_id)
        return None if raw is None else decode_wait(raw)

    @_routed
    async def resume_input(self, run_id: str, queue: str, form: bytes, new_input: bytes | None) -> tuple[Code, str]:
        k = self.keys
        reply = await self.scripts.run(
            "resume_input", (run_id, form, new_input or b""),
            ready=k.ready(queue), scheduled=k.scheduled(queue), bell=k.bell(queue),
        )
        return Code(reply[0]), reply[1].decode() if len(reply) > 1 else ""

    @_routed
    async def children_of(self, run_id: str) -> list[str]:
        """Runs started by steps of ``run_id`` (the parent-to-child index)."""
        start = f"[{run_id}:".encode()
        members = await self.redis.execute("ZRANGEBYLEX", self.keys.children, start, start + b"\xff")
        return [m.decode().split(":", 1)[1] for m in members]

    @_routed
    async def release(self, run_id: str, token: bytes, worker_id: str, queue: str, retention_ms: int) -> Code:
        await self._steps.settled(run_id)
        k = self.keys
        reply = await self.scripts.run(
            "release", (run_id, token, retention_ms, k.done_channel(run_id)),
            queues=self._queues(queue), owned=k.owned(worker_id),
        )
        return Code(reply[0])

    async def owned_runs(self, worker_id: str) -> dict[str, bytes | None]:
        """The runs the server says ``worker_id`` holds, each with its current fencing token."""
        ids = await self.redis.execute("SMEMBERS", self.keys.owned(worker_id))
        if not ids:
            return {}
        tokens = await self.redis.execute("HMGET", self.keys.leases, *ids)
        return {i.decode(): t for i, t in zip(ids, tokens, strict=True)}

    async def lease_tokens(self, run_ids: Sequence[str]) -> list[bytes | None]:
        if not run_ids:
            return []
        tokens: list[bytes | None] = await self.redis.execute("HMGET", self.keys.leases, *run_ids)
        return tokens

    async def forget_owned(self, worker_id: str, run_id: str) -> None:
        """Drop an owned-set entry that has no lease (nothing to hand back: the run left this worker)."""
        await self.redis.execute("SREM", self.keys.owned(worker_id), run_id)

    # --- workers and leadership ---------------------------------------------------------------------
    async def heartbeat(
        self, worker_id: str, lease_ms: int, leader_lease_ms: int, stand: bool
    ) -> Heartbeat:
        reply = await self.scripts.run("heartbeat", (worker_id, lease_ms, leader_lease_ms, 1 if stand else 0))
        return Heartbeat(
            int(reply[1]), reply[2].decode(), int(reply[3]), int(reply[4]), int(reply[5]), int(reply[6]),
            int(reply[7]),
        )

    async def resign(self, worker_id: str) -> None:
        await self.scripts.run("resign", (worker_id,), owned=self.keys.owned(worker_id))

    async def lapsed_workers(self, limit: int) -> list[str]:
        k = self.keys
        now_ms = await self.server_time_ms()
        ids = await self.redis.execute("ZRANGEBYSCORE", k.workers, "-inf", f"({now_ms}", "LIMIT", 0, limit)
        return [i.decode() for i in ids]

    async def reap(
        self, leader: str, worker_id: str, max_lapses: int, retention_ms: int, batch: int,
        on_run: Callable[[str, str, RunHeader | None], None] | None = None,
    ) -> tuple[Code, int, int, int]:
        """Take back the runs of a lapsed worker: (code, taken back, failed as crashed, left).
        ``on_run(run id, outcome, header before)`` is called for each run handled."""
        k = self.keys
        owned_key = k.owned(worker_id)
        ids = [i.decode() for i in await self.redis.execute("SRANDMEMBER", owned_key, batch)]
        headers = await self.redis.execute("HMGET", k.runs, *ids) if ids else []
        before = {i: decode_header(h) for i, h in zip(ids, headers, strict=True) if h is not None}
        queue_of = {i: h.queue for i, h in before.items()}

        async def one(run_id: str) -> Any:
            return await self.scripts.run(
                "reap", (leader, worker_id, max_lapses, retention_ms, k.done_channel_prefix(), run_id),
                queues=[queue_of[run_id]] if run_id in queue_of else [], owned=owned_key,
            )

        replies = await asyncio.gather(*(one(i) for i in ids)) if ids else [await one("")]
        taken = crashed = 0
        left = 0
        for run_id, reply in zip(ids or [""], replies, strict=True):
            code = Code(reply[0])
            if code is not Code.OK:
                return code, taken, crashed, 0
            outcome = reply[1].decode()
            if on_run is not None and outcome != "gone":
                on_run(run_id, outcome, before.get(run_id))
            taken += outcome != "gone"
            crashed += outcome == "crashed"
            left = int(reply[2])
        return Code.OK, taken, crashed, left

    async def cleanup(self, limit: int, cutoff_ms: int = 0, what: str = "both") -> tuple[int, int]:
        """Delete runs and events past retention: (runs deleted, events deleted)."""
        reply = await self.scripts.run("cleanup", (limit, cutoff_ms, what))
        return int(reply[1]), int(reply[2])

    # --- operator actions -------------------------------------------------------------------------
    @_routed
    async def requeue(self, run_id: str, header: RunHeader, token: str = "") -> tuple[Code, str]:
        """Send a failed or canceled run back to its queue as its next attempt (see requeue.lua):
        (code, detail)."""
        k = self.keys
        reply = await self.scripts.run(
            "requeue", (run_id, token), ready=k.ready(header.queue), bell=k.bell(header.queue),
            idempotency=k.idempotency(header.workflow, header.idempotency_key or ""),
        )
        return Code(reply[0]), reply[1].decode() if len(reply) > 1 else ""

    @_routed
    async def replay(
        self, run_id: str, source_id: str, workflow: str, queue: str, input_json: bytes, max_attempts: int,
        lines: Sequence[bytes],
    ) -> tuple[Code, str]:
        """Create ``run_id`` replaying ended run ``source_id`` with ``lines`` of its history copied:
        (CREATED | EXISTING, run id), (WRONG_STATUS, status) or (NOT_FOUND, '')."""
        k = self.keys
        reply = await self.scripts.run(
            "replay", (run_id, workflow, queue, input_json, max_attempts, source_id, *lines),
            ready=k.ready(queue), scheduled=k.scheduled(queue), bell=k.bell(queue),
        )
        return Code(reply[0]), reply[1].decode() if len(reply) > 1 else ""

    async def read_bulk_job(self, job_id: str) -> bytes | None:
        raw: bytes | None = await self.redis.execute("GET", self.keys.bulk_job(job_id))
        return raw

    async def write_bulk_job(self, job_id: str, record: bytes) -> None:
        await self.redis.execute("SET", self.keys.bulk_job(job_id), record, "EX", BULK_JOB_TTL_S)

    @_routed
    async def explain_facts(self, run_id: str, h: RunHeader) -> dict[str, Any]:
        """What explain_run needs beyond the header, in one pipelined batch: server time, the run's
        place in its ready list, its workflow's running count and limit, the holder of its mutex,
        its worker's liveness deadline, its wait and its error."""
        k, redis = self.keys, self.redis
        server, pos, length, running, limit, holder, deadline, wait, error = await asyncio.gather(
            redis.execute_at(k.base, "TIME"),
            # From the claim end, bounded: a page about one run never scans a long queue.
            redis.execute("LPOS", k.ready(h.queue), run_id, "RANK", -1, "MAXLEN", EXPLAIN_SCAN),
            redis.execute("LLEN", k.ready(h.queue)),
            redis.execute("HGET", k.running, h.workflow),
            redis.execute("HGET", k.limits, h.workflow),
            redis.execute("HGET", k.mutexes, h.mutex_field) if h.mutex_field else _none(),
            redis.execute("ZSCORE", k.workers, h.owner) if h.owner else _none(),
            self.read_wait(run_id),
            redis.execute("HGET", k.errors, run_id),
        )
        return {
            "now_ms": int(server[0]) * 1000 + int(server[1]) // 1000,
            # runs claimed before it; None when it is not among the EXPLAIN_SCAN next to be claimed
            "ahead": None if pos is None else int(length) - 1 - int(pos),
            "running": int(running or 0), "limit": None if limit is None else int(limit),
            "mutex_holder": None if holder is None else holder.decode(),
            "owner_deadline_ms": None if deadline is None else int(float(deadline)),
            "wait": wait, "error": error,
        }

    @_routed
    async def read_history_lines(self, run_id: str) -> list[bytes]:
        """The run's history as stored, one JSON line each (newline included)."""
        reply = await self.scripts.run("history", (run_id,))
        return [line + b"\n" for line in (reply[1] or b"").split(b"\n") if line]

    # --- server and streams ---------------------------------------------------------------------------
    async def server_time_ms(self) -> int:
        sec, usec = await self.redis.execute_at(self.keys.base, "TIME")
        return int(sec) * 1000 + int(usec) // 1000

    async def maxmemory_policy(self) -> str | None:
        reply = await self.redis.execute_at(self.keys.base, "CONFIG", "GET", "maxmemory-policy")
        return reply[1].decode() if len(reply) >= 2 else None

    @_routed
    async def stream_range(self, run_id: str, count: int | None) -> list[tuple[bytes, list[bytes]]]:
        """The entries of a run's stream, oldest first (at most ``count``)."""
        args: list[Any] = ["XRANGE", self.keys.stream(run_id), "-", "+"]
        if count is not None:
            args += ["COUNT", count]
        entries: list[tuple[bytes, list[bytes]]] = await self.redis.execute(*args)
        return entries

    @_routed
    async def stream_read(
        self, run_id: str, after: str, count: int, block_ms: int | None = None, conn: Connection | None = None
    ) -> list[tuple[bytes, list[bytes]]]:
        """Entries of a run's stream after ``after``; with ``block_ms``, waits that long on ``conn``
        (a connection of the reader's own, see ``blocking_connection``) for the first one."""
        key = self.keys.stream(run_id)
        if block_ms is None or conn is None:
            reply = await self.redis.execute("XREAD", "COUNT", count, "STREAMS", key, after)
        else:
            reply = await conn.execute("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", key, after)
        return reply[0][1] if reply else []

    @_routed
    async def blocking_connection(self, run_id: str) -> Connection:
        """A connection for blocking reads of ``run_id``'s stream (to the node holding it), closed
        with the client."""
        node = await self.redis.node_for(self.keys.stream(run_id))
        try:
            return await node.dedicated()
        except ConnectionClosedError:
            self.redis.routes_stale()
            raise

    # --- reads ---------------------------------------------------------------------------------------
    @_routed
    async def read_header(self, run_id: str) -> RunHeader | None:
        raw = await self.redis.execute("HGET", self.keys.runs, run_id)
        return None if raw is None else decode_header(raw)

    async def read_headers(self, run_ids: Sequence[str]) -> list[RunHeader | None]:
        if not run_ids:
            return []
        if len(self.home.partitions) > 1:
            return await self.per_partition(run_ids, Store._read_headers)
        return await self._read_headers(run_ids)

    async def per_partition(
        self, run_ids: Sequence[str], read: Callable[[Store, Sequence[str]], Awaitable[Sequence[R]]],
    ) -> list[R]:
        """``read`` of each partition's share of ``run_ids`` (at once), answers in ``run_ids``' order."""
        groups: dict[Store, list[int]] = {}
        for i, run_id in enumerate(run_ids):
            groups.setdefault(self.of(run_id), []).append(i)
        answers = await asyncio.gather(*(read(store, [run_ids[i] for i in idx]) for store, idx in groups.items()))
        out: list[Any] = [None] * len(run_ids)
        for idx, answer in zip(groups.values(), answers, strict=True):
            for i, value in zip(idx, answer, strict=True):
                out[i] = value
        return out

    async def headers_and_errors(self, run_ids: Sequence[str]) -> list[tuple[RunHeader | None, bytes | None]]:
        """(header, error) of each run, for listings."""
        async def read(store: Store, ids: Sequence[str]) -> list[tuple[RunHeader | None, bytes | None]]:
            return await store.index.headers_and_errors(list(ids))

        return await self.per_partition(run_ids, read)

    async def _read_headers(self, run_ids: Sequence[str]) -> list[RunHeader | None]:
        raws = await self.redis.execute("HMGET", self.keys.runs, *run_ids)
        return [None if raw is None else decode_header(raw) for raw in raws]

    @_routed
    async def read_run(self, run_id: str) -> tuple[RunHeader, bytes | None, bytes | None, bytes | None] | None:
        """(header, input, output, error) of a run, read in one pipelined batch."""
        k = self.keys
        raw, inp, out, err = await asyncio.gather(
            self.redis.execute("HGET", k.runs, run_id),
            self.redis.execute("HGET", k.inputs, run_id),
            self.redis.execute("HGET", k.results, run_id),
            self.redis.execute("HGET", k.errors, run_id),
        )
        if raw is None:
            return None
        return decode_header(raw), inp, out, err

    @_routed
    async def read_steps(self, run_id: str) -> list[StepRecord]:
        reply = await self.scripts.run("history", (run_id,))
        return decode_steps(reply[1] or b"")

    @_routed
    async def read_attempts(self, run_id: str, attempts: int) -> list[AttemptRecord]:
        """The records of attempts 1..``attempts`` that ended (a success has none: the run is its record)."""
        if attempts <= 0:
            return []
        raws = await self.redis.execute("HMGET", self.keys.attempts, *(f"{run_id}:{a}" for a in range(1, attempts + 1)))
        return [decode_attempt(r) for r in raws if r is not None]

    @_routed
    async def read_output(self, run_id: str) -> bytes | None:
        out: bytes | None = await self.redis.execute("HGET", self.keys.results, run_id)
        return out

    @_routed
    async def read_outcome(self, run_id: str) -> tuple[str, bytes | None, bytes | None] | None:
        """(status, output, error) of a run."""
        k = self.keys
        raw, out, err = await asyncio.gather(
            self.redis.execute("HGET", k.runs, run_id),
            self.redis.execute("HGET", k.results, run_id),
            self.redis.execute("HGET", k.errors, run_id),
        )
        if raw is None:
            return None
        return decode_header(raw).status, out, err

    async def write_workflows(self, metas: dict[str, bytes]) -> None:
        if metas:
            flat: list[Any] = []
            for name, meta in metas.items():
                flat += (name, meta)
            await self.redis.execute("HSET", self.keys.workflows, *flat)

    async def read_workflow(self, name: str) -> bytes | None:
        result: bytes | None = await self.redis.execute("HGET", self.keys.workflows, name)
        return result


async def _none() -> None:
    return None
