"""The chaos run (issue 10, item 6): a mixed workload drains while workers, connections and the server fail.

One test, with its own server (AOF, ``appendfsync everysec``; never the session server), its own
FaultProxy and three worker processes of tests/chaos/workload.py (one connected directly, two through
the proxy). It enqueues ``2000 x REDFLOW_CHAOS_SCALE`` runs, then, while they drain, injects seeded
faults: SIGKILL a random worker and the leader (each restarted), SIGSTOP a worker past its lease then
SIGCONT, cut and freeze every proxied connection, SIGKILL the server and restart it from its AOF on
the same port, and once restart it from an RDB snapshot taken earlier (every write since is lost).
After the last fault it waits, with a deadline, until every run is terminal, then checks every run
against the execution logs the step bodies wrote (see workload.py) and prints a counts table.

Invariants (a violation fails the test):
- lost 0: every enqueued run exists and is terminal; stuck 0: no run left scheduled/queued/running,
  and all of them terminal within the stated bound after the faults stop (2 leases + a reaper
  interval + the time to drain what was left at the throughput measured under faults, x3, + 10 s);
- each run ends as designed: the driver's canceled runs canceled (unless the cancel itself was lost
  with the server's data), the others succeeded or failed as their workflow does;
- duplicated 0: no step body started after the execution whose output the server recorded had
  returned (that record was already durable, so a replay must have read it), except a body started
  by a worker just woken by SIGCONT (a zombie: its record is refused by the fence, counted apart);
- every recorded output was produced by a logged execution;
- on_failure never for a canceled or succeeded run, at least once for a failed one, and more than
  once only when a fault hit while the first call was in flight.

Re-executions that the at-least-once contract allows (the worker died, lost its lease or its
connection, or the server lost the record) are counted and reported, split by cause.

Environment: REDFLOW_CHAOS_SCALE (default 1), REDFLOW_CHAOS_SEED (default 20240610),
REDFLOW_CHAOS_WORKERS (default 3). Run: ``.venv/bin/pytest -q tests/chaos/test_workload.py -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from redflow import create_client
from redflow._redis.errors import RedisError
from redflow.client import RedflowClient
from redflow.embedded import EmbeddedServer
from redflow.ids import run_id_time_ms
from redflow.storage.records import decode_header

from ..conftest import wait_until
from .proxy import FaultProxy
from .workload import DESIGNED_STATUS, EVENT, STEP_NAMES, registry

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("REDFLOW_CHAOS_SCALE", "1"))
SEED = int(os.environ.get("REDFLOW_CHAOS_SEED", "20240610"))
N_WORKERS = int(os.environ.get("REDFLOW_CHAOS_WORKERS", "3"))
RUNS = max(200, int(2000 * SCALE))
LEASE_MS = 1500
REAPER_MS = 500
CONCURRENCY = 4
STEP_MS = 60  # mean duration of a step body: the drain lasts about as long as the faults
COMMAND_TIMEOUT_MS = 1500
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# Per 100 runs.
MIX = {"chaos-steps": 34, "chaos-sleep": 14, "chaos-event": 14, "chaos-parent": 10, "chaos-retry": 12,
       "chaos-fail": 6, "chaos-cancel": 10}
DATA_LOSS = ("server_kill_aof", "server_rdb_restore")


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0
    pid: int | None = None
    detail: str = ""


@dataclass
class Slot:
    index: int
    via_proxy: bool
    proc: asyncio.subprocess.Process | None = None
    pids: list[int] = field(default_factory=list)


@dataclass
class Exec:
    pid: int
    start: float
    end: float | None = None
    token: str | None = None
    raised: bool = False


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.server = EmbeddedServer(data_dir=tmp / "server", appendonly=True,
                                     extra_args=["--appendfsync", "everysec"])
        self.prefix = f"chaos:{SEED}"
        self.proxy: FaultProxy | None = None
        self.slots: list[Slot] = []
        self.faults: list[Fault] = []
        self.client: RedflowClient | None = None
        self.spawned = 0

    # --- processes ----------------------------------------------------------------------------------
    async def start_server(self) -> None:
        await asyncio.to_thread(self.server.start, 30.0)

    async def spawn(self, slot: Slot, deadline_s: float = 60.0) -> None:
        """Start the slot's worker; retried while the server is down (the worker exits at start then)."""
        assert self.proxy is not None
        url = self.proxy.url if slot.via_proxy else self.server.url
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["REDFLOW_COMMAND_TIMEOUT_MS"] = str(COMMAND_TIMEOUT_MS)
        env["CHAOS_STEP_MS"] = str(STEP_MS)
        give_up = time.monotonic() + deadline_s
        while True:
            self.spawned += 1
            err = open(self.logs / f"worker-{slot.index}-{self.spawned}.err", "wb")  # noqa: ASYNC230
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.chaos.workload", url, self.prefix, str(self.logs), str(CONCURRENCY),
                str(LEASE_MS), cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=err,
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
            await asyncio.sleep(0.5)

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

    # --- driver commands that survive a server restart ---------------------------------------------
    async def retry(self, what: str, fn: Any, *args: Any, deadline_s: float = 60.0, **kwargs: Any) -> Any:
        give_up = time.monotonic() + deadline_s
        delay = 0.05
        while True:
            try:
                return await fn(*args, **kwargs)
            except (RedisError, OSError) as exc:
                if time.monotonic() > give_up:
                    raise AssertionError(f"driver: {what} kept failing for {deadline_s}s: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def redis(self, *args: Any) -> Any:
        assert self.client is not None
        return await self.retry(args[0], self.client.redis.execute, *args)

    async def persisted(self, *fields: str) -> None:
        async def done() -> bool:
            info = await self.redis("INFO", "persistence")
            return all(f.encode() in info for f in fields)

        await wait_until(done, timeout_s=30, interval_s=0.05, what=f"INFO persistence {fields}")

    async def all_headers(self) -> dict[str, Any]:
        assert self.client is not None
        out: dict[str, Any] = {}
        cursor = b"0"
        while True:
            cursor, items = await self.redis("HSCAN", self.client.keys.runs, cursor, "COUNT", 2000)
            for i in range(0, len(items), 2):
                out[items[i].decode()] = decode_header(items[i + 1])
            if cursor in (b"0", 0, "0"):
                return out

    async def statuses(self, ids: list[str]) -> list[str | None]:
        assert self.client is not None
        out: list[str | None] = []
        for i in range(0, len(ids), 2000):
            raw = await self.redis("HMGET", self.client.keys.runs, *ids[i:i + 2000])
            out += [None if r is None else decode_header(r).status for r in raw]
        return out


def read_logs(logs: Path) -> tuple[dict[tuple[str, str], list[Exec]], dict[str, list[tuple[float, float | None, int]]]]:
    """(run, step) -> executions in start order; run -> on_failure calls (start, end, pid)."""
    execs: dict[tuple[str, str], list[Exec]] = defaultdict(list)
    hooks: dict[str, list[tuple[float, float | None, int]]] = defaultdict(list)
    open_exec: dict[tuple[int, str, str], Exec] = {}
    open_hook: dict[tuple[int, str], int] = {}
    for path in sorted(logs.glob("exec-*.log")):
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) != 6:
                continue  # a line cut by SIGKILL mid-write cannot happen with one write(), but be safe
            phase, run_id, step, token, ts, pid_s = parts
            t, pid = float(ts), int(pid_s)
            if phase == "start":
                ex = Exec(pid=pid, start=t)
                execs[(run_id, step)].append(ex)
                open_exec[(pid, run_id, step)] = ex
            elif phase in ("end", "raise"):
                ex = open_exec.pop((pid, run_id, step))
                ex.end, ex.raised, ex.token = t, phase == "raise", token if phase == "end" else None
            elif phase == "hook-start":
                hooks[run_id].append((t, None, pid))
                open_hook[(pid, run_id)] = len(hooks[run_id]) - 1
            elif phase == "hook-end":
                i = open_hook.pop((pid, run_id))
                hooks[run_id][i] = (hooks[run_id][i][0], t, pid)
    for v in execs.values():
        v.sort(key=lambda e: e.start)
    for calls in hooks.values():
        calls.sort()
    return execs, hooks


TIMEOUT_S = 900 if SCALE > 1 else 400


@pytest.mark.timeout(TIMEOUT_S)
async def test_chaos_workload(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    h = Harness(tmp_path)
    await h.start_server()
    h.proxy = await FaultProxy("127.0.0.1", h.server.port).start()
    h.client = create_client(url=h.server.url, prefix=h.prefix)
    h.client.registry = registry
    client = h.client
    t0 = time.monotonic()
    try:
        h.slots = [Slot(i, via_proxy=i > 0) for i in range(N_WORKERS)]
        await asyncio.gather(*(h.spawn(s) for s in h.slots))

        # --- the workload ---------------------------------------------------------------------------
        plan: list[str] = []
        for name, share in MIX.items():
            plan += [name] * max(1, RUNS * share // 100)
        rng.shuffle(plan)
        workflow_of: dict[str, str] = {}
        for start in range(0, len(plan), 50):  # batches of 50 in plan order: the queue mixes every workflow
            by_wf: dict[str, list[Any]] = defaultdict(list)
            for i in range(start, min(start + 50, len(plan))):
                name = plan[i]
                by_wf[name].append({"i": i, "nap_ms": rng.randint(100, 500)} if name == "chaos-sleep" else {"i": i})
            for name, inputs in by_wf.items():
                for handle in await client.enqueue_many(registry.get(name), inputs):  # type: ignore[arg-type]
                    workflow_of[handle.id] = name
        top_ids = list(workflow_of)
        event_runs = [r for r, w in workflow_of.items() if w == "chaos-event"]
        cancel_targets = [r for r, w in workflow_of.items() if w == "chaos-cancel"]
        random_cancels = rng.sample([r for r, w in workflow_of.items() if w in ("chaos-steps", "chaos-parent")],
                                    k=max(1, RUNS // 50))
        print(f"\nenqueued {len(top_ids)} runs in {time.monotonic() - t0:.1f}s", flush=True)

        async def emit_events(ids: list[str]) -> None:
            for run_id in ids:
                await h.retry("emit", client.emit_event, EVENT, {"for": run_id}, correlation_key=run_id,
                              event_id=f"ping-{run_id}")

        await emit_events(event_runs)
        # The RDB snapshot every later write is lost from: all runs exist in it, none has finished much.
        await h.redis("BGSAVE")
        snapshot_at = time.time()
        await h.persisted("rdb_bgsave_in_progress:0")

        # --- cancels, spread over the chaos phase -----------------------------------------------------
        cancel_result: dict[str, bool] = {}  # True once a cancel_run of the driver returned True
        cancel_at: dict[str, float] = {}
        stop_cancels = asyncio.Event()

        async def cancel_one(run_id: str) -> None:
            ok = await h.retry("cancel", client.cancel_run, run_id, reason="chaos driver")
            if not ok:
                # False also answers a retry whose first try was applied (its reply lost to a fault).
                ok = (await h.statuses([run_id]))[0] == "canceled"
            if ok or run_id not in cancel_result:  # False after a True: the cancel already applied
                cancel_result[run_id] = ok
                cancel_at[run_id] = time.time()

        async def canceler() -> None:
            todo = cancel_targets + random_cancels
            rng.shuffle(todo)
            for run_id in todo:
                await cancel_one(run_id)
                if not stop_cancels.is_set():
                    await asyncio.sleep(rng.random() * 0.02)

        cancels = asyncio.ensure_future(canceler())

        # --- faults -------------------------------------------------------------------------------------
        kinds = ["worker_kill", "leader_kill", "worker_stop", "proxy_cut", "proxy_freeze", "server_kill_aof"]
        rounds = max(3, round(2 * SCALE))
        schedule = [k for _ in range(rounds) for k in rng.sample(kinds, len(kinds))]
        schedule.insert(len(schedule) // 2, "server_rdb_restore")
        live = {s.index: s for s in h.slots}

        async def leader_pid() -> int | None:
            raw = await h.redis("GET", client.keys.leader)
            if not raw:
                return None
            return int(raw.decode().split(":")[1])

        async def server_restarted(kind: str) -> None:
            # A client that knows the server may have lost writes re-sends what it cannot lose.
            for run_id, ok in list(cancel_result.items()):
                if ok:
                    await cancel_one(run_id)
            statuses = await h.statuses(event_runs)
            await emit_events([r for r, s in zip(event_runs, statuses, strict=True) if s not in TERMINAL])

        done_before = 0
        chaos_started = time.monotonic()
        wall_started = time.time()
        for kind in schedule:
            await asyncio.sleep(0.2 + rng.random() * 0.5)
            fault = Fault(kind, time.time())
            if kind in ("worker_kill", "leader_kill", "worker_stop"):
                slot = rng.choice(list(live.values()))
                if kind == "leader_kill":
                    pid = await leader_pid()
                    slot = next((s for s in h.slots if s.proc is not None and s.proc.pid == pid), slot)
                assert slot.proc is not None
                fault.pid = slot.proc.pid
                if kind == "worker_stop":
                    slot.proc.send_signal(signal.SIGSTOP)
                    await asyncio.sleep(LEASE_MS * 2 / 1000 + REAPER_MS / 1000)
                    slot.proc.send_signal(signal.SIGCONT)
                else:
                    slot.proc.kill()
                    await slot.proc.wait()
                    await h.spawn(slot)
                    fault.detail = f"restarted as {slot.proc.pid}"
            elif kind == "proxy_cut":
                fault.detail = f"{h.proxy.cut()} connections"
            elif kind == "proxy_freeze":
                fault.detail = f"{h.proxy.freeze()} connections"
            elif kind == "server_kill_aof":
                h.server.kill()
                await asyncio.sleep(0.2)
                await h.start_server()
                await server_restarted(kind)
            elif kind == "server_rdb_restore":
                h.server.kill()
                shutil.rmtree(h.server.data_dir / "appendonlydir", ignore_errors=True)
                h.server.appendonly = False  # load dump.rdb (taken after the enqueue), then turn AOF back on
                await h.start_server()
                h.server.appendonly = True
                await h.redis("CONFIG", "SET", "appendonly", "yes")
                await h.persisted("aof_enabled:1", "aof_rewrite_in_progress:0", "aof_rewrite_scheduled:0")
                await server_restarted(kind)
            fault.end = time.time()
            h.faults.append(fault)
            statuses = await h.statuses(top_ids)
            done = sum(1 for s in statuses if s in TERMINAL)
            print(f"  t={fault.start - wall_started:6.1f}s {kind:<19} {fault.detail:<22} "
                  f"terminal {done}/{len(top_ids)} (+{done - done_before})", flush=True)
            done_before = done
        faults_stopped = time.monotonic()
        chaos_throughput = max(done_before, 1) / (faults_stopped - chaos_started)
        stop_cancels.set()
        await cancels

        # --- drain --------------------------------------------------------------------------------------
        remaining = len(top_ids) - done_before
        bound_s = 2 * LEASE_MS / 1000 + REAPER_MS / 1000 + 3 * remaining / chaos_throughput + 10
        all_terminal_at: float | None = None
        # Past the bound, wait a little to tell slow from stuck, but report before the pytest timeout.
        hard_deadline = min(faults_stopped + bound_s + 60, t0 + TIMEOUT_S - 90)
        while time.monotonic() < hard_deadline:
            headers = await h.all_headers()
            if all(hd.status in TERMINAL for hd in headers.values()) and all(r in headers for r in top_ids):
                all_terminal_at = time.monotonic()
                break
            await asyncio.sleep(0.25)
        recovery_s = (all_terminal_at or time.monotonic()) - faults_stopped
        await h.stop_workers()

        # --- the checker ----------------------------------------------------------------------------
        headers = await h.all_headers()
        execs, hooks = read_logs(h.logs)
        step_outputs: dict[str, dict[str, Any]] = {}
        ids = list(headers)
        for i in range(0, len(ids), 200):
            chunk = ids[i:i + 200]
            got = await asyncio.gather(*(h.retry("steps", client.get_run_steps, r) for r in chunk))
            for run_id, steps in zip(chunk, got, strict=True):
                step_outputs[run_id] = {s["name"]: s.get("output") for s in steps if s.get("status") == "succeeded"}
        data_loss_times = [f.start for f in h.faults if f.kind in DATA_LOSS]
        conts = defaultdict(list)
        for f in h.faults:
            if f.kind == "worker_stop" and f.pid is not None:
                conts[f.pid].append(f.end)
        fault_times = sorted(f.start for f in h.faults)

        violations: list[str] = []
        counts: Counter[str] = Counter()
        lost = [r for r in top_ids if r not in headers]
        stuck = [r for r, hd in headers.items() if hd.status not in TERMINAL]
        for run_id, hd in headers.items():
            wf = hd.workflow
            top = run_id in workflow_of
            counts[f"status {hd.status}"] += 1
            if top and wf != workflow_of[run_id]:
                violations.append(f"run {run_id}: workflow {wf}, enqueued as {workflow_of[run_id]}")
            # Designed outcome.
            if hd.status in TERMINAL:
                parent = headers.get(hd.parent_id) if hd.parent_id else None
                canceled_by_driver = cancel_result.get(run_id) is True
                expected = {DESIGNED_STATUS[wf]}
                if canceled_by_driver or (parent is not None and parent.status == "canceled"):
                    expected = {"canceled"}
                if top and wf == "chaos-cancel" and not canceled_by_driver:
                    expected = {"canceled"}
                if run_id in cancel_result and not canceled_by_driver:
                    expected |= {DESIGNED_STATUS[wf], "canceled"}  # it had ended (or its cancel was lost) first
                if hd.status not in expected:
                    if canceled_by_driver and data_loss_times and cancel_at[run_id] < data_loss_times[-1] + 1:
                        counts["cancel lost with the server's data"] += 1
                    else:
                        violations.append(f"run {run_id} ({wf}): ended {hd.status}, expected {sorted(expected)}; "
                                          f"driver cancel {cancel_result.get(run_id)}, attempt {hd.attempt}")
                if hd.attempt > (2 if wf in ("chaos-retry", "chaos-fail") else 1):
                    counts["extra attempts (a Redis error failed an attempt)"] += hd.attempt - (
                        2 if wf in ("chaos-retry", "chaos-fail") else 1)
            # Steps.
            recorded = step_outputs.get(run_id, {})
            for step in STEP_NAMES[wf]:
                runs_of = execs.get((run_id, step), [])
                designed_raises = sum(1 for e in runs_of if e.raised)
                token = recorded.get(step)
                if token is None:
                    if hd.status == "succeeded":
                        violations.append(f"run {run_id} ({wf}) succeeded without a record of step {step}")
                    continue
                rec = next((e for e in runs_of if e.token == token), None)
                if rec is None:
                    violations.append(f"run {run_id} step {step}: recorded output {token!r} matches no execution")
                    continue
                assert rec.end is not None
                extra = len(runs_of) - 1 - designed_raises
                for e in runs_of:
                    if e is rec or e.raised:
                        continue
                    if e.start > rec.end:
                        if any(c <= e.start <= c + LEASE_MS / 1000 for c in conts.get(e.pid, [])):
                            counts["zombie starts after SIGCONT (fenced)"] += 1
                        else:
                            counts["duplicated (recorded steps re-executed)"] += 1
                            violations.append(
                                f"DUPLICATE run {run_id} ({wf}) step {step}: pid {e.pid} started it at "
                                f"{e.start:.3f}, after pid {rec.pid}'s execution recorded {token} ended at "
                                f"{rec.end:.3f}")
                    elif any(e.start - 0.1 <= t <= rec.start for t in data_loss_times):
                        counts["re-run after data loss"] += 1
                    else:
                        counts["re-run after a worker/connection fault (at-least-once)"] += 1
                faults_near = sum(1 for t in fault_times if runs_of[0].start - LEASE_MS / 1000 <= t <= rec.end)
                if extra > faults_near:
                    counts["re-runs beyond one per fault in their window"] += extra - faults_near
            # on_failure.
            calls = hooks.get(run_id, [])
            if calls and hd.status != "failed":
                violations.append(f"run {run_id} ({wf}) ended {hd.status} but on_failure ran {len(calls)}x")
            if hd.status == "failed" and not calls:
                violations.append(f"run {run_id} ({wf}) failed but on_failure never ran")
            for prev, nxt in itertools.pairwise(calls):
                start, end, pid = prev
                if any(start <= t <= nxt[0] for t in data_loss_times):
                    counts["on_failure re-run after data loss"] += 1
                elif any(f.pid == pid and f.start >= start and (end is None or f.start <= end + 1)
                         for f in h.faults) or any(
                        f.kind in ("proxy_cut", "proxy_freeze") and start - 0.1 <= f.start <= (end or start) + 2
                        for f in h.faults):
                    counts["on_failure re-run: its worker died or was cut off inside it"] += 1
                else:
                    counts["on_failure repeated without a fault"] += 1
                    violations.append(f"run {run_id} ({wf}): on_failure ran again at {nxt[0]:.3f} (pid {nxt[2]}) "
                                      f"after pid {pid} ran it at {start:.3f}-{end}, no fault in between")
        known = set(headers)
        orphans = {r for (r, _s) in execs if r not in known}
        if orphans and not data_loss_times:
            violations.append(f"{len(orphans)} runs executed that the server does not know: {sorted(orphans)[:5]}")

        # Recovery after each worker fault: interrupted executions taken over how long after the fault.
        takeovers: list[float] = []
        for f in h.faults:
            if f.kind not in ("worker_kill", "leader_kill", "worker_stop") or f.pid is None:
                continue
            for (run_id, _step), runs_of in execs.items():
                for e in runs_of:
                    if e.pid == f.pid and e.start <= f.start and (e.end is None or e.end > f.start):
                        hd = headers.get(run_id)
                        if hd is None:
                            continue
                        later = [x.start for s in STEP_NAMES[hd.workflow] for x in execs.get((run_id, s), [])
                                 if x.pid != f.pid and x.start > f.start]
                        if hd.finished_at_ms:
                            later.append(hd.finished_at_ms / 1000)
                        # A run sent back to an older state by a data loss waits its turn in the backlog.
                        if later and not any(f.start <= t <= min(later) for t in data_loss_times):
                            takeovers.append((min(later) - f.start, run_id, f.kind))
        worst = max(takeovers, default=(0.0, "-", "-"))
        worst_takeover = worst[0]

        by_kind = Counter(f.kind for f in h.faults)
        table = [
            ("runs (enqueued)", len(top_ids)),
            ("runs (with children)", len(headers)),
            *((f"faults: {k}", by_kind[k]) for k in [*kinds, "server_rdb_restore"]),
            ("lost", len(lost)),
            ("stuck", len(stuck)),
            ("duplicated (recorded steps re-executed)", counts["duplicated (recorded steps re-executed)"]),
            *((k, v) for k, v in sorted(counts.items()) if k != "duplicated (recorded steps re-executed)"),
            ("executions of step bodies", sum(len(v) for v in execs.values())),
            ("runs executed then lost with the server's data", len(orphans)),
            ("runs on the server created between the snapshot and its restore", sum(
                1 for r in headers if data_loss_times and snapshot_at < run_id_time_ms(r) / 1000 < max(
                    f.start for f in h.faults if f.kind == "server_rdb_restore"))),
            ("chaos phase (s)", round(faults_stopped - chaos_started, 1)),
            ("recovery after the last fault (s)", round(recovery_s, 1)),
            ("stated bound (s)", round(bound_s, 1)),
            ("worst takeover of a run interrupted by a worker fault (s)", round(worst_takeover, 2)),
            ("  (that run, fault)", f"{worst[1]} {worst[2]}"),
            ("total wall time (s)", round(time.monotonic() - t0, 1)),
        ]
        print(f"\nchaos counts (seed {SEED}, scale {SCALE}, {N_WORKERS} workers, lease {LEASE_MS} ms):")
        for label, value in table:
            print(f"  {label:<66} {value}")
        for v in violations[:30]:
            print("  VIOLATION", v)
        for run_id in stuck[:10]:
            hd = headers[run_id]
            wait = await h.retry("wait", client.store.read_wait, run_id)
            print(f"  STUCK {run_id} {hd.workflow} {hd.status} attempt {hd.attempt} parent {hd.parent_id} "
                  f"driver cancel {cancel_result.get(run_id)} steps {sorted(step_outputs.get(run_id, {}))} "
                  f"wait {wait}")
        assert not lost, f"lost runs: {lost[:10]}"
        assert not stuck, f"stuck runs: {[(r, headers[r].status) for r in stuck[:10]]}"
        assert all_terminal_at is not None and recovery_s <= bound_s, \
            f"recovery took {recovery_s:.1f}s, bound {bound_s:.1f}s"
        assert not violations, f"{len(violations)} violations, first: {violations[:5]}"
    finally:
        await h.stop_workers()
        await client.close()
        await h.proxy.close()
        h.server.stop()
