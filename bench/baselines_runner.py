"""Baseline systems: which venv, which driver script, which scenarios; one driver run per repetition."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .venvs import SPECS, Venv, clean_env, ensure_venv

DRIVERS = Path(__file__).resolve().parent / "baselines"


@dataclass(frozen=True)
class Baseline:
    name: str
    label: str
    venv: str
    driver: str
    scenarios: tuple[str, ...]
    args: tuple[str, ...] = ()
    n_scale: float = 1.0  # slow configurations drain fewer jobs (throughput is a rate either way)


BASELINES: tuple[Baseline, ...] = (
    Baseline(
        "redflow-0.1.9", "redflow 0.1.9 default (concurrency 1)", "redflow019", "redflow019_driver.py",
        ("enqueue_serial", "latency", "drain", "drain_3step", "idle"), ("--concurrency", "1"), n_scale=1 / 6,
    ),
    Baseline(
        "redflow-0.1.9-c100", "redflow 0.1.9 best (concurrency 100, max_concurrency 10000)", "redflow019",
        "redflow019_driver.py", ("latency", "drain", "drain_3step"),
        ("--concurrency", "100", "--max-concurrency", "10000"),
        n_scale=2 / 3,
    ),
    Baseline("saq", "SAQ (concurrency 100)", "saq", "saq_driver.py", ("enqueue_serial", "latency", "drain"),
             ("--concurrency", "100")),
    Baseline("arq", "arq (max_jobs 100)", "arq", "arq_driver.py", ("enqueue_serial", "latency", "drain"),
             ("--concurrency", "100")),
    Baseline("celery", "Celery (Redis broker, threads 100)", "celery", "celery_driver.py",
             ("enqueue_serial", "latency", "drain"), ("--concurrency", "100")),
    Baseline("bullmq", "BullMQ for Python (concurrency 100)", "bullmq", "bullmq_driver.py",
             ("enqueue_serial", "latency", "drain"), ("--concurrency", "100")),
    Baseline("raw", "raw Redis (EVALSHA return 1)", "raw", "raw_driver.py", ("raw", "redispy")),
)

# A redflow scenario selected with --only turns on these driver scenarios.
DRIVER_SCENARIOS = {
    "drain": ("drain", "raw", "redispy"),
    "drain_3step": ("drain_3step",),
    "enqueue_serial": ("enqueue_serial", "raw", "redispy"),
    "latency": ("latency", "raw"),
    "idle": ("idle",),
}


def selected_scenarios(baseline: Baseline, chosen: set[str] | None) -> list[str]:
    if chosen is None:
        return list(baseline.scenarios)
    wanted = {d for s in chosen for d in DRIVER_SCENARIOS.get(s, ())}
    return [s for s in baseline.scenarios if s in wanted]


def prepare(baselines: list[Baseline], log: Any = print) -> dict[str, Venv]:
    """Install (or reuse) the venv of each baseline; errors are kept in the Venv, not raised."""
    venvs: dict[str, Venv] = {}
    for b in baselines:
        if b.venv not in venvs:
            venvs[b.venv] = ensure_venv(SPECS[b.venv], log)
    return venvs


@dataclass
class DriverParams:
    n: int
    serial_n: int
    latency_n: int
    latency_budget_s: float
    idle_s: float


async def run_driver(
    baseline: Baseline, venv: Venv, url: str, scenarios: list[str], p: DriverParams, timeout_s: float
) -> tuple[dict[str, float], dict[str, str], str]:
    """One driver invocation: (metrics, errors by scenario, settings). Raises on a crash or time-out."""
    n = drain_n(baseline, p.n)
    argv = [
        str(venv.python), "-E", "-s", str(DRIVERS / baseline.driver), "run", "--url", url,
        "--tag", uuid.uuid4().hex[:10], "--scenarios", ",".join(scenarios), "--n", str(n),
        "--serial-n", str(p.serial_n), "--latency-n", str(p.latency_n),
        "--latency-budget-s", str(p.latency_budget_s), "--idle-s", str(p.idle_s), *baseline.args,
    ]

    def call() -> subprocess.CompletedProcess[str]:
        # cwd is the venv, the environment has no PYTHONPATH: nothing of this repository is importable
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=venv.path, env=clean_env())

    try:
        proc = await asyncio.to_thread(call)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"driver timed out after {timeout_s:.0f}s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            data = json.loads(line[7:])
            return data["metrics"], data["errors"], data["settings"]
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise RuntimeError(f"driver exited {proc.returncode} without a result: {tail}")


def drain_n(baseline: Baseline, n: int) -> int:
    return max(50, round(n * baseline.n_scale))
