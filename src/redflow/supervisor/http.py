"""The supervisor's HTTP endpoint: /healthz, /readyz and /metrics, from the workers' status files.

It is served from the supervisor's main loop (never a thread: the supervisor forks) and reads only
files the workers write, so the supervisor still holds no event loop and no Redis connection. Only
workers whose status is fresh count: a worker with a blocked event loop stops refreshing it.
"""

from __future__ import annotations

import json
import logging
import selectors
import struct
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import Metric

    from .tree import Supervisor

log = logging.getLogger("redflow.supervisor")

FRESH_S = 5.0


REQUEST_TIMEOUT_S = 2.0  # a slow client cannot hold the supervisor's loop longer than this


class StatusServer:
    def __init__(self, supervisor: Supervisor, port: int) -> None:
        self.supervisor = supervisor
        handler = _handler_class(supervisor)
        self.httpd = HTTPServer(("0.0.0.0", port), handler)
        self.port = int(self.httpd.server_address[1])
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.httpd.socket, selectors.EVENT_READ)

    def serve_for(self, seconds: float) -> None:
        """Answer requests that arrive within ``seconds``, then return."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._selector.select(left):
                self.httpd.handle_request()

    def stop(self) -> None:
        self._selector.close()
        self.httpd.server_close()


def fresh_statuses(supervisor: Supervisor) -> list[dict[str, Any]]:
    now = time.time()
    return [s for s in supervisor.worker_statuses() if now - float(s.get("ts", 0)) < FRESH_S]


def readiness(supervisor: Supervisor) -> tuple[bool, dict[str, Any]]:
    fresh = fresh_statuses(supervisor)
    ready = (
        not supervisor.stopping
        and len(fresh) == len(supervisor.slots)
        and all(s.get("ready") for s in fresh)
    )
    leader = next((s.get("leader_value") for s in fresh if s.get("leader")), None)
    return ready, {"ready": ready, "workers": fresh, "expected_workers": len(supervisor.slots), "leader": leader}


class _WorkerSamples:
    """The samples of the workers' multiprocess files. A worker creates its file when it first
    records a kind of metric, and the file is empty or shorter than its header for a moment: such a
    file is left out of this scrape (the next one has it) rather than failing the whole response."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterable[Metric]:
        from prometheus_client import multiprocess

        files = sorted(str(f) for f in self.path.glob("*.db"))
        try:
            return list(multiprocess.MultiProcessCollector.merge(files))  # type: ignore[no-untyped-call]
        except (OSError, ValueError, struct.error):
            readable = [f for f in files if _readable(f)]
            return list(multiprocess.MultiProcessCollector.merge(readable))  # type: ignore[no-untyped-call]


def _readable(file: str) -> bool:
    from prometheus_client import multiprocess

    try:
        multiprocess.MultiProcessCollector.merge([file])  # type: ignore[no-untyped-call]
    except (OSError, ValueError, struct.error):
        return False
    return True


def metrics_text(supervisor: Supervisor) -> str:
    """The workers' Prometheus samples merged across processes, plus the supervisor's own."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(_WorkerSamples(supervisor.metrics_dir))
    merged = generate_latest(registry).decode()
    statuses = fresh_statuses(supervisor)
    lines = [
        "# HELP redflow_worker_processes Worker processes reporting a fresh status to this supervisor.",
        "# TYPE redflow_worker_processes gauge",
        f"redflow_worker_processes {len(statuses)}",
        "# HELP redflow_worker_stale_kills_total Worker processes killed because their status went stale.",
        "# TYPE redflow_worker_stale_kills_total counter",
        f"redflow_worker_stale_kills_total {sum(s.stale_kills for s in supervisor.slots)}",
        "# HELP redflow_worker_restarts_total Worker processes restarted or recycled.",
        "# TYPE redflow_worker_restarts_total counter",
        f"redflow_worker_restarts_total {sum(s.restarts for s in supervisor.slots)}",
    ]
    lines += _slot_lines(supervisor)
    return merged + "\n".join(lines) + "\n"


STATUS_INTERVAL_S = 0.5  # how often a worker process writes its status (supervisor.child)


def _slot_lines(supervisor: Supervisor) -> list[str]:
    """Per worker slot, measured by the supervisor itself (so a blocked worker cannot hide): the age
    of its last status, whether that is stale (older than two status intervals), and its RSS."""
    import psutil

    now = time.time()
    by_pid = {int(s.get("pid", 0)): s for s in supervisor.worker_statuses()}
    age, stale, rss = [], [], []
    for slot in supervisor.slots:
        if slot.pid is None:
            continue
        status = by_pid.get(slot.pid)
        seconds = now - float(status["ts"]) if status and "ts" in status else time.monotonic() - slot.started_at
        age.append(f'redflow_worker_status_age_seconds{{slot="{slot.index}"}} {max(0.0, seconds):.3f}')
        stale.append(f'redflow_worker_stale{{slot="{slot.index}"}} {int(seconds > 2 * STATUS_INTERVAL_S)}')
        try:
            rss.append(f'redflow_worker_resident_memory_bytes{{slot="{slot.index}"}} '
                       f"{psutil.Process(slot.pid).memory_info().rss}")
        except psutil.Error:
            pass
    return [
        "# HELP redflow_worker_status_age_seconds Seconds since each worker process last reported (its event "
        "loop turns at least every 0.5 s).",
        "# TYPE redflow_worker_status_age_seconds gauge", *age,
        "# HELP redflow_worker_stale 1 when a worker process has not reported for two status intervals.",
        "# TYPE redflow_worker_stale gauge", *stale,
        "# HELP redflow_worker_resident_memory_bytes Resident memory of each worker process.",
        "# TYPE redflow_worker_resident_memory_bytes gauge", *rss,
    ]


def _handler_class(supervisor: Supervisor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S

        def do_GET(self) -> None:
            try:
                self._route()
            except Exception:  # an answer, not a dropped connection a scraper cannot tell from a crash
                log.exception("the status endpoint failed to answer %s", self.path)
                self._send(500, {"error": f"internal error answering {self.path}"})

        def _route(self) -> None:
            if self.path == "/healthz":
                # Alive while some worker process turns its event loop (Redis being down does not count:
                # the workers retry; readiness says whether they work).
                alive = not supervisor.stopping and (bool(fresh_statuses(supervisor)) or supervisor.starting())
                self._send(200 if alive else 503, {"ok": alive})
            elif self.path == "/readyz":
                ready, body = readiness(supervisor)
                self._send(200 if ready else 503, body)
            elif self.path == "/metrics":
                payload = metrics_text(supervisor).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            else:
                self._send(404, {"error": "not found"})

        def _send(self, code: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler
