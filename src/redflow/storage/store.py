"""Typed wrappers of the Lua transitions and the reads: the only place that orders KEYS and ARGV."""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._redis.client import RedisClient
from ..encoding import decode
from ..errors import StorageLayoutError
from .codes import Code
from .keys import STORAGE_VERSION, PartitionKeys, tag
from .records import ClaimedRun, RunHeader, StepRecord, decode_header, decode_steps, parse_claim
from .scripts import ScriptRunner

log = logging.getLogger("redflow.storage")


class Heartbeat(NamedTuple):
    state: int  # 0 no entry (new, or reaped), 1 renewed, 2 lapsed but not reaped
    leader: str  # "<worker id>:<epoch>" or ""
    lapsed_workers: int
    server_ms: int
    cron_version: int
    next_event_due_ms: int  # -1 when no delayed event is pending


_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for store in list(_stores):
        store._ready = None  # a future of the parent's event loop
        store._is_ready = False


os.register_at_fork(after_in_child=_forget_after_fork)


class Store:
    def __init__(self, redis: RedisClient, keys: PartitionKeys) -> None:
        _stores.add(self)
        self.redis = redis
        self.keys = keys
        self.scripts = ScriptRunner(redis)
        self._ready: asyncio.Future[None] | None = None
        self._is_ready = False

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

    async def _prepare(self) -> None:
        k = self.keys
        version, foreign = await asyncio.gather(
            self.redis.execute("GET", k.version),
            self.redis.execute("EXISTS", *k.foreign_markers()),
        )
        if version is None:
            if foreign:
                raise StorageLayoutError(
                    f"the key prefix {k.prefix!r} holds data of another storage layout (for example "
                    "from redflow 0.1.x); use another prefix (REDFLOW_PREFIX) or remove that data"
                )
            await self.redis.execute("SET", k.version, STORAGE_VERSION, "NX")
            version = await self.redis.execute("GET", k.version)
        if version.decode() != STORAGE_VERSION:
            raise StorageLayoutError(
                f"the key prefix {k.prefix!r} holds storage layout {version.decode()!r}; this version "
                f"of redflow uses {STORAGE_VERSION!r}. Use another prefix or migrate the data"
            )
        await self.scripts.load_all()

    # --- runs ------------------------------------------------------------------------------------
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
        parent_queue: str | None = None,
    ) -> tuple[Code, str, str]:
        """Create a run. ``parent_queue`` is given when the parent will wait for this run to end."""
        k = self.keys
        keys = [k.runs, k.inputs, k.index, k.ready(queue), k.scheduled(queue), k.bell(queue), k.children]
        ttl = 0
        if idempotency_key is not None:
            keys.append(k.idempotency(workflow, idempotency_key))
            ttl = idempotency_ttl_s
        reply = await self.scripts.call(
            "enqueue",
            keys,
            (run_id, workflow, queue, input_json, max_attempts, run_at_ms, ttl, parent_run_id or "",
             parent_queue or ""),
        )
        return Code(reply[0]), reply[1].decode(), reply[2].decode()

    async def enqueue_batch(
        self, run_ids: list[str], workflow: str, queue: str, inputs: list[bytes], max_attempts: int, run_at_ms: int
    ) -> int:
        k = self.keys
        reply = await self.scripts.call(
            "enqueue_batch",
            (k.runs, k.inputs, k.index, k.ready(queue), k.scheduled(queue), k.bell(queue)),
            (workflow, queue, max_attempts, len(run_ids), run_at_ms, *run_ids, *inputs),
        )
        return int(reply[1])

    async def debounce(
        self, run_id: str, workflow: str, queue: str, input_json: bytes, max_attempts: int, key: str,
        period_ms: int, timeout_ms: int, parent_run_id: str | None,
    ) -> tuple[Code, str, str]:
        k = self.keys
        reply = await self.scripts.call(
            "debounce",
            (k.runs, k.inputs, k.index, k.ready(queue), k.scheduled(queue), k.bell(queue), k.children,
             k.debounce(workflow, key)),
            (run_id, workflow, queue, input_json, max_attempts, period_ms, timeout_ms, parent_run_id or ""),
        )
        return Code(reply[0]), reply[1].decode(), reply[2].decode()

    async def claim(
        self, worker_id: str, queues: Sequence[str], max_runs: int, promote: int
    ) -> tuple[Code, int, list[ClaimedRun]]:
        k = self.keys
        keys = [
            k.runs, k.inputs, k.steps, k.errors, k.leases, k.index, k.workers, k.seq, k.owned(worker_id),
            k.waits, k.waiters, k.limits, k.held, k.admission, k.mutexes,
        ]
        for queue in queues:
            keys += (k.ready(queue), k.scheduled(queue), k.bell(queue))
        reply = await self.scripts.call("claim", keys, (worker_id, max_runs, promote, *queues))
        code = Code(reply[0])
        if code is not Code.OK:
            return code, -1, []
        next_due, runs = parse_claim(reply)
        return code, next_due, runs

    async def record_step(self, run_id: str, token: bytes, line: bytes) -> Code:
        k = self.keys
        return Code(await self.scripts.call("step", (k.leases, k.steps), (run_id, token, line)))

    def _parent_keys(self, parent_queue: str | None, with_steps: bool = True) -> list[str]:
        """Keys a transition needs to resume a parent waiting for the run to end."""
        if not parent_queue:
            return []
        k = self.keys
        steps = [k.steps] if with_steps else []
        return [k.waits, k.waiters, *steps, k.ready(parent_queue), k.scheduled(parent_queue), k.bell(parent_queue)]

    async def finish(
        self, run_id: str, token: bytes, worker_id: str, status: str, payload: bytes, hook: bool,
        retention_ms: int, queue: str, parent_queue: str | None = None, flags: str = "sc",
    ) -> tuple[Code, str]:
        """End a running run; returns the final status (canceled when cancellation was requested)."""
        k = self.keys
        reply = await self.scripts.call(
            "finish",
            [k.runs, k.leases, k.results, k.errors, k.index, k.expiry, k.owned(worker_id), k.limits, k.held,
             k.ready(queue), k.bell(queue), k.steps, k.mutexes, k.stream(run_id),
             *self._parent_keys(parent_queue, with_steps=False)],
            (run_id, token, status, payload, 1 if hook else 0, retention_ms, k.done_channel(run_id), flags),
        )
        code = Code(reply[0])
        return code, reply[1].decode() if code is Code.OK else ""

    async def hook_done(self, run_id: str, token: bytes, worker_id: str, parent_queue: str | None = None) -> Code:
        k = self.keys
        keys = [k.runs, k.leases, k.owned(worker_id)]
        if parent_queue:
            keys += [k.index, k.errors, *self._parent_keys(parent_queue)]
        return Code(await self.scripts.call("hook_done", keys, (run_id, token)))

    async def retry(
        self, run_id: str, token: bytes, worker_id: str, queue: str, delay_ms: int, error: bytes,
        keep_attempt: bool = False,
    ) -> Code:
        k = self.keys
        return Code(
            await self.scripts.call(
                "retry",
                (k.runs, k.leases, k.errors, k.index, k.owned(worker_id), k.scheduled(queue), k.bell(queue),
                 k.limits, k.held, k.ready(queue), k.steps, k.mutexes),
                (run_id, token, delay_ms, error, 1 if keep_attempt else 0),
            )
        )

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
        was satisfied at once, or (STALE | CANCELED, '', b'')."""
        k = self.keys
        reply = await self.scripts.call(
            "suspend",
            (k.runs, k.leases, k.index, k.owned(worker_id), k.steps, k.waits, k.waiters, k.scheduled(queue),
             k.bell(queue), k.results, k.errors, k.event_buffer, k.event_data, k.limits, k.held, k.ready(queue),
             k.mutexes),
            (run_id, token, step, position, kind, delay_ms, due_ms, waiter_member, child_id, buffer_prefix, info,
             *consumed_events),
        )
        code = Code(reply[0])
        if code is Code.RESOLVED:
            return code, reply[1].decode(), reply[2]
        return code, "", b""

    async def cancel(self, run_id: str, reason: str, retention_ms: int) -> tuple[Code, str]:
        """Cancel one run: (OK, 'canceled' | 'requested'), (TERMINAL, status) or (NOT_FOUND, '')."""
        k = self.keys
        header = await self.read_header(run_id)
        if header is None:
            return Code.NOT_FOUND, ""
        keys = [k.runs, k.index, k.errors, k.expiry, k.waits, k.waiters, k.steps, k.scheduled(header.q), k.held]
        if header.pq:
            keys += [k.ready(header.pq), k.scheduled(header.pq), k.bell(header.pq)]
        reply = await self.scripts.call(
            "cancel", keys,
            (run_id, reason, retention_ms, k.done_channel(run_id), k.control_channel_prefix()),
        )
        code = Code(reply[0])
        return code, reply[1].decode() if len(reply) > 1 else ""

    async def admit(
        self, run_id: str, token: bytes, worker_id: str, queue: str, workflow: str,
        throttle: tuple[str, int, int] | None, rate: tuple[str, int, int] | None, hook: bool, retention_ms: int,
        mutex_key: str | None = None,
    ) -> tuple[Code, Any]:
        """Admission of a first start; throttle and rate are (key, limit, period ms)."""
        k = self.keys
        placeholder = k.throttle(workflow, "")
        reply = await self.scripts.call(
            "admit",
            (k.runs, k.leases, k.index, k.owned(worker_id), k.scheduled(queue), k.bell(queue), k.errors, k.expiry,
             k.steps, k.throttle(workflow, throttle[0]) if throttle else placeholder,
             k.rate_limit(workflow, rate[0]) if rate else placeholder, k.mutexes, k.held, k.seq, k.ready(queue),
             k.limits),
            (run_id, token, throttle[1] if throttle else 0, throttle[2] if throttle else 0,
             rate[1] if rate else 0, rate[2] if rate else 0, 1 if hook else 0, retention_ms, k.done_channel(run_id),
             tag(workflow) + tag(mutex_key) if mutex_key is not None else ""),
        )
        code = Code(reply[0])
        if code is Code.OK:
            return code, decode_header(reply[1])
        return code, int(reply[1]) if len(reply) > 1 else None

    async def stream_write(
        self, run_id: str, token: bytes, attempt: int, value: bytes, retention_ms: int, max_len: int
    ) -> tuple[Code, str, int]:
        k = self.keys
        reply = await self.scripts.call(
            "stream_write", (k.leases, k.stream(run_id)), (run_id, token, attempt, value, retention_ms, max_len)
        )
        code = Code(reply[0])
        if code is not Code.OK:
            return code, "", 0
        return code, reply[1].decode(), int(reply[2])

    async def read_wait(self, run_id: str) -> dict[str, Any] | None:
        raw = await self.redis.execute("HGET", self.keys.waits, run_id)
        return None if raw is None else dict(decode(raw))

    async def resume_input(self, run_id: str, queue: str, form: bytes, new_input: bytes | None) -> tuple[Code, str]:
        k = self.keys
        reply = await self.scripts.call(
            "resume_input",
            (k.runs, k.inputs, k.index, k.waits, k.waiters, k.steps, k.ready(queue), k.scheduled(queue), k.bell(queue)),
            (run_id, form, new_input or b""),
        )
        return Code(reply[0]), reply[1].decode() if len(reply) > 1 else ""

    async def children_of(self, run_id: str) -> list[str]:
        """Runs started by steps of ``run_id`` (the parent-to-child index)."""
        start = f"[{run_id}:".encode()
        members = await self.redis.execute("ZRANGEBYLEX", self.keys.children, start, start + b"\xff")
        return [m.decode().split(":", 1)[1] for m in members]

    async def release(self, run_id: str, token: bytes, worker_id: str, queue: str) -> Code:
        k = self.keys
        return Code(
            await self.scripts.call(
                "release",
                (k.runs, k.leases, k.index, k.owned(worker_id), k.ready(queue), k.bell(queue), k.limits, k.held,
                 k.mutexes),
                (run_id, token),
            )
        )

    # --- workers and leadership ---------------------------------------------------------------------
    async def heartbeat(
        self, worker_id: str, lease_ms: int, leader_lease_ms: int, stand: bool
    ) -> Heartbeat:
        k = self.keys
        reply = await self.scripts.call(
            "heartbeat", (k.workers, k.leader, k.epoch, k.cron_version, k.events_due),
            (worker_id, lease_ms, leader_lease_ms, 1 if stand else 0),
        )
        return Heartbeat(
            int(reply[1]), reply[2].decode(), int(reply[3]), int(reply[4]), int(reply[5]), int(reply[6])
        )

    async def resign(self, worker_id: str) -> None:
        k = self.keys
        await self.scripts.call("resign", (k.workers, k.leader, k.owned(worker_id)), (worker_id,))

    async def lapsed_workers(self, limit: int) -> list[str]:
        k = self.keys
        time_reply = await self.redis.execute("TIME")
        now_ms = int(time_reply[0]) * 1000 + int(time_reply[1]) // 1000
        ids = await self.redis.execute("ZRANGEBYSCORE", k.workers, "-inf", f"({now_ms}", "LIMIT", 0, limit)
        return [i.decode() for i in ids]

    async def reap(
        self, leader: str, worker_id: str, max_lapses: int, retention_ms: int, batch: int
    ) -> tuple[Code, int, int, int]:
        """Take back the runs of a lapsed worker: (code, taken back, failed as crashed, left)."""
        k = self.keys
        owned_key = k.owned(worker_id)
        ids = await self.redis.execute("SRANDMEMBER", owned_key, batch)
        queues: list[str] = []
        if ids:
            headers = await self.redis.execute("HMGET", k.runs, *ids)
            queues = sorted({decode_header(h).q for h in headers if h is not None})
        keys = [
            k.workers, k.leader, k.runs, k.leases, k.index, k.errors, k.expiry, owned_key, k.limits, k.held, k.mutexes,
        ]
        for queue in queues:
            keys += (k.ready(queue), k.bell(queue))
        reply = await self.scripts.call(
            "reap",
            keys,
            (leader, worker_id, max_lapses, retention_ms, k.done_channel_prefix(), batch, len(queues), *queues,
             *ids),
        )
        code = Code(reply[0])
        if code is not Code.OK:
            return code, 0, 0, 0
        return code, int(reply[1]), int(reply[2]), int(reply[3])

    async def cleanup(self, limit: int, cutoff_ms: int = 0, what: str = "both") -> tuple[int, int]:
        """Delete runs and events past retention: (runs deleted, events deleted)."""
        k = self.keys
        reply = await self.scripts.call(
            "cleanup",
            (k.runs, k.inputs, k.results, k.errors, k.steps, k.leases, k.index, k.expiry, k.children,
             k.events, k.event_data, k.event_index, k.event_expiry, k.event_buffer),
            (limit, cutoff_ms, what),
        )
        return int(reply[1]), int(reply[2])

    # --- reads ---------------------------------------------------------------------------------------
    async def read_header(self, run_id: str) -> RunHeader | None:
        raw = await self.redis.execute("HGET", self.keys.runs, run_id)
        return None if raw is None else decode_header(raw)

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

    async def read_steps(self, run_id: str) -> list[StepRecord]:
        raw = await self.redis.execute("HGET", self.keys.steps, run_id)
        return decode_steps(raw or b"")

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
        return decode_header(raw).s, out, err

    async def write_workflows(self, metas: dict[str, bytes]) -> None:
        if metas:
            flat: list[Any] = []
            for name, meta in metas.items():
                flat += (name, meta)
            await self.redis.execute("HSET", self.keys.workflows, *flat)

    async def read_workflow(self, name: str) -> bytes | None:
        result: bytes | None = await self.redis.execute("HGET", self.keys.workflows, name)
        return result
