"""The supervisor: forks worker processes, restarts crashed ones with backoff, recycles ones over
budget, and drains the whole tree on SIGTERM/SIGINT.

The supervisor process imports the user's modules before forking and never runs an event loop, opens
a Redis connection or starts a thread (its HTTP endpoint is served from the main loop), so each child
starts clean. Once a stop is requested no worker is started again. A worker whose status file goes
stale (its event loop is blocked) is killed and restarted. Children ask the kernel to send them
SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so a SIGKILLed supervisor leaves no worker behind.
With ``--dashboard-port`` the web dashboard is one more child process (see ``dashboard``), stopped
first on a drain.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ..embedded import EmbeddedServer
from .child import RECYCLE, child_entry
from .config import SupervisorConfig
from .dashboard import DashboardProcess
from .http import StatusServer

log = logging.getLogger("redflow.supervisor")

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0


@dataclass(slots=True)
class Slot:
    index: int
    pid: int | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    restarts: int = 0
    draining: bool = False  # we asked it to stop (memory budget): its exit is not a crash
    stale_kills: int = 0  # killed because its status went stale (blocked event loop)


class Supervisor:
    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.slots = [Slot(i) for i in range(config.procs)]
        self.status_dir = Path(tempfile.mkdtemp(prefix="redflow-status-"))
        self.metrics_dir = self.status_dir / "metrics"
        self.metrics_dir.mkdir()
        # Worker processes record Prometheus samples here (see redflow.observability).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        self.url = config.url or ""
        self.embedded: EmbeddedServer | None = None
        self._stopping = False
        self._leader: str | None = None
        self._http: StatusServer | None = None
        self._dashboard = DashboardProcess(config) if config.dashboard_port is not None else None

    # --- lifecycle ------------------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            if not self.url:
                self.embedded = EmbeddedServer(
                    data_dir=self.config.data_dir, appendonly=True, die_with_parent=True
                ).start()
                self.url = self.embedded.url
                log.info("no Redis URL given: started embedded Valkey at %s (data in %s)", self.url,
                         self.config.data_dir)
            if self.config.http_port is not None:
                self._http = StatusServer(self, self.config.http_port)
            if self._dashboard is not None:
                self._dashboard.start(self.url)
            log.info("supervisor %d starting %d worker process(es)", os.getpid(), len(self.slots))
            for slot in self.slots:
                self._spawn(slot)
            while not self._stopping:
                self._wait(0.2)
                self._reap_children()
                self._kill_stale()
                self._enforce_memory_budget()
                self._restart_due()
                self._watch_leader()
                self._watch_embedded()
                if self._dashboard is not None:
                    self._dashboard.poll(self._stopping)
            return self._shutdown()
        finally:
            if self._dashboard is not None:
                self._dashboard.kill()
            if self._http is not None:
                self._http.stop()
            if self.embedded is not None:
                self.embedded.stop()
            shutil.rmtree(self.status_dir, ignore_errors=True)

    def _wait(self, seconds: float) -> None:
        """Sleep, answering HTTP requests meanwhile (served here, never from a thread)."""
        if self._http is None:
            time.sleep(seconds)
        else:
            self._http.serve_for(seconds)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self._stopping:
            log.info("supervisor received %s: draining", signal.Signals(signum).name)
        self._stopping = True

    def _shutdown(self) -> int:
        alive = [s for s in self.slots if s.pid is not None]
        for slot in alive:
            _signal(slot.pid, signal.SIGTERM)
        if self._dashboard is not None:
            self._dashboard.stop()
        deadline = time.monotonic() + self.config.grace_period_s + 10
        while time.monotonic() < deadline and (any(s.pid is not None for s in self.slots) or (
                self._dashboard is not None and self._dashboard.running)):
            self._wait(0.05)
            self._reap_children()
            if self._dashboard is not None:
                self._dashboard.poll(stopping=True)
        for slot in self.slots:
            if slot.pid is not None:
                log.error("worker process %d did not drain in time: killing it", slot.pid)
                _signal(slot.pid, signal.SIGKILL)
        self._reap_children(block=True)
        log.info("supervisor %d stopped", os.getpid())
        return 0

    # --- children ---------------------------------------------------------------------------------------
    def _spawn(self, slot: Slot) -> None:
        if self._stopping:
            return  # a stop was requested: no new worker (it could take the leadership and be killed)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            child_entry(self.config, self.url, slot.index, self.status_dir, parent)
        slot.pid = pid
        slot.started_at = time.monotonic()
        slot.draining = False
        log.info("worker process %d started (slot %d)", pid, slot.index)

    def _reap_children(self, block: bool = False) -> None:
        for slot in self.slots:
            if slot.pid is None:
                continue
            try:
                pid, status = os.waitpid(slot.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status = slot.pid, 0
            if pid == 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            uptime = time.monotonic() - slot.started_at
            (self.status_dir / f"worker-{slot.pid}.json").unlink(missing_ok=True)
            _mark_dead(slot.pid)
            slot.pid = None
            if self._stopping:
                continue
            slot.restarts += 1
            if code == RECYCLE or (code == 0 and slot.draining):
                log.info("worker process %d recycled (exit %d); replacing it", pid, code)
                slot.failures, slot.restart_at = 0, 0.0
                continue
            if uptime > STABLE_AFTER_S:
                slot.failures = 0
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**slot.failures)
            slot.failures += 1
            slot.restart_at = time.monotonic() + delay
            log.error("worker process %d exited with %s; restarting in %.1fs", pid, _describe(code), delay)

    def _kill_stale(self) -> None:
        """Kill a worker whose status is stale: its event loop is blocked (a handler called
        time.sleep, a C call hangs), so it is not working even though the process is alive."""
        now = time.time()
        by_pid = {int(s.get("pid", 0)): s for s in self.worker_statuses()}
        for slot in self.slots:
            if slot.pid is None or slot.draining or time.monotonic() - slot.started_at < self.config.stale_after_s:
                continue
            status = by_pid.get(slot.pid)
            age = now - float(status.get("ts", 0)) if status else None
            if age is None or age > self.config.stale_after_s:
                log.error("worker process %d reported no status for %s: its event loop is blocked; killing it",
                          slot.pid, "ever" if age is None else f"{age:.1f}s")
                _signal(slot.pid, signal.SIGKILL)
                slot.stale_kills += 1

    def _restart_due(self) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid is None and now >= slot.restart_at:
                self._spawn(slot)

    def _enforce_memory_budget(self) -> None:
        limit = self.config.max_memory_mb
        if limit is None:
            return
        for slot in self.slots:
            if slot.pid is None or slot.draining:
                continue
            try:
                rss_mb = psutil.Process(slot.pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
            if rss_mb > limit:
                log.warning("worker process %d uses %.0f MB (> %d MB): draining and replacing it", slot.pid,
                            rss_mb, limit)
                slot.draining = True
                _signal(slot.pid, signal.SIGTERM)

    def _watch_embedded(self) -> None:
        """Restart the embedded server if it died; its AOF on disk brings the data back."""
        server = self.embedded
        if server is None or server.process is None or server.process.poll() is None:
            return
        log.error("embedded server exited (code %s); restarting it on port %d", server.process.returncode, server.port)
        try:
            server.start()
        except Exception as exc:  # retried on the next pass
            log.error("embedded server failed to restart: %s", exc)

    # --- status ---------------------------------------------------------------------------------------------
    def worker_statuses(self) -> list[dict[str, Any]]:
        statuses = []
        for path in self.status_dir.glob("worker-*.json"):
            try:
                statuses.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return statuses

    def _watch_leader(self) -> None:
        leaders = [s["leader_value"] for s in self.worker_statuses() if s.get("leader")]
        leader = leaders[0] if leaders else None
        if leader != self._leader:
            self._leader = leader
            if leader:
                log.info("this supervisor's worker leads the deployment: %s", leader)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def starting(self) -> bool:
        """Some worker process started recently enough that it may not have reported yet."""
        now = time.monotonic()
        return any(s.pid is not None and now - s.started_at < self.config.stale_after_s for s in self.slots)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _signal(pid: int | None, sig: signal.Signals) -> None:
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
