"""The supervisor's dashboard (``--dashboard-port``): one forked child process serving the web
dashboard, restarted with backoff when it dies, stopped first when the supervisor drains.

It is a process of its own, not a thread, because the supervisor forks its workers and must hold no
threads or event loop when it does; the child runs uvicorn on its own event loop and Redis client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

from .config import SupervisorConfig

log = logging.getLogger("redflow.supervisor")

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0
STOP_TIMEOUT_S = 10.0


class DashboardProcess:
    def __init__(self, config: SupervisorConfig) -> None:
        assert config.dashboard_port is not None
        self.config = config
        self.pid: int | None = None
        self.url = ""
        self._started_at = 0.0
        self._failures = 0
        self._restart_at = 0.0
        self._stop_sent_at: float | None = None

    @property
    def address(self) -> str:
        host = self.config.dashboard_host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.config.dashboard_port}/"

    def start(self, url: str) -> None:
        self.url = url
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            _child_entry(self.config, url, parent)
        self.pid = pid
        self._started_at = time.monotonic()
        log.info("dashboard process %d serving %s", pid, self.address)

    def poll(self, stopping: bool) -> None:
        """Reap the process if it exited; restart it with backoff unless the supervisor stops."""
        if self.pid is not None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid == 0:
                if self._stop_sent_at is not None and time.monotonic() - self._stop_sent_at > STOP_TIMEOUT_S:
                    log.error("dashboard process %d did not stop in time: killing it", self.pid)
                    _signal(self.pid, signal.SIGKILL)
                return
            code = os.waitstatus_to_exitcode(status)
            self.pid = None
            if stopping:
                return
            if time.monotonic() - self._started_at > STABLE_AFTER_S:
                self._failures = 0
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**self._failures)
            self._failures += 1
            self._restart_at = time.monotonic() + delay
            log.error("dashboard process %d exited with code %d; restarting in %.1fs", pid, code, delay)
        elif not stopping and self.url and time.monotonic() >= self._restart_at:
            self.start(self.url)

    def stop(self) -> None:
        if self.pid is not None and self._stop_sent_at is None:
            _signal(self.pid, signal.SIGTERM)
            self._stop_sent_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.pid is not None

    def kill(self) -> None:
        """Last resort on the way out: no dashboard outlives its supervisor."""
        if self.pid is not None:
            _signal(self.pid, signal.SIGKILL)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = None


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _child_entry(config: SupervisorConfig, url: str, parent_pid: int) -> None:
    """Run in the forked child; never returns."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    code = 1
    try:
        from .child import die_with_parent

        die_with_parent(parent_pid)
        from ..dashboard.config import DashboardConfig
        from ..dashboard.server import serve

        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover - Windows
            pass
        assert config.dashboard_port is not None
        asyncio.run(serve(DashboardConfig(url=url, prefix=config.prefix, host=config.dashboard_host,
                                          port=config.dashboard_port, token=config.dashboard_token)))
        code = 0
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("dashboard process %d crashed", os.getpid())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
