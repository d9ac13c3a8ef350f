"""The worker: claims runs in batches, executes them concurrently, keeps its liveness lease.

One claim loop per worker blocks on the queues' bell lists when there is nothing to do (no polling);
one heartbeat per interval renews the lease that covers every run the worker holds, and elects the
leader. A worker that cannot renew in time cancels its local runs before the lease lapses, because
after that the reaper may hand them to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Any

from .. import observability
from .._redis.client import RedisClient
from .._redis.errors import CommandTimeoutError, RedisError
from .._redis.pubsub import Subscriber
from ..client import RedflowClient, create_client, default_prefix
from ..observability.logs import OutageLog
from ..registry import WorkflowRegistry, get_default_registry
from ..storage.bells import BellWaiter
from ..storage.codes import Code
from ..storage.event_store import EventStore
from ..storage.store import Store
from ..types import StartWorkerOptions
from .executor import Execution, execute
from .options import WorkerSettings, resolve_settings

log = logging.getLogger("redflow.worker")
CLAIM_BACKOFF_MAX_S = 1.0
HEARTBEAT_RETRY_S = 0.1  # the first retry after a failed renewal; doubles while they fail
LATE_START_SHARE = 0.5  # of the lease: a claim answered later than this after a renewal starts nothing

HEARTBEAT_DEADLINE_SHARE = 0.5  # of the lease: the longest a renewal may take before the connection is reset
RECONCILE_EVERY_BEATS = 3  # also after a claim error, a failed renewal, and a lapsed-but-not-reaped one


class Worker:
    """Claims and runs the runs of one partition. Under a prefix with several partitions the worker
    start_worker returns (the primary, on ``p0``) starts one sibling per other partition: each has
    its own id, lease, blocking wait, cancel channel and leader election in its partition, and all
    of them share the primary's concurrency, client and run budget."""

    def __init__(
        self, client: RedflowClient, registry: WorkflowRegistry, settings: WorkerSettings,
        *, store: Store | None = None, primary: Worker | None = None,
    ) -> None:
        self.client = client
        self.store = store if store is not None else client.store
        self.primary = primary if primary is not None else self
        self.events = client.events if primary is None else EventStore(self.store)  # this partition's
        self.group: list[Worker] = [self]  # the primary's list holds every worker of the group
        self.registry = registry
        self.settings = settings
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.retention_ms = client.retention_ms
        self.max_payload_bytes = client.max_payload_bytes
        self.queues = settings.queues
        address = client.redis.address
        where = address.unix_path or f"{address.host}:{address.port}"
        self.outage = OutageLog(log, f"worker {self.id}: Redis at {where}")
        self.active: dict[str, Execution] = {}
        self.is_leader = False
        self.leader_value = ""
        self._stopping = False
        self._slot_freed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._bells = BellWaiter(client.redis, self.store.keys, settings.queues)
        self._last_renewal = 0.0
        self._registered = False
        self._to_release: dict[str, Execution] = {}
        self._lease_guard: asyncio.TimerHandle | None = None
        self._leader: Any = None
        self._control: Subscriber | None = None
        self._early_cancels: set[str] = set()
        self._reserved = 0  # (the primary's) slots reserved by claims in flight in the group
        self._claim_lock = asyncio.Lock()  # a claim and a reconciliation never interleave
        self._beats = 0
        self.stopped = asyncio.Event()
        self.runs_done = 0
        self.runs_claimed = 0
        self.run_budget: int | None = None  # claim at most this many runs, then set budget_spent
        self.budget_spent = asyncio.Event()
        self._ready = False  # registered, scripts loaded, and the last heartbeat succeeded

    def _budget_left(self) -> int:
        budget = self.primary.run_budget
        if budget is None:
            return self.settings.concurrency
        return budget - sum(w.runs_claimed for w in self.primary.group) - self.primary._reserved

    def _free_slots(self) -> int:
        """How many runs a claim may ask for now: 0 while the group is too busy for one (a claim is
        worth sending for claim_threshold free slots, or for any when nothing runs)."""
        s = self.settings
        busy = self.inflight() + self.primary._reserved
        free = s.concurrency - busy
        # The threshold is shared by the siblings: each partition may hold only a share of the
        # backlog, and a sibling waiting for more free slots than its partition's share would leave
        # them idle while its runs wait (nothing frees a slot while every run is long).
        threshold = max(1, s.claim_threshold // len(self.primary.group))
        if free <= 0 or (free < threshold and busy):
            return 0
        return max(0, min(free, s.claim_batch_size, self._budget_left()))

    def inflight(self) -> int:
        """Runs executing now in this worker's group (every partition)."""
        return sum(len(w.active) for w in self.primary.group)

    @property
    def ready(self) -> bool:
        """Registered and renewed within the lease: a worker whose renewals stalled is not ready."""
        if not self._ready:
            return False
        if any(not w.ready for w in self.group[1:]):
            return False
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # read outside the worker's loop: the last heartbeat's verdict
            return True
        return (now - self._last_renewal) * 1000 < self.settings.lease_ms

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    # --- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        from ..leader.duties import LeaderDuties

        await self.store.ensure_ready()
        if self.primary is self:
            await self._warn_on_eviction()
            # Contracts are checked first: a refused start writes nothing.
            await self.client.sync_registry(self.registry)
            await self.client.events.record_registration(
                self.id, [d.name for d in self.registry.definitions()], list(self.queues)
            )
        self._control = Subscriber(self.store.redis, route_key=self.store.keys.base)
        await self._control.subscribe(self.store.keys.control_channel(self.id), self._on_control)
        await self._heartbeat_once()
        self._leader = LeaderDuties(self)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._claim_loop(), name=f"redflow-claim:{self.id}"),
            loop.create_task(self._heartbeat_loop(), name=f"redflow-heartbeat:{self.id}"),
        ]
        if observability.enabled():
            self._tasks.append(loop.create_task(self._measure_loop_lag(), name=f"redflow-lag:{self.id}"))
        if self.primary is self:
            try:
                for store in self.store.partitions[1:]:
                    sibling = Worker(self.client, self.registry, self.settings, store=store, primary=self)
                    self.group.append(sibling)
                    await sibling.start()
            except BaseException:
                await self.stop(grace_period_ms=0)
                raise
            log.info("worker %s started on queues %s (concurrency %d, %d partition(s))", self.id, self.queues,
                     self.settings.concurrency, len(self.group))

    async def stop(self, grace_period_ms: int | None = None) -> None:
        """Stop claiming, let runs in flight finish within the grace period, hand back the rest."""
        if self._stopping:
            await self.stopped.wait()
            return
        self._stopping = True
        grace = self.settings.grace_period_ms if grace_period_ms is None else grace_period_ms
        siblings = [asyncio.ensure_future(w.stop(grace)) for w in self.group[1:]]
        self._bells.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace / 1000
        # A claim in flight when the stop began spawns its runs under the claim lock: wait for it, so
        # those runs get the grace period too instead of being cut short as leftovers.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace / 1000), self._claim_lock:
                pass
        pending = [ex.task for ex in self.active.values() if ex.task is not None]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        leftovers = list(self.active.values())
        for ex in leftovers:
            ex.stop_here()
        for ex in leftovers:
            if ex.task is not None:
                with contextlib.suppress(BaseException):
                    await ex.task
        await self._release(leftovers)
        if self._lease_guard is not None:
            self._lease_guard.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        try:
            await self.store.resign(self.id)
        except RedisError as exc:
            log.warning("worker %s could not resign cleanly: %s", self.id, exc)
        if self._leader is not None:
            self._leader.step_down()
        if self._control is not None:
            await self._control.close()
        if siblings:
            await asyncio.gather(*siblings, return_exceptions=True)
        if self.primary is self:
            await self.client.close()
        self.stopped.set()

    async def _release(self, executions: list[Execution]) -> None:
        results = await asyncio.gather(
            *(
                self.store.release(ex.claimed.id, ex.claimed.token, self.id, ex.claimed.header.queue, self.retention_ms)
                for ex in executions
                if not ex.settled
            ),
            return_exceptions=True,
        )
        for ex, result in zip([e for e in executions if not e.settled], results, strict=True):
            if isinstance(result, BaseException):
                log.warning("could not hand back run %s: %s", ex.claimed.id, result)
            else:
                log.info("handed back run %s (%s)", ex.claimed.id, Code(result).name)

    # --- cancellation ----------------------------------------------------------------------------------
    def _on_control(self, payload: bytes | None) -> None:
        """A cancellation request for a run this worker holds (None: re-check all after a reconnect)."""
        if payload is None:
            asyncio.get_running_loop().create_task(self._recheck_cancellations())
            return
        self.cancel_local(payload.decode())

    def cancel_local(self, run_id: str) -> None:
        ex = self.active.get(run_id)
        if ex is None:
            # The request can overtake the claim reply (they travel on different connections).
            self._early_cancels.add(run_id)
            return
        ex.request_cancel()

    async def _recheck_cancellations(self) -> None:
        for run_id in list(self.active):
            try:
                header = await self.store.read_header(run_id)
            except RedisError:
                return
            if header is not None and header.cancel_requested_at_ms is not None:
                self.cancel_local(run_id)

    # --- claiming ----------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        s = self.settings
        backoff = 0.05
        loop = asyncio.get_running_loop()
        if not self.queues:  # StartWorkerOptions(queues=[]): registration and leader duties only
            log.info("worker %s polls no queue: it runs no runs", self.id)
            return
        while not self._stopping:
            try:
                if self._free_slots() <= 0:
                    if self._budget_left() <= 0 and self.primary._reserved == 0:
                        self.primary.budget_spent.set()
                        return
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                async with self._claim_lock:
                    if self._stopping:  # a stop began meanwhile: it counts on no claim starting after it
                        return
                    # Sibling partitions claim from one concurrency: the slots a claim asks for are
                    # reserved until its runs are spawned (no await between the count and the reservation).
                    want = self._free_slots()
                    if want <= 0:
                        continue
                    primary = self.primary
                    primary._reserved += want
                    late = False
                    sent_at = loop.time()
                    try:
                        code, next_due_ms, runs = await self.store.claim(self.id, self.queues, want, s.promote_batch)
                    finally:
                        primary._reserved -= want
                        for w in primary.group:
                            w._slot_freed.set()
                    if code is not Code.STALE_WORKER:
                        self.runs_claimed += len(runs)
                        # A reply that comes late (renewals failing meanwhile) must not start runs the
                        # lease guard would cut short: they are handed back by the renewal below.
                        late = bool(runs) and self._lease_running_out()
                        for claimed in runs:
                            ex = Execution(claimed=claimed, signal=asyncio.Event())
                            if late:
                                self._to_release[claimed.id] = ex
                            else:
                                self._spawn(ex)
                        if late:
                            log.warning("worker %s: claim answered %.1fs after the last lease renewal; handing "
                                        "back %d run(s) unstarted", self.id,
                                        asyncio.get_running_loop().time() - self._last_renewal, len(runs))
                        self._early_cancels.clear()  # any request older than this claim is for a run not ours
                if code is Code.STALE_WORKER or late:
                    # Renew at once: that also hands back what a late claim took, and the next claim
                    # starts its runs on a fresh lease (a bell may never come: the blocking
                    # connection could be the one that froze).
                    await self._heartbeat_once()
                    continue
                if len(runs) == want:
                    continue
                if next_due_ms == 0:
                    continue
                timeout = s.block_timeout_s
                if next_due_ms > 0:
                    # Counted from when the claim was sent: the server read its clock after that, so
                    # the wait ends at the due time or just before it (a claim that comes early finds
                    # the run 1 ms away and waits that long), never a reply's delay after it.
                    timeout = min(timeout, next_due_ms / 1000 - (loop.time() - sent_at))
                await self._block(max(timeout, 0.001))
                backoff = 0.05
            except RedisError as exc:
                if self._stopping:
                    return
                self.outage.failed(exc)  # one line when the outage starts, a summary, one when it ends
                await asyncio.sleep(backoff)
                # At most 1 s between attempts: a failover is over in a few seconds and the claim
                # loop should notice within about one more.
                backoff = min(backoff * 2, CLAIM_BACKOFF_MAX_S)
                # The claim may have been applied with its reply lost: hand back what we do not run.
                with contextlib.suppress(RedisError):
                    await self.reconcile()

    async def _block(self, timeout_s: float) -> None:
        """Wait for a bell on any of our queues, or until the next due time."""
        s = self.settings
        await self._bells.wait(timeout_s, s.block_timeout_s, s.block_timeout_s + s.watchdog_slack_s,
                               f"worker {self.id}")

    async def _measure_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            before = loop.time()
            await asyncio.sleep(1.0)
            observability.set_gauge("loop_lag", max(0.0, loop.time() - before - 1.0))

    def _spawn(self, ex: Execution) -> None:
        if ex.claimed.id in self._early_cancels:
            self._early_cancels.discard(ex.claimed.id)
            ex.cancel_requested = True
        self.active[ex.claimed.id] = ex
        if observability.enabled():  # no per-run sum over the group when metrics are off
            observability.set_gauge("inflight", self.inflight())
        ex.task = asyncio.get_running_loop().create_task(self._execute(ex))

    async def _execute(self, ex: Execution) -> None:
        try:
            await execute(self, ex)
        except asyncio.CancelledError:
            pass
        except RedisError as exc:
            log.warning("run %s: Redis error while recording its outcome: %s", ex.claimed.id, exc)
        except Exception:
            log.exception("run %s: internal error in the executor", ex.claimed.id)
        finally:
            # A run whose outcome was not written is handed back (next heartbeat), never kept owned.
            if not ex.settled and not self._stopping:
                self._to_release[ex.claimed.id] = ex
            self.active.pop(ex.claimed.id, None)
            if observability.enabled():
                observability.set_gauge("inflight", self.inflight())
            self.runs_done += 1
            for w in self.primary.group:  # the slot is the group's
                w._slot_freed.set()

    # --- ownership ------------------------------------------------------------------------------------------
    async def reconcile(self) -> tuple[int, int]:
        """Make what the server says this worker owns agree with what it runs.

        Runs the server lists as ours that we do not run (a claim whose reply was lost, a hand-back
        that failed) are released; local runs whose lease is no longer ours (the server lost the claim,
        or another worker holds them now) stop without writing. Returns (released, abandoned)."""
        if self._stopping:
            return 0, 0
        async with self._claim_lock:
            owned = await self.store.owned_runs(self.id)
            local = dict(self.active)
            released = abandoned = 0
            for run_id, token in owned.items():
                if run_id in local or run_id in self._to_release:
                    continue
                if token is None:
                    await self.store.forget_owned(self.id, run_id)
                    continue
                header = await self.store.read_header(run_id)
                if header is None:
                    await self.store.forget_owned(self.id, run_id)
                    continue
                code = await self.store.release(run_id, token, self.id, header.queue, self.retention_ms)
                log.warning("worker %s: held run %s without running it; handed it back (%s)", self.id, run_id,
                            code.name)
                released += 1
            ids = [i for i, ex in local.items() if not ex.settled]
            for run_id, token in zip(ids, await self.store.lease_tokens(ids), strict=True):
                ex = local[run_id]
                if token != ex.claimed.token and not ex.settled and self.active.get(run_id) is ex:
                    log.warning("worker %s: run %s is no longer ours on the server; stopping it", self.id, run_id)
                    ex.settled = True  # nothing of ours to write or hand back
                    ex.stop_here()
                    abandoned += 1
            return released, abandoned

    # --- liveness and leadership -------------------------------------------------------------------------
    async def _heartbeat_once(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        sent = loop.time()
        # The renewal must land well inside the lease; a server that does not answer in time is
        # treated as a dead connection (half-open sockets never fail on their own).
        deadline = max(0.2, s.lease_ms * HEARTBEAT_DEADLINE_SHARE / 1000)
        try:
            async with asyncio.timeout(deadline):
                beat = await self.store.heartbeat(self.id, s.lease_ms, s.leader_lease_ms, not self._stopping)
        except TimeoutError:
            error = CommandTimeoutError(f"heartbeat got no reply within {deadline:.2f}s")
            self.store.redis.drop_shared(error)
            self._bells.drop(error)
            raise error from None
        except RedisError as exc:
            # The blocking connection goes to the same server: one that froze with the shared one
            # would otherwise hold the claim loop until the watchdog (block + stall, 20 s by default),
            # with a bell it popped and never delivered.
            self._bells.drop(exc)
            raise
        observability.set_gauge("redis_rtt", loop.time() - sent)
        self.outage.succeeded()
        state, leader = beat.state, beat.leader
        # The server renewed the lease at some time after `sent`, perhaps long before this reply was
        # read (the process paused or starved in between): the lease is as old as the request.
        self._last_renewal = sent
        if self._lease_guard is not None:
            self._lease_guard.cancel()
        # Runs must stop before the lease can lapse: after that the reaper may hand them to another worker.
        self._lease_guard = loop.call_at(self._last_renewal + s.lease_ms * 0.7 / 1000, self._on_lease_guard)
        if state == 0 and self._registered:
            log.error("worker %s: its lease lapsed and its runs were taken over; canceling local runs", self.id)
            self._to_release.clear()
            self._abandon_local_runs(release=False)
        elif self._to_release:
            releasing = list(self._to_release.values())
            self._to_release.clear()
            await self._release(releasing)
        self._registered = True
        recovered = self._registered and not self._ready  # the previous renewal failed: a reconnect
        self.ready = True
        self._beats += 1
        if self._beats % RECONCILE_EVERY_BEATS == 0 or state == 2 or recovered:
            asyncio.get_running_loop().create_task(self._reconcile_quietly())
        was_leader = self.is_leader
        self.is_leader = leader.startswith(self.id + ":")
        self.leader_value = leader if self.is_leader else ""
        observability.set_gauge("leader", 1.0 if self.is_leader else 0.0)
        if self.is_leader != was_leader:
            log.info("worker %s %s leader (%s)", self.id, "became" if self.is_leader else "is no longer", leader)
        if self._leader is not None:
            if self.is_leader:
                self._leader.tick(beat)
            elif was_leader:
                self._leader.step_down()

    async def _reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except RedisError as exc:
            log.warning("worker %s: ownership check failed (%s); retried later", self.id, exc)

    async def _heartbeat_loop(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        pause, retry = s.heartbeat_interval_s, HEARTBEAT_RETRY_S
        while not self._stopping:
            await asyncio.sleep(pause)
            try:
                await self._heartbeat_once()
                pause, retry = s.heartbeat_interval_s, HEARTBEAT_RETRY_S
            except RedisError as exc:
                # Renew again soon (0.1 s, doubling up to the interval), not a whole interval later:
                # once the connection is back, the lease guard must not cut runs short for want of a
                # renewal.
                pause, retry = min(s.heartbeat_interval_s, retry), retry * 2
                self.ready = False
                silent_for = loop.time() - self._last_renewal
                self.outage.failed(exc)
                if silent_for > s.lease_ms / 1000:
                    log.debug("worker %s: %.1fs since the last renewal", self.id, silent_for)
            except Exception:
                self.ready = False
                log.exception("worker %s: heartbeat raised; the loop goes on", self.id)

    def _lease_running_out(self) -> bool:
        """Whether the lease is too old to start a run on: past LATE_START_SHARE of it since the last
        renewal (renewals run every third of a lease; the guard cuts runs at 0.7 of it)."""
        since = asyncio.get_running_loop().time() - self._last_renewal
        return since * 1000 > self.settings.lease_ms * LATE_START_SHARE

    def _on_lease_guard(self) -> None:
        if self.active and not self._stopping:
            log.error("worker %s: cannot renew its lease in time; canceling %d local run(s)", self.id, len(self.active))
            self._abandon_local_runs(release=True)

    def _abandon_local_runs(self, *, release: bool) -> None:
        for ex in list(self.active.values()):
            ex.stop_here()
            if release and not ex.settled:
                self._to_release[ex.claimed.id] = ex

    async def _warn_on_eviction(self) -> None:
        try:
            policy = await self.store.maxmemory_policy()
        except RedisError:
            return
        if policy is not None and policy != "noeviction":
            log.warning(
                "!!! Redis maxmemory-policy is %r: the server may evict redflow's keys under memory "
                "pressure and lose runs. Set maxmemory-policy to noeviction. !!!",
                policy,
            )


async def start_worker(options: StartWorkerOptions) -> Worker:
    """Start a worker in this event loop; ``await worker.stop()`` drains it."""
    settings = resolve_settings(options)
    registry = options.registry if options.registry is not None else get_default_registry()
    if options.queues is None:
        settings.queues = registry.queues() or ["default"]
    if isinstance(options.redis, RedisClient):
        client = RedflowClient(options.redis, prefix=options.prefix or default_prefix(), app=options.app)
    else:
        client = create_client(app=options.app, redis=options.redis, url=options.url, prefix=options.prefix)
    client.registry = registry
    worker = Worker(client, registry, settings)
    try:
        await worker.start()
    except BaseException:
        if worker._control is not None:
            await worker._control.close()
        await client.close()
        raise
    return worker

