"""The invariant checker of the chaos tests: reads every run the server keeps and the execution logs
the step bodies wrote (see workload.py), and returns the counts table and the violations.

Invariants (a violation fails the test):
- lost 0: every enqueued run exists (except runs a data loss took after the client was told, which
  the test lists in ``Harness.lost_allowed`` and counts) and is terminal; stuck 0: no run left
  scheduled/queued/running, all of them terminal within the stated bound after the faults stop;
- each run ends as designed: the driver's canceled runs canceled (unless the cancel itself was lost
  with the server's data), the others succeeded or failed as their workflow does;
- duplicated 0: no step body started after the execution whose output the server recorded had
  returned (that record was already durable, so a replay must have read it), except a body started
  by a worker just woken by SIGCONT (a zombie: its record is refused by the fence, counted apart);
- every recorded output was produced by a logged execution;
- on_failure never for a canceled or succeeded run, at least once for a failed one, and more than
  once only when a fault hit while the first call was in flight, or a data loss came between (an
  orphan's drain is no such fault: it lets the hook finish).

Re-executions that the at-least-once contract allows (the worker died, lost its lease or its
connection, or the server lost the record) are counted and reported, split by cause.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redflow.ids import run_id_time_ms

from .harness import (
    CONNECTION_FAULTS,
    DATA_LOSS,
    LEASE_MS,
    SCALE,
    SEED,
    TERMINAL,
    WORKER_FAULTS,
    Harness,
)
from .workload import DESIGNED_STATUS, STEP_NAMES


@dataclass
class Exec:
    pid: int
    start: float
    end: float | None = None
    token: str | None = None
    raised: bool = False


@dataclass
class Report:
    table: list[tuple[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


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


async def check(h: Harness, kinds: list[str]) -> Report:
    """Read everything back and check it; ``kinds`` are the fault kinds the table lists."""
    assert h.client is not None
    client = h.client
    report = Report()
    violations, counts = report.violations, report.counts
    headers = await h.all_headers()
    execs, hooks = read_logs(h.logs)
    step_outputs: dict[str, dict[str, Any]] = {}
    ids = list(headers)
    for i in range(0, len(ids), 200):
        chunk = ids[i:i + 200]
        got = await asyncio.gather(*(h.retry("steps", client.get_run_steps, r) for r in chunk))
        for run_id, steps in zip(chunk, got, strict=True):
            step_outputs[run_id] = {s["name"]: s.get("output") for s in steps if s.get("status") == "succeeded"}
    data_loss_times = [f.lost_data_at for f in h.faults if f.kind in DATA_LOSS]
    conts: dict[int, list[float]] = defaultdict(list)
    for f in h.faults:
        if f.kind == "worker_stop":
            for pid in f.pids:
                conts[pid].append(f.end)
    fault_times = sorted(f.start for f in h.faults)

    report.lost = [r for r in h.top_ids if r not in headers and r not in h.lost_allowed]
    report.stuck = [r for r, hd in headers.items() if hd.status not in TERMINAL]
    for run_id, hd in headers.items():
        wf = hd.workflow
        top = run_id in h.workflow_of
        counts[f"status {hd.status}"] += 1
        if top and wf != h.workflow_of[run_id]:
            violations.append(f"run {run_id}: workflow {wf}, enqueued as {h.workflow_of[run_id]}")
        # Designed outcome.
        if hd.status in TERMINAL:
            parent = headers.get(hd.parent_id) if hd.parent_id else None
            canceled_by_driver = h.cancel_result.get(run_id) is True
            expected = {DESIGNED_STATUS[wf]}
            if canceled_by_driver or (parent is not None and parent.status == "canceled"):
                expected = {"canceled"}
            if top and wf == "chaos-cancel" and not canceled_by_driver:
                expected = {"canceled"}
            if run_id in h.cancel_result and not canceled_by_driver:
                expected |= {DESIGNED_STATUS[wf], "canceled"}  # it had ended (or its cancel was lost) first
            if hd.status not in expected:
                if canceled_by_driver and data_loss_times and h.cancel_at[run_id] < data_loss_times[-1] + 1:
                    counts["cancel lost with the server's data"] += 1
                else:
                    violations.append(f"run {run_id} ({wf}): ended {hd.status}, expected {sorted(expected)}; "
                                      f"driver cancel {h.cancel_result.get(run_id)}, attempt {hd.attempt}")
            designed_attempts = 2 if wf in ("chaos-retry", "chaos-fail") else 1
            if hd.attempt > designed_attempts:
                counts["extra attempts (a Redis error failed an attempt)"] += hd.attempt - designed_attempts
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
            elif any(pid in f.pids and f.start >= start and (end is None or f.start <= end + 1)
                     for f in h.faults) or any(
                    f.kind in CONNECTION_FAULTS and start - 0.1 <= f.start <= (end or start) + 2 for f in h.faults):
                counts["on_failure re-run: its worker died or was cut off inside it"] += 1
            else:
                counts["on_failure repeated without a fault"] += 1
                violations.append(f"run {run_id} ({wf}): on_failure ran again at {nxt[0]:.3f} (pid {nxt[2]}) "
                                  f"after pid {pid} ran it at {start:.3f}-{end}, no fault in between")
    # The index and the running counts agree with the headers, whatever faults landed between the
    # writes of a transition: every run not running has its two members, and each workflow's running
    # count is the number of its running runs.
    # Each partition keeps its own counts and index, of its own runs.
    for k in await h.partitions():
        mine = {r: hd for r, hd in headers.items() if r.endswith("-" + k.partition)}
        running = Counter(hd.workflow for hd in mine.values() if hd.status == "running")
        flat = await h.retry("running counts", client.redis.execute, "HGETALL", k.running)
        counted = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        if counted != dict(running):
            violations.append(f"{k.partition}: running counts {counted} disagree with the headers' {dict(running)}")
        members = int(await h.retry("index size", client.redis.execute, "ZCARD", k.index))
        if members != 2 * (len(mine) - sum(running.values())):
            violations.append(f"{k.partition}: the index has {members} members for {len(mine)} runs, "
                              f"{sum(running.values())} of them running")
    known = set(headers)
    orphans = {r for (r, _s) in execs if r not in known}
    if orphans and not data_loss_times:
        violations.append(f"{len(orphans)} runs executed that the server does not know: {sorted(orphans)[:5]}")

    # Recovery after each worker fault: interrupted executions taken over how long after the fault.
    takeovers: list[tuple[float, str, str]] = []
    for f in h.faults:
        if f.kind not in WORKER_FAULTS or not f.pids:
            continue
        for (run_id, _step), runs_of in execs.items():
            for e in runs_of:
                if e.pid in f.pids and e.start <= f.start and (e.end is None or e.end > f.start):
                    hd = headers.get(run_id)
                    if hd is None:
                        continue
                    later = [x.start for s in STEP_NAMES[hd.workflow] for x in execs.get((run_id, s), [])
                             if x.pid not in f.pids and x.start > f.start]
                    if hd.finished_at_ms:
                        later.append(hd.finished_at_ms / 1000)
                    # A run sent back to an older state by a data loss waits its turn in the backlog.
                    if later and not any(f.start <= t <= min(later) for t in data_loss_times):
                        takeovers.append((min(later) - f.start, run_id, f.kind))
    worst = max(takeovers, default=(0.0, "-", "-"))

    by_kind = Counter(f.kind for f in h.faults)
    restores = [f.start for f in h.faults if f.kind == "server_rdb_restore"]
    report.table = [
        ("runs (enqueued)", len(h.top_ids)),
        ("runs (with children)", len(headers)),
        *((f"faults: {k}", by_kind[k]) for k in kinds),
        ("lost", len(report.lost)),
        ("stuck", len(report.stuck)),
        ("duplicated (recorded steps re-executed)", counts["duplicated (recorded steps re-executed)"]),
        *((k, v) for k, v in sorted(counts.items()) if k != "duplicated (recorded steps re-executed)"),
        ("executions of step bodies", sum(len(v) for v in execs.values())),
        ("runs executed then lost with the server's data", len(orphans)),
        *([("runs on the server created between the snapshot and its restore", sum(
            1 for r in headers if h.snapshot_at < run_id_time_ms(r) / 1000 < max(restores)))]
          if h.snapshot_at is not None and restores else []),
        *h.extra_rows,
        ("chaos phase (s)", round(h.faults_stopped - h.chaos_started, 1)),
        ("recovery after the last fault (s)", round(h.recovery_s, 1)),
        ("stated bound (s)", round(h.bound_s, 1)),
        *([("worst takeover of a run interrupted by a worker fault (s)", round(worst[0], 2)),
           ("  (that run, fault)", f"{worst[1]} {worst[2]}")] if takeovers else []),
        ("total wall time (s)", round(time.monotonic() - h.started, 1)),
    ]
    return report


async def report_and_assert(h: Harness, report: Report, extra_violations: list[str] | None = None) -> None:
    """Print the counts table and what went wrong, then fail on any violation."""
    assert h.client is not None
    violations = report.violations + (extra_violations or [])
    print(f"\nchaos counts: {h.name} (seed {SEED}, scale {SCALE}, lease {LEASE_MS} ms):")
    for label, value in report.table:
        print(f"  {label:<66} {value}")
    for v in violations[:30]:
        print("  VIOLATION", v)
    headers = await h.all_headers() if report.stuck else {}
    for run_id in report.stuck[:10]:
        hd = headers.get(run_id)
        if hd is None:
            continue
        wait = await h.retry("wait", h.client.store.read_wait, run_id)
        print(f"  STUCK {run_id} {hd.workflow} {hd.status} attempt {hd.attempt} parent {hd.parent_id} "
              f"driver cancel {h.cancel_result.get(run_id)} wait {wait}")
    assert not report.lost, f"lost runs: {report.lost[:10]}"
    assert not report.stuck, f"stuck runs: {report.stuck[:10]}"
    assert h.all_terminal_at is not None and h.recovery_s <= h.bound_s, \
        f"recovery took {h.recovery_s:.1f}s, bound {h.bound_s:.1f}s"
    assert not violations, f"{len(violations)} violations, first: {violations[:5]}"
