"""Prometheus metrics of worker processes, aggregated by the supervisor.

Metrics are recorded only when ``PROMETHEUS_MULTIPROC_DIR`` is set (the supervisor sets it before it
forks): each worker writes its samples to files there and the supervisor's /metrics endpoint merges
them. A worker started on its own (start_worker in an application or a test) records nothing and pays
nothing.
"""

from __future__ import annotations

import os
from typing import Any

_metrics: dict[str, Any] | None = None
_enabled: bool | None = None  # decided once per process, on first use (after the supervisor's fork)


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    return _enabled


def metrics() -> dict[str, Any] | None:
    """The metric objects, created on first use; None when metrics are off."""
    global _metrics
    if not enabled():
        return None
    if _metrics is None:
        from prometheus_client import Counter, Gauge, Histogram

        buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
        _metrics = {
            "runs": Counter("redflow_runs_total", "Run outcomes by workflow: started, succeeded, failed, "
                            "retried, canceled, suspended", ["workflow", "outcome"]),
            "run_seconds": Histogram("redflow_run_duration_seconds", "Attempt duration, from claim to outcome",
                                     ["workflow"], buckets=buckets),
            "step_seconds": Histogram("redflow_step_duration_seconds", "step.run duration", ["workflow"],
                                      buckets=buckets),
            "inflight": Gauge("redflow_inflight_runs", "Runs executing now", multiprocess_mode="livesum"),
            "leader": Gauge("redflow_leader", "1 in the process that is the elected leader",
                            multiprocess_mode="livemax"),
            "backlog": Gauge("redflow_queue_backlog", "Runs waiting per queue (ready: claimable now; scheduled: "
                             "due later), sampled by the leader", ["queue", "state"], multiprocess_mode="livemax"),
            "oldest": Gauge("redflow_queue_oldest_ready_age_seconds", "Age of the oldest claimable run per "
                            "queue, sampled by the leader", ["queue"], multiprocess_mode="livemax"),
            "loop_lag": Gauge("redflow_event_loop_lag_seconds", "Event-loop lag of the worker process",
                              multiprocess_mode="livemax"),
            "redis_rtt": Gauge("redflow_redis_roundtrip_seconds", "Latest heartbeat round trip to Redis",
                               multiprocess_mode="livemax"),
        }
    return _metrics


def count_run(workflow: str, outcome: str, duration_s: float | None = None) -> None:
    m = metrics()
    if m is None:
        return
    m["runs"].labels(workflow, outcome).inc()
    if duration_s is not None:
        m["run_seconds"].labels(workflow).observe(duration_s)


def observe_step(workflow: str, duration_s: float) -> None:
    m = metrics()
    if m is not None:
        m["step_seconds"].labels(workflow).observe(duration_s)


def set_gauge(name: str, value: float, *labels: str) -> None:
    m = metrics()
    if m is not None:
        gauge = m[name].labels(*labels) if labels else m[name]
        gauge.set(value)
