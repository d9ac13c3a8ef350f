"""Supervisor options: command line, with an environment variable behind each option."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigurationError


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    for path in ("/sys/fs/cgroup/cpu.max",):
        try:
            quota, period = Path(path).read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            cpus = min(cpus, max(1, quota_us // period_us))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


@dataclass(slots=True)
class SupervisorConfig:
    procs: int
    imports: list[str]
    url: str | None
    prefix: str | None
    app: str
    queues: list[str] | None
    concurrency: int
    max_memory_mb: int | None
    max_runs_per_proc: int | None
    grace_period_s: float
    http_port: int | None
    log_level: str
    log_format: str
    data_dir: Path
    lease_ms: int = 5000
    stale_after_s: float = 10.0  # a worker whose status is older than this is blocked: killed, restarted
    dashboard_port: int | None = None  # serve the web dashboard from a child process on this port
    dashboard_host: str = "127.0.0.1"
    dashboard_token: str | None = None  # REDFLOW_DASHBOARD_TOKEN: required off loopback


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redflow supervisor",
        description="Run redflow worker processes: forks, watches, restarts and drains them.",
    )
    p.add_argument("--procs", type=int, default=_env("REDFLOW_PROCS"),
                   help="worker processes (env REDFLOW_PROCS; default: the CPUs this process may use)")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                   help="module that defines workflows; repeatable (env REDFLOW_IMPORT, comma-separated)")
    p.add_argument("--url", default=_env("REDIS_URL"),
                   help="Redis URL (env REDIS_URL); without one an embedded Valkey is started")
    p.add_argument("--prefix", default=_env("REDFLOW_PREFIX"), help="key prefix (env REDFLOW_PREFIX)")
    p.add_argument("--app", default=_env("REDFLOW_APP") or "redflow", help="app name (env REDFLOW_APP)")
    p.add_argument("--queues", default=_env("REDFLOW_QUEUES"),
                   help="comma-separated queues (env REDFLOW_QUEUES; default: the queues of the workflows)")
    p.add_argument("--concurrency", type=int, default=_env("REDFLOW_CONCURRENCY") or 100,
                   help="concurrent runs per process (env REDFLOW_CONCURRENCY; default 100)")
    p.add_argument("--max-memory-mb", type=int, default=_env("REDFLOW_MAX_MEMORY_MB"),
                   help="recycle a worker whose RSS exceeds this (env REDFLOW_MAX_MEMORY_MB)")
    p.add_argument("--max-runs-per-proc", type=int, default=_env("REDFLOW_MAX_RUNS_PER_PROC"),
                   help="recycle a worker after this many runs (env REDFLOW_MAX_RUNS_PER_PROC)")
    p.add_argument("--grace-period", type=float, default=_env("REDFLOW_GRACE_PERIOD") or 30.0,
                   help="seconds in-flight runs get to finish on shutdown (env REDFLOW_GRACE_PERIOD; default 30)")
    p.add_argument("--http-port", type=int, default=_env("REDFLOW_HTTP_PORT"),
                   help="serve /healthz and /readyz on this port (env REDFLOW_HTTP_PORT)")
    p.add_argument("--log-level", default=_env("REDFLOW_LOG_LEVEL") or "INFO",
                   help="DEBUG, INFO, WARNING or ERROR (env REDFLOW_LOG_LEVEL)")
    p.add_argument("--log-format", default=_env("REDFLOW_LOG_FORMAT") or "text",
                   help="text or json (env REDFLOW_LOG_FORMAT)")
    p.add_argument("--data-dir", default=_env("REDFLOW_DATA_DIR") or "redflow-data",
                   help="data directory of the embedded server (env REDFLOW_DATA_DIR)")
    p.add_argument("--lease-ms", type=int, default=_env("REDFLOW_LEASE_MS") or 5000,
                   help="worker liveness lease in ms (env REDFLOW_LEASE_MS; default 5000)")
    p.add_argument("--stale-after", type=float, default=_env("REDFLOW_STALE_AFTER") or 10.0,
                   help="seconds without a status from a worker process (its event loop is blocked) before it "
                        "is killed and restarted (env REDFLOW_STALE_AFTER; default 10)")
    p.add_argument("--dashboard-port", type=int, default=_env("REDFLOW_DASHBOARD_PORT"),
                   help="serve the web dashboard on this port from a child process (env REDFLOW_DASHBOARD_PORT; "
                        "needs the 'dashboard' extra)")
    p.add_argument("--dashboard-host", default=_env("REDFLOW_DASHBOARD_HOST") or "127.0.0.1",
                   help="address the dashboard listens on (env REDFLOW_DASHBOARD_HOST; default 127.0.0.1); any "
                        "other than loopback needs REDFLOW_DASHBOARD_TOKEN")
    return p


def _dashboard_options(port: int | None, host: str) -> tuple[int | None, str, str | None]:
    """Validated dashboard options: the token rule and the extra, checked before anything forks."""
    if port is None:
        return None, host, None
    from ..dashboard.config import DashboardConfig, check_config, missing_extra, token_from_env

    token = token_from_env()
    check_config(DashboardConfig(url=None, prefix=None, host=host, port=port, token=token))
    problem = missing_extra()
    if problem is not None:
        raise ConfigurationError(f"--dashboard-port: {problem}")
    return port, host, token


def parse_config(argv: list[str] | None = None) -> SupervisorConfig:
    """Parse and validate; raises ConfigurationError naming the bad option."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            raise
        raise ConfigurationError("invalid command line (see --help)") from exc

    def as_int(name: str, value: object, minimum: int) -> int:
        try:
            number = int(str(value))
        except ValueError:
            raise ConfigurationError(f"--{name} must be an integer, got {value!r}") from None
        if number < minimum:
            raise ConfigurationError(f"--{name} must be >= {minimum}, got {number}")
        return number

    imports = ns.imports if ns.imports is not None else [m for m in (_env("REDFLOW_IMPORT") or "").split(",") if m]
    if not imports:
        raise ConfigurationError("no workflow modules: pass --import MODULE (or set REDFLOW_IMPORT)")
    if ns.log_format not in ("text", "json"):
        raise ConfigurationError(f"--log-format must be 'text' or 'json', got {ns.log_format!r}")
    if str(ns.log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigurationError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {ns.log_level!r}")
    def as_seconds(name: str, value: object, minimum: float) -> float:
        try:
            number = float(str(value))
        except ValueError:
            raise ConfigurationError(f"--{name} must be a number of seconds, got {value!r}") from None
        if number < minimum:
            raise ConfigurationError(f"--{name} must be >= {minimum:g}, got {number:g}")
        return number

    grace = as_seconds("grace-period", ns.grace_period, 0)
    stale_after = as_seconds("stale-after", ns.stale_after, 1)
    queues = [q.strip() for q in ns.queues.split(",") if q.strip()] if ns.queues else None
    dashboard_port, dashboard_host, dashboard_token = _dashboard_options(
        None if ns.dashboard_port is None else as_int("dashboard-port", ns.dashboard_port, 0), ns.dashboard_host)
    return SupervisorConfig(
        procs=available_cpus() if ns.procs is None else as_int("procs", ns.procs, 1),
        imports=imports,
        url=ns.url,
        prefix=ns.prefix,
        app=ns.app,
        queues=queues,
        concurrency=as_int("concurrency", ns.concurrency, 1),
        max_memory_mb=None if ns.max_memory_mb is None else as_int("max-memory-mb", ns.max_memory_mb, 1),
        max_runs_per_proc=None if ns.max_runs_per_proc is None else as_int(
            "max-runs-per-proc", ns.max_runs_per_proc, 1),
        grace_period_s=grace,
        http_port=None if ns.http_port is None else as_int("http-port", ns.http_port, 0),
        log_level=str(ns.log_level).upper(),
        log_format=ns.log_format,
        data_dir=Path(ns.data_dir),
        lease_ms=as_int("lease-ms", ns.lease_ms, 300),
        stale_after_s=stale_after,
        dashboard_port=dashboard_port,
        dashboard_host=dashboard_host,
        dashboard_token=dashboard_token,
    )
