"""The benchmark harness keeps working: a tiny run against the session's server, without baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_harness_runs_every_redflow_scenario(redis_url: str, tmp_path: Path) -> None:
    argv = [
        sys.executable, "-m", "bench", "--url", redis_url, "--no-baselines", "--reps", "1", "--n", "200",
        "--serial-n", "100", "--batched-n", "200", "--latency-n", "20", "--idle-s", "1", "--cleanup-n", "300",
        "--timers-n", "300", "--out", str(tmp_path),
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "wall time" in proc.stdout

    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["systems"]["redflow"]["errors"] == []
    assert list(data["systems"]) == ["redflow"]
    assert data["meta"]["frozen_src"] and data["meta"]["src_digest"]
    medians = {r["metric"]: r["median"] for r in data["results"] if r["system"] == "redflow"}
    for metric in (
        "enqueue_serial_per_s", "enqueue_batched_per_s", "drain_per_s", "drain_3step_per_s", "latency_p50_ms",
        "latency_p99_ms", "server_cmds_per_run", "worker_cmds_per_run", "bytes_per_run", "idle_cmds_per_s",
        "sleep_lateness_p50_ms", "cancel_latency_p50_ms", "fanout_10_ms", "cleanup_runs_per_s",
        "supervisor_procs1_drain_per_s", "supervisor_procs2_drain_per_s", "timers_delayed_enqueue_per_s",
        "timers_bytes_per_delayed_run", "timers_bytes_per_sleeping_run", "timers_wake_p99_ms", "timers_sleepers",
    ):
        assert metric in medians, f"{metric} missing from {sorted(medians)}"
    assert all(r["git_sha"] and r["repetitions"] == 1 for r in data["results"])
    assert medians["drain_per_s"] > 0 and medians["latency_p50_ms"] > 0
    assert medians["worker_cmds_per_run"] < 10  # the hot path is a handful of commands per run, not dozens
    assert "| drain, echo workflow |" in (tmp_path / "latest.md").read_text()
