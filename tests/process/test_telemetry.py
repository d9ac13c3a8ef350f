"""Telemetry as operators scrape it (issue 13): honest run counters, durations, and a blocked worker
that the supervisor reports stale, from a real supervisor's /metrics."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from redflow import RedflowClient
from redflow.embedded import free_port

from ..conftest import wait_until
from .supervised import Start, _fetch_text, _workers


async def _families(port: int) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    text = await asyncio.to_thread(_fetch_text, port, "/metrics")
    return {f.name: f for f in text_string_to_metric_families(text)}


def _runs(families: dict[str, Any], workflow: str) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for s in families["redflow_runs"].samples
            if s.name == "redflow_runs_total" and s.labels["workflow"] == workflow}


async def test_started_counts_first_starts_only_and_durations_span_the_run(
    client: RedflowClient, start_supervisor: Start
) -> None:
    port = free_port()
    sup = start_supervisor("--procs", "2", "--http-port", str(port))
    await _workers(sup, 2)
    handles = [await client.run_by_name("sup-sleepy-retry", None) for _ in range(8)]
    assert await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles)) == [2] * 8

    async def counted() -> dict[str, Any] | None:
        families = await _families(port)
        return families if _runs(families, "sup-sleepy-retry").get("succeeded") == 8 else None

    families = await wait_until(counted, timeout_s=20, what="8 successes counted")
    runs = _runs(families, "sup-sleepy-retry")
    # Each run: first start, sleeps (suspended), wakes (resumed), fails (retried), retried attempt (resumed).
    assert runs["started"] == 8, runs
    assert runs["resumed"] == 16 and runs["retried"] == 8 and runs["suspended"] == 8, runs

    def count(family: str, label: str, value: str) -> float:
        return next(s.value for s in families[family].samples
                    if s.name == f"{family}_count" and s.labels.get(label) == value)

    assert count("redflow_run_duration_seconds", "workflow", "sup-sleepy-retry") == 8  # one per run end
    assert count("redflow_execution_duration_seconds", "workflow", "sup-sleepy-retry") == 24  # 3 per run
    assert count("redflow_queue_wait_seconds", "queue", "default") >= 24
    async def sampled_successes() -> bool:  # the gauge is sampled periodically, so it may lag the counters
        by_status = await _sampled_status(port)
        return by_status is not None and by_status.get("succeeded", 0) >= 8

    await wait_until(sampled_successes, timeout_s=20, what="8 successes sampled by status")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0


async def _sampled_status(port: int) -> dict[str, float] | None:
    families = await _families(port)
    family = families.get("redflow_runs_by_status")
    if family is None or not family.samples:
        return None
    return {s.labels["status"]: s.value for s in family.samples}


async def test_a_blocked_worker_is_reported_stale(client: RedflowClient, start_supervisor: Start) -> None:
    port = free_port()
    sup = start_supervisor("--procs", "1", "--http-port", str(port), "--stale-after", "60")
    await _workers(sup, 1)

    async def gauge(name: str) -> float | None:
        families = await _families(port)
        family = families.get(name)
        return None if family is None or not family.samples else family.samples[0].value

    assert await wait_until(lambda: _equals(gauge("redflow_worker_stale"), 0.0), timeout_s=20, what="fresh")
    assert (await gauge("redflow_worker_resident_memory_bytes") or 0) > 10 * 2**20
    await client.run_by_name("sup-block", None)  # its handler calls time.sleep(60): the event loop stops
    await wait_until(lambda: _equals(gauge("redflow_worker_stale"), 1.0), timeout_s=20, what="reported stale")
    assert (await gauge("redflow_worker_status_age_seconds") or 0) > 1.0
    sup.send_signal(signal.SIGKILL)
    sup.wait(timeout=30)


async def test_a_metrics_file_being_created_does_not_fail_the_scrape(
    client: RedflowClient, start_supervisor: Start
) -> None:
    """A worker's multiprocess file is empty for a moment when the worker first records a kind of
    metric; a scrape landing then still answers, with every other sample (it failed with the
    connection closed and no response)."""
    port = free_port()
    sup = start_supervisor("--procs", "1", "--http-port", str(port))
    (worker,) = await _workers(sup, 1)
    handle = await client.run_by_name("sup-plain", None)
    assert (await handle.result(timeout_ms=20_000))["pid"] == worker.pid
    mapped = [Path(m.path) for m in worker.memory_maps() if m.path.endswith(".db")]  # the worker's metric files
    assert mapped, "the worker maps no metric file"
    metrics_dir = mapped[0].parent
    (metrics_dir / "histogram_4194304.db").touch()  # created, not yet sized: no header to read
    (metrics_dir / "counter_4194305.db").write_bytes(b"\x10\x00\x00\x00")  # shorter than its header
    families = await _families(port)
    assert families["redflow_worker_processes"].samples[0].value == 1
    assert "redflow_runs" in families, sorted(families)
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0


async def _equals(value: Any, expected: float) -> bool:
    return await value == expected
