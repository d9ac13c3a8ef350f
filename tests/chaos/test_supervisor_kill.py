"""The chaos run under the production process model (issue 10, item 6): SIGKILL of the supervisor.

``python -m redflow.supervisor --procs 3 --import tests.chaos.supervised`` runs the chaos workload
(workload.py's workflows, concurrency 4 per process, lease 1.5 s) against the test's own server, and
while ``2000 x REDFLOW_CHAOS_SCALE`` runs drain, the supervisor is killed, seeded, in three ways:

- ``supervisor_kill``: SIGKILL; once every orphaned worker process is gone, a new supervisor starts;
- ``supervisor_kill_restart_at_once``: SIGKILL, and a new supervisor starts at once, beside the
  orphans (what a process manager that restarts on exit does);
- ``supervisor_term_then_kill``: SIGTERM (the drain begins), then SIGKILL 0.1 s later (a stop whose
  grace period was far too short).

What happens (checked, not assumed): each worker process asked the kernel for SIGTERM when its parent
dies (PR_SET_PDEATHSIG in supervisor/child.py), so the orphans drain like after a SIGTERM: they stop
claiming, finish what they run within the grace period, hand the rest back, and exit. The test fails
if an orphan outlives its supervisor by more than the grace period + 10 s, and then checks every run
(checker.py): each ends exactly once, no recorded step runs again, nothing is stuck after the last
supervisor started. It also counts the step bodies orphans started while draining, the runs they
first started more than 1 s after their supervisor died (claimed after it, most likely: counted, not
an error, since the checker covers whatever they do), and the status directories killed supervisors
leave behind.

The last test shows that a supervisor SIGKILLed while it runs its embedded server leaves nothing
behind (no ``--url``): the server gets SIGTERM when its supervisor dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from redflow.embedded import free_port

from ..conftest import wait_until
from .checker import check, read_logs, report_and_assert
from .harness import CONCURRENCY, LEASE_MS, ROOT, SCALE, Fault, Harness, chaos_server

RUNS = max(200, int(2000 * SCALE))
PROCS = 3
GRACE_S = 5.0
KINDS = ["supervisor_kill", "supervisor_kill_restart_at_once", "supervisor_term_then_kill"]
TIMEOUT_S = 1200 if SCALE > 1 else 300


class Supervisor:
    """One ``python -m redflow.supervisor`` process of the test, and the worker processes it forked."""

    def __init__(self, h: Harness, url: str | None, index: int, *, extra: list[str] | None = None) -> None:
        self.h = h
        self.url = url
        self.index = index
        self.port = free_port()
        self.extra = extra or []
        self.proc: asyncio.subprocess.Process | None = None
        self.children: list[psutil.Process] = []

    async def start(self) -> Supervisor:
        env = self.h.worker_env()
        env["TMPDIR"] = str(self.h.tmp / "supervisor-tmp")  # where its status directory goes
        (self.h.tmp / "supervisor-tmp").mkdir(exist_ok=True)
        args = ["--procs", str(PROCS), "--import", "tests.chaos.supervised", "--prefix", self.h.prefix,
                "--app", "chaos", "--concurrency", str(CONCURRENCY), "--lease-ms", str(LEASE_MS),
                "--grace-period", str(GRACE_S), "--http-port", str(self.port), "--log-level", "WARNING",
                *(["--url", self.url] if self.url else []), *self.extra]
        err = open(self.h.logs / f"supervisor-{self.index}.err", "wb")  # noqa: ASYNC230
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "redflow.supervisor", *args, cwd=ROOT, env=env, stderr=err)
        err.close()
        await wait_until(self.ready, timeout_s=60, interval_s=0.1, what=f"supervisor {self.index} /readyz 200")
        self.children = psutil.Process(self.proc.pid).children()
        return self

    async def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"supervisor {self.index} exited with {self.proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 5)
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
        return b" 200 " in status

    def refresh_children(self) -> list[psutil.Process]:
        assert self.proc is not None
        self.children = psutil.Process(self.proc.pid).children()
        return self.children

    async def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), GRACE_S + 20)
        except TimeoutError:
            await self.kill()


def gone(proc: psutil.Process) -> bool:
    """Exited (reaped, or a zombie nobody reaps: an orphan's new parent may never wait for it)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(procs: list[psutil.Process], deadline_s: float) -> float:
    """Seconds until every process has exited; raises past the deadline, naming the survivors."""
    start = time.monotonic()
    try:
        await wait_until(lambda: all(gone(p) for p in procs), timeout_s=deadline_s, interval_s=0.05,
                         what="the orphaned worker processes to exit")
    except AssertionError:
        alive = [p.pid for p in procs if not gone(p)]
        raise AssertionError(f"worker processes {alive} still run {deadline_s}s after their supervisor died") from None
    return time.monotonic() - start


@pytest.mark.timeout(TIMEOUT_S)
async def test_chaos_supervisor_kill(tmp_path: Path) -> None:
    h = Harness(tmp_path, name="supervisor_kill", runs=RUNS)
    server = chaos_server(tmp_path / "server")
    await asyncio.to_thread(server.start, 30.0)
    client = h.connect(server.url)
    supervisors: list[Supervisor] = []
    orphan_lifetimes: list[float] = []
    ready_after: list[float] = []
    try:
        current = await Supervisor(h, server.url, 0).start()
        supervisors.append(current)
        await h.enqueue_workload()
        h.start_cancels()
        rounds = max(2, round(2 * SCALE))
        schedule = [k for _ in range(rounds) for k in h.rng.sample(KINDS, len(KINDS))]

        async def inject(fault: Fault) -> None:
            nonlocal current
            orphans = current.refresh_children()
            fault.pids = [p.pid for p in orphans]
            assert current.proc is not None
            if fault.kind == "supervisor_term_then_kill":
                current.proc.terminate()
                await asyncio.sleep(0.1)  # the fault: a stop whose grace period is far too short
            was_running = current.proc.returncode is None
            died = time.monotonic()
            await current.kill()
            successor = Supervisor(h, server.url, len(supervisors))
            supervisors.append(successor)
            if fault.kind == "supervisor_kill_restart_at_once":
                lifetime, _ = await asyncio.gather(wait_gone(orphans, GRACE_S + 10), successor.start())
            else:
                lifetime = await wait_gone(orphans, GRACE_S + 10)
                await successor.start()
            ready_after.append(time.monotonic() - died)
            orphan_lifetimes.append(lifetime)
            current = successor
            fault.detail = f"orphans gone after {lifetime:.1f}s" + ("" if was_running else " (had exited)")

        await h.run_faults(schedule, inject, pause=(0.5, 2.0))
        await h.drain(TIMEOUT_S)
        await current.stop()

        execs, _hooks = read_logs(h.logs)
        started_draining = 0
        claimed_after: set[str] = set()
        first_by_pid: dict[tuple[str, int], float] = defaultdict(lambda: float("inf"))
        for (run_id, _step), runs_of in execs.items():
            for e in runs_of:
                first_by_pid[(run_id, e.pid)] = min(first_by_pid[(run_id, e.pid)], e.start)
        for f in h.faults:
            for runs_of in execs.values():
                started_draining += sum(1 for e in runs_of if e.pid in f.pids and e.start > f.start)
            claimed_after |= {r for (r, pid), t in first_by_pid.items() if pid in f.pids and t > f.start + 1.0}
        leftovers = list((tmp_path / "supervisor-tmp").glob("redflow-status-*"))
        h.extra_rows += [
            ("supervisors started", len(supervisors)),
            ("worker processes orphaned", sum(len(f.pids) for f in h.faults)),
            ("orphans still running after grace + 10 s", 0),  # wait_gone fails the test otherwise
            ("slowest orphan to exit after its supervisor died (s)", round(max(orphan_lifetimes, default=0), 2)),
            ("slowest new supervisor ready after a kill (s)", round(max(ready_after, default=0), 2)),
            ("step bodies orphans started while draining", started_draining),
            ("runs orphans claimed more than 1 s after their supervisor died", len(claimed_after)),
            ("status directories left behind by killed supervisors", len(leftovers)),
        ]
        report = await check(h, KINDS)
        await report_and_assert(h, report)
    finally:
        for sup in supervisors:
            await sup.stop()
            for child in sup.children:  # only if a failure left one behind
                if not gone(child):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
        await client.close()
        server.stop()


@pytest.mark.timeout(90)
async def test_the_embedded_server_does_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    h = Harness(tmp_path, name="embedded", runs=0)
    sup = Supervisor(h, None, 0, extra=["--data-dir", str(tmp_path / "data")])
    await sup.start()
    servers = [c for c in sup.children if "server" in c.name()]
    workers = [c for c in sup.children if c not in servers]
    assert len(servers) == 1 and len(workers) == PROCS
    try:
        await sup.kill()
        await wait_gone(workers, GRACE_S + 10)  # the worker processes do exit (PR_SET_PDEATHSIG)
        await wait_gone(servers, 5)  # the embedded server does not
    finally:
        for proc in servers:
            if not gone(proc):
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGKILL)

