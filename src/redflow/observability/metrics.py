"""Prometheus metrics of worker processes, merged by the supervisor (docs/observability.md).

Metrics are recorded only when ``PROMETHEUS_MULTIPROC_DIR`` is set (the supervisor sets it before it
forks): each worker writes its samples to files there and the supervisor's /metrics endpoint merges
them. A worker started on its own (start_worker in an application or a test) records nothing and pays
nothing. Labels are bounded: workflow, queue, status, outcome, decision; never a run id.
"""

from __future__ import annotations

import os
from typing import Any

_metrics: dict[str, Any] | None = None
_enabled: bool | None = None  # decided once per process, on first use (after the supervisor's fork)

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    return _enabled


def _create() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "runs": Counter("redflow_runs_total", "Run events by workflow: started (first start only), resumed "
                        "(claimed again: after a wait, a retry delay, a hand-back), succeeded, failed, retried, "
                        "canceled, suspended, deferred", ["workflow", "outcome"]),
        "run_seconds": Histogram("redflow_run_duration_seconds", "Run duration, from its first start to its "
                                 "end (waits and retries included)", ["workflow"], buckets=BUCKETS),
        "execution_seconds": Histogram("redflow_execution_duration_seconds", "One execution on a worker, from "
                                       "claim to outcome (an attempt that waits has several)", ["workflow"],
                                       buckets=BUCKETS),
        "queue_wait_seconds": Histogram("redflow_queue_wait_seconds", "From the time a run became due "
                                        "(enqueued, or its wait or delay ended) to its claim", ["queue"],
                                        buckets=BUCKETS),
        "step_seconds": Histogram("redflow_step_duration_seconds", "step.run duration", ["workflow"],
                                  buckets=BUCKETS),
        "admission": Counter("redflow_admission_decisions_total", "Admission decisions that did not start a "
                             "run at once: held (mutex or max_concurrency), throttled, rate_limited",
                             ["decision"]),
        "recovered": Counter("redflow_runs_recovered_total", "Runs the leader took back from dead workers"),
        "cron": Counter("redflow_cron_slots_total", "Cron slots by outcome: fired, skipped", ["outcome"]),
        "inflight": Gauge("redflow_inflight_runs", "Runs executing now", multiprocess_mode="livesum"),
        "leader": Gauge("redflow_leader", "1 in the process that is the elected leader",
                        multiprocess_mode="livemax"),
        "backlog": Gauge("redflow_queue_backlog", "Runs waiting per queue (ready: claimable now; scheduled: "
                         "due later), sampled by the leader", ["queue", "state"], multiprocess_mode="livemax"),
        "oldest": Gauge("redflow_queue_oldest_ready_age_seconds", "Age of the oldest claimable run per "
                        "queue, sampled by the leader", ["queue"], multiprocess_mode="livemax"),
        "by_status": Gauge("redflow_runs_by_status", "Runs by status, sampled by the leader", ["status"],
                           multiprocess_mode="livemax"),
        "loop_lag": Gauge("redflow_event_loop_lag_seconds", "Event-loop lag of the worker process",
                          multiprocess_mode="livemax"),
        "redis_rtt": Gauge("redflow_redis_roundtrip_seconds", "Latest heartbeat round trip to Redis",
                           multiprocess_mode="livemax"),
    }


def metrics() -> dict[str, Any] | None:
    """The metric objects, created on first use; None when metrics are off."""
    global _metrics
    if not enabled():
        return None
    if _metrics is None:
        _metrics = _create()
        for decision in ("held", "throttled", "rate_limited"):  # every series exists from the start
            _metrics["admission"].labels(decision)
        for outcome in ("fired", "skipped"):
            _metrics["cron"].labels(outcome)
    return _metrics


def count_run(workflow: str, outcome: str, duration_s: float | None = None) -> None:
    """One run event; ``duration_s`` (an execution's duration) is observed with it."""
    m = metrics()
    if m is None:
        return
    m["runs"].labels(workflow, outcome).inc()
    if duration_s is not None:
        m["execution_seconds"].labels(workflow).observe(duration_s)


def observe(name: str, value: float, *labels: str) -> None:
    """Observe a histogram, or increment a counter by ``value``."""
    m = metrics()
    if m is None:
        return
    metric = m[name].labels(*labels) if labels else m[name]
    if hasattr(metric, "observe"):
        metric.observe(value)
    else:
        metric.inc(value)


def observe_step(workflow: str, duration_s: float) -> None:
    observe("step_seconds", duration_s, workflow)


def set_gauge(name: str, value: float, *labels: str) -> None:
    m = metrics()
    if m is not None:
        gauge = m[name].labels(*labels) if labels else m[name]
        gauge.set(value)
