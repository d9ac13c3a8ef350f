"""What every chaos test shares: worker processes, a driver that survives server failures, the mixed
workload with its cancels and events, the drain with a stated bound, and per-worker probes.

A test builds its topology (servers, proxies, workers or supervisors), calls ``enqueue_workload``,
``start_cancels``, injects its faults with ``record`` around each, then ``drain``, ``probe`` and
``checker.check``. Nothing here sleeps to synchronise: every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redflow import create_client
from redflow._redis.errors import RedisError
from redflow.client import RedflowClient
from redflow.embedded import EmbeddedServer
from redflow.storage.keys import PartitionKeys
from redflow.storage.records import decode_header

from ..conftest import wait_until
from .workload import EVENT, registry

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("REDFLOW_CHAOS_SCALE", "1"))
SEED = int(os.environ.get("REDFLOW_CHAOS_SEED", "20240610"))
LEASE_MS = 1500
REAPER_MS = 500
CONCURRENCY = 4
STEP_MS = 60  # mean duration of a step body: the drain lasts about as long as the faults
COMMAND_TIMEOUT_MS = 1500
BLOCK_WATCHDOG_S = 1.0 + 2.0  # blmove_timeout_sec + watchdog_stalled_for_ms of workload.py
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# Per 100 runs.
MIX = {"chaos-steps": 34, "chaos-sleep": 14, "chaos-event": 14, "chaos-parent": 10, "chaos-retry": 12,
       "chaos-fail": 6, "chaos-cancel": 10}
# Faults after which the server holds an older state than the one its clients were told about.
DATA_LOSS = frozenset({"server_kill_aof", "server_rdb_restore", "failover", "failover_routed_early"})
# Faults that kill or pause worker processes, whose runs others take over (the pids are in Fault.pids;
# a supervisor's faults list its orphaned children there too).
WORKER_FAULTS = frozenset({"worker_kill", "leader_kill", "worker_stop"})
# Faults that break connections without losing data.
CONNECTION_FAULTS = frozenset({"proxy_cut", "proxy_freeze", "proxy_latency", "half_open"})


def server_binary() -> str | None:
    """The server the chaos tests start: REDFLOW_TEST_REDIS_SERVER (Redis 6.2 in CI's second pass) or Valkey."""
    return os.environ.get("REDFLOW_TEST_REDIS_SERVER") or None


def chaos_server(data_dir: Path, extra_args: list[str] | None = None) -> EmbeddedServer:
    """A server with AOF, ``appendfsync everysec`` (the recommended setting), data in ``data_dir``."""
    return EmbeddedServer(server_binary(), data_dir=data_dir, appendonly=True,
                          extra_args=["--appendfsync", "everysec", *(extra_args or [])])


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0
    pids: list[int] = field(default_factory=list)  # worker processes it killed, paused or orphaned
    detail: str = ""
    loss_at: float | None = None  # when the server's data was lost, if not at ``start`` (a DATA_LOSS kind)

    @property
    def lost_data_at(self) -> float:
        return self.start if self.loss_at is None else self.loss_at


@dataclass
class Slot:
    index: int
    url: str
    probe_queue: str | None = None
    proc: asyncio.subprocess.Process | None = None
    pids: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to worker_env() for this slot's next spawn


class Harness:
    def __init__(self, tmp: Path, *, name: str, runs: int, step_ms: int = STEP_MS) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.name = name
        self.runs = runs
        self.step_ms = step_ms
        self.rng = random.Random(SEED)
        self.prefix = f"chaos:{name}:{SEED}"
        self.slots: list[Slot] = []
        self.faults: list[Fault] = []
        self.client: RedflowClient | None = None
        self.spawned = 0
        self.started = time.monotonic()
        # The workload, filled by enqueue_workload.
        self.workflow_of: dict[str, str] = {}
        self.top_ids: list[str] = []
        self.event_runs: list[str] = []
        self.cancel_result: dict[str, bool] = {}  # True once a cancel_run of the driver returned True
        self.cancel_at: dict[str, float] = {}
        self.lost_allowed: dict[str, str] = {}  # acknowledged runs a data loss may take, and why
        self.snapshot_at: float | None = None
        self._cancels: asyncio.Future[None] | None = None
        self._stop_cancels = asyncio.Event()
        # Filled by the fault loop and the drain.
        self.chaos_started = 0.0
        self.faults_stopped = 0.0
        self.done_before = 0
        self.recovery_s = 0.0
        self.bound_s = 0.0
        self.all_terminal_at: float | None = None
        self.extra_rows: list[tuple[str, Any]] = []  # test-specific lines of the counts table
        self.probe_s: dict[int, float] = {}

    def connect(self, url: str) -> RedflowClient:
        self.client = create_client(url=url, prefix=self.prefix)
        self.client.registry = registry
        return self.client

    # --- worker processes of workload.py ----------------------------------------------------------------
    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["REDFLOW_COMMAND_TIMEOUT_MS"] = str(COMMAND_TIMEOUT_MS)
        env["CHAOS_STEP_MS"] = str(self.step_ms)
        env["CHAOS_LOG_DIR"] = str(self.logs)
        return env

    async def spawn(self, slot: Slot, deadline_s: float = 60.0) -> None:
        """Start the slot's worker; retried while the server is down (the worker exits at start then)."""
        give_up = time.monotonic() + deadline_s
        while True:
            self.spawned += 1
            err = open(self.logs / f"worker-{slot.index}-{self.spawned}.err", "wb")  # noqa: ASYNC230
            args = [slot.url, self.prefix, str(self.logs), str(CONCURRENCY), str(LEASE_MS)]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.chaos.workload", *args, *([slot.probe_queue] if slot.probe_queue else []),
                cwd=ROOT, env={**self.worker_env(), **slot.env}, stdout=asyncio.subprocess.PIPE, stderr=err,
            )
            err.close()
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 20)
            except TimeoutError:
                line = b""
            if line.strip() == b"ready":
                slot.proc = proc
                slot.pids.append(proc.pid)
                return
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if time.monotonic() > give_up:
                raise AssertionError(f"worker slot {slot.index} could not start within {deadline_s}s")
            await asyncio.sleep(0.5)  # a restart backoff, not a synchronisation

    async def stop_workers(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGCONT)
                    slot.proc.terminate()
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                await asyncio.wait_for(slot.proc.wait(), 20)
            except TimeoutError:
                slot.proc.kill()
                await slot.proc.wait()

    async def leader_pid(self) -> int | None:
        assert self.client is not None
        raw = await self.redis("GET", self.client.keys.leader)
        if not raw:
            return None
        return int(raw.decode().split(":")[1])

    # --- driver commands that survive a server failure ----------------------------------------------
    async def retry(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, deadline_s: float = 60.0,
                    **kwargs: Any) -> Any:
        give_up = time.monotonic() + deadline_s
        delay = 0.05
        while True:
            try:
                return await fn(*args, **kwargs)
            except (RedisError, OSError) as exc:
                if time.monotonic() > give_up:
                    raise AssertionError(f"driver: {what} kept failing for {deadline_s}s: {exc}") from exc
                await asyncio.sleep(delay)  # backoff
                delay = min(delay * 2, 1.0)

    async def redis(self, *args: Any) -> Any:
        assert self.client is not None
        return await self.retry(args[0], self.client.redis.execute, *args)

    async def persisted(self, *fields: str) -> None:
        async def done() -> bool:
            info = await self.redis("INFO", "persistence")
            return all(f.encode() in info for f in fields)

        await wait_until(done, timeout_s=30, interval_s=0.05, what=f"INFO persistence {fields}")

    async def partitions(self) -> list[PartitionKeys]:
        """The keys of every partition of the prefix (one unless it was created with several)."""
        assert self.client is not None
        await self.retry("prepare", self.client.store.ensure_ready)
        return [s.keys for s in self.client.store.partitions]

    async def all_headers(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for keys in await self.partitions():
            cursor = b"0"
            while True:
                cursor, items = await self.redis("HSCAN", keys.runs, cursor, "COUNT", 2000)
                for i in range(0, len(items), 2):
                    out[items[i].decode()] = decode_header(items[i + 1])
                if cursor in (b"0", 0, "0"):
                    break
        return out

    async def statuses(self, ids: list[str]) -> list[str | None]:
        assert self.client is not None
        ids = list(ids)  # a copy: the trickle appends to top_ids while this awaits
        parts = await self.partitions()
        by_partition: dict[int, list[str]] = {}
        for run_id in ids:
            by_partition.setdefault(parts.index(self.client.store.of(run_id).keys), []).append(run_id)
        found: dict[str, str | None] = {}
        for index, mine in by_partition.items():
            for i in range(0, len(mine), 2000):
                raw = await self.redis("HMGET", parts[index].runs, *mine[i:i + 2000])
                found.update((r, None if h is None else decode_header(h).status)
                             for r, h in zip(mine[i:i + 2000], raw, strict=True))
        return [found[r] for r in ids]

    # --- the workload -----------------------------------------------------------------------------------
    async def enqueue_workload(self) -> None:
        assert self.client is not None
        rng = self.rng
        plan: list[str] = []
        for name, share in MIX.items():
            plan += [name] * max(1, self.runs * share // 100)
        rng.shuffle(plan)
        for start in range(0, len(plan), 50):  # batches of 50 in plan order: the queue mixes every workflow
            by_wf: dict[str, list[Any]] = defaultdict(list)
            for i in range(start, min(start + 50, len(plan))):
                name = plan[i]
                by_wf[name].append({"i": i, "nap_ms": rng.randint(100, 500)} if name == "chaos-sleep" else {"i": i})
            for name, inputs in by_wf.items():
                # Not retried: a retry after a lost reply would create the batch twice, under new ids.
                for handle in await self.client.enqueue_many(registry.get(name), inputs):  # type: ignore[arg-type]
                    self.workflow_of[handle.id] = name
        self.top_ids = list(self.workflow_of)
        self.event_runs = [r for r, w in self.workflow_of.items() if w == "chaos-event"]
        print(f"\nenqueued {len(self.top_ids)} runs in {time.monotonic() - self.started:.1f}s", flush=True)
        await self.emit_events(self.event_runs)

    async def emit_events(self, ids: list[str]) -> None:
        assert self.client is not None
        client = self.client
        for i in range(0, len(ids), 50):  # 50 at a time: they share one pipelined connection
            await asyncio.gather(*(
                self.retry("emit", client.emit_event, EVENT, {"for": run_id}, correlation_key=run_id,
                           event_id=f"ping-{run_id}") for run_id in ids[i:i + 50]))

    async def cancel_one(self, run_id: str) -> None:
        assert self.client is not None
        ok = await self.retry("cancel", self.client.cancel_run, run_id, reason="chaos driver")
        if not ok:
            # False also answers a retry whose first try was applied (its reply lost to a fault).
            ok = (await self.statuses([run_id]))[0] == "canceled"
        if ok or run_id not in self.cancel_result:  # False after a True: the cancel already applied
            self.cancel_result[run_id] = ok
            self.cancel_at[run_id] = time.time()

    def start_cancels(self) -> None:
        """Cancel every chaos-cancel run and 2 % of the others, spread over the chaos phase."""
        targets = [r for r, w in self.workflow_of.items() if w == "chaos-cancel"]
        random_cancels = self.rng.sample(
            [r for r, w in self.workflow_of.items() if w in ("chaos-steps", "chaos-parent")], k=max(1, self.runs // 50))
        todo = targets + random_cancels
        self.rng.shuffle(todo)
        rng = random.Random(SEED + 1)

        async def canceler() -> None:
            for run_id in todo:
                await self.cancel_one(run_id)
                if not self._stop_cancels.is_set():
                    await asyncio.sleep(rng.random() * 0.02)  # spreads the cancels over the faults

        self._cancels = asyncio.ensure_future(canceler())

    async def server_restarted(self) -> None:
        """What a client that knows the server may have lost writes does: re-send what it cannot lose."""
        canceled = [run_id for run_id, ok in self.cancel_result.items() if ok]
        for i in range(0, len(canceled), 50):
            await asyncio.gather(*(self.cancel_one(run_id) for run_id in canceled[i:i + 50]))
        statuses = await self.statuses(self.event_runs)
        await self.emit_events([r for r, s in zip(self.event_runs, statuses, strict=True) if s not in TERMINAL])

    # --- faults -----------------------------------------------------------------------------------------
    async def run_faults(self, schedule: list[str], inject: Callable[[Fault], Awaitable[None]],
                         pause: tuple[float, float] = (0.2, 0.7)) -> None:
        """Inject the faults in order, a seeded random pause before each, and print the progress."""
        self.chaos_started = time.monotonic()
        wall_started = time.time()
        for kind in schedule:
            await asyncio.sleep(pause[0] + self.rng.random() * (pause[1] - pause[0]))  # time between faults
            fault = Fault(kind, time.time())
            await inject(fault)
            fault.end = time.time()
            self.faults.append(fault)
            done = sum(1 for s in await self.statuses(self.top_ids) if s in TERMINAL)
            clock = time.strftime("%H:%M:%S", time.localtime(fault.start)) + f".{int(fault.start * 1000) % 1000:03d}"
            print(f"  t={fault.start - wall_started:6.1f}s {clock} {kind:<30} {fault.detail:<34} "
                  f"terminal {done}/{len(self.top_ids)} (+{done - self.done_before})", flush=True)
            self.done_before = done
        self.faults_stopped = time.monotonic()
        self._stop_cancels.set()
        if self._cancels is not None:
            await self._cancels

    # --- after the faults ---------------------------------------------------------------------------------
    async def drain(self, timeout_s: float, reserve_s: float = 90) -> None:
        """Wait until every run is terminal: the bound is 2 leases + a reaper interval + 3 x the time to
        drain what was left at the throughput measured under faults + 10 s. Gives up ``reserve_s``
        before the test's ``timeout_s``, so that the report comes before the pytest timeout."""
        throughput = max(self.done_before, 1) / max(self.faults_stopped - self.chaos_started, 0.1)
        remaining = len(self.top_ids) - self.done_before
        self.bound_s = 2 * LEASE_MS / 1000 + REAPER_MS / 1000 + 3 * remaining / throughput + 10
        # Past the bound, wait a little to tell slow from stuck, but report before the pytest timeout.
        hard_deadline = min(self.faults_stopped + self.bound_s + 60, self.started + timeout_s - reserve_s)
        while time.monotonic() < hard_deadline:
            headers = await self.all_headers()
            if all(hd.status in TERMINAL for hd in headers.values()) and all(
                    r in headers or r in self.lost_allowed for r in self.top_ids):
                self.all_terminal_at = time.monotonic()
                break
            await asyncio.sleep(0.25)  # polling interval of the condition above
        self.recovery_s = (self.all_terminal_at or time.monotonic()) - self.faults_stopped

    async def probe(self, slots: list[Slot], deadline_s: float = BLOCK_WATCHDOG_S + 2 * COMMAND_TIMEOUT_MS / 1000 + 10,
                    ) -> list[str]:
        """Send one chaos-probe run to each slot's own queue: a worker whose claim loop hangs (alive and
        heartbeating, claiming nothing) never takes it. Returns the violations."""
        assert self.client is not None
        probe = registry.get("chaos-probe")
        assert probe is not None
        client = self.client
        sent = time.monotonic()

        async def one(slot: Slot) -> str | None:
            assert slot.probe_queue is not None and slot.proc is not None
            handle = await self.retry("probe", client.enqueue_definition, probe, {"slot": slot.index},
                                      queue_override=slot.probe_queue)
            try:
                pid = await handle.result(timeout_ms=int(deadline_s * 1000))
            except Exception as exc:
                return f"worker slot {slot.index} (pid {slot.proc.pid}) claimed nothing from its own queue " \
                       f"within {deadline_s:.0f}s after the faults: {exc}"
            self.probe_s[slot.index] = time.monotonic() - sent
            if pid != slot.proc.pid:
                return f"probe of slot {slot.index} ran in pid {pid}, not {slot.proc.pid}"
            return None

        return [v for v in await asyncio.gather(*(one(s) for s in slots)) if v is not None]
