"""Validation of StartWorkerOptions into the settings a worker runs with."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import ConfigurationError
from ..types import StartWorkerOptions


@dataclass(slots=True)
class WorkerSettings:
    queues: list[str]
    concurrency: int
    lease_ms: int
    leader_lease_ms: int
    heartbeat_interval_s: float
    block_timeout_s: float
    watchdog_slack_s: float
    reaper_batch_size: int
    cleanup_interval_s: float
    cleanup_batch_size: int
    grace_period_ms: int
    max_recoveries: int
    claim_batch_size: int
    claim_threshold: int
    promote_batch: int


def _positive(name: str, value: object, minimum: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
        raise ConfigurationError(f"StartWorkerOptions.{name} must be a number >= {minimum}, got {value!r}")


def resolve_settings(options: StartWorkerOptions) -> WorkerSettings:
    if not isinstance(options.app, str):
        raise ConfigurationError(f"StartWorkerOptions.app must be a string, got {options.app!r}")
    _positive("concurrency", options.concurrency, 1)
    _positive("lease_ms", options.lease_ms, 300)
    _positive("blmove_timeout_sec", options.blmove_timeout_sec, 0.1)
    _positive("reaper_batch_size", options.reaper_batch_size, 1)
    _positive("watchdog_stalled_for_ms", options.watchdog_stalled_for_ms, 1000)
    _positive("run_history_cleanup_interval_ms", options.run_history_cleanup_interval_ms, 1000)
    _positive("grace_period_ms", options.grace_period_ms, 0)
    _positive("max_recoveries", options.max_recoveries, 1)
    _positive("claim_batch_size", options.claim_batch_size, 1)
    if options.queues is not None:
        # An empty list is a worker that claims nothing: it registers its registry and takes part in
        # leader duties (cron, recovery, retention) only.
        if not isinstance(options.queues, list | tuple) or not all(isinstance(q, str) and q for q in options.queues):
            raise ConfigurationError(f"StartWorkerOptions.queues must be non-empty strings, got {options.queues!r}")
    if options.watchdog_interval_ms is not None:
        warnings.warn(
            "StartWorkerOptions.watchdog_interval_ms has no effect: the watchdog is a deadline on each "
            "blocking wait (blmove_timeout_sec + watchdog_stalled_for_ms), not a polling loop",
            stacklevel=3,
        )
    if options.registry_recovery_interval_ms is not None:
        warnings.warn(
            "StartWorkerOptions.registry_recovery_interval_ms has no effect: workers publish workflow "
            "metadata at start and no worker ever deletes another's, so there is nothing to recover",
            stacklevel=3,
        )
    heartbeat_s = options.lease_ms / 3000
    if options.reaper_interval_ms is not None:
        # The leader reaps from its heartbeat; a shorter reaper interval makes it beat more often.
        _positive("reaper_interval_ms", options.reaper_interval_ms, 50)
        heartbeat_s = min(heartbeat_s, options.reaper_interval_ms / 1000)
    concurrency = int(options.concurrency)
    batch = int(options.claim_batch_size)
    return WorkerSettings(
        queues=list(options.queues) if options.queues is not None else [],
        concurrency=concurrency,
        lease_ms=int(options.lease_ms),
        leader_lease_ms=int(options.lease_ms),
        heartbeat_interval_s=heartbeat_s,
        block_timeout_s=float(options.blmove_timeout_sec),
        watchdog_slack_s=(options.watchdog_stalled_for_ms / 1000) if options.watchdog_enabled else 3600.0,
        reaper_batch_size=int(options.reaper_batch_size),
        cleanup_interval_s=options.run_history_cleanup_interval_ms / 1000,
        cleanup_batch_size=500,
        grace_period_ms=int(options.grace_period_ms),
        max_recoveries=int(options.max_recoveries),
        claim_batch_size=batch,
        claim_threshold=max(1, min(batch, concurrency) // 4),
        promote_batch=100,
    )
