"""Shared plumbing of the baseline drivers. Runs inside a baseline's own venv: stdlib + redis-py only.

A driver is ``python -E -s DRIVER.py run --url URL --tag TAG --scenarios a,b ...``; it prints one line
``RESULT <json>`` with ``{"metrics": {...}, "errors": {...}, "settings": ...}``. Its worker runs as a
child process (``DRIVER.py worker ...``) that prints ``ready <unix time>`` once it claims jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import redis

SCENARIOS = ("drain", "enqueue_serial", "latency", "idle")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("mode", choices=("run", "worker"))
    p.add_argument("--url", required=True)
    p.add_argument("--tag", required=True, help="unique name for this invocation's keys / queue")
    p.add_argument("--scenarios", default="drain,enqueue_serial,latency")
    p.add_argument("--n", type=int, default=1000, help="jobs drained")
    p.add_argument("--serial-n", type=int, default=1000, help="jobs enqueued one at a time")
    p.add_argument("--latency-n", type=int, default=200, help="enqueue->result samples")
    p.add_argument("--latency-budget-s", type=float, default=30.0, help="stop sampling latency after this")
    p.add_argument("--idle-s", type=float, default=5.0, help="idle window")
    p.add_argument("--concurrency", type=int, default=100)
    return p


class Meter:
    """INFO-based server measurements on a connection of its own, counting its own commands."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.own = 0

    def commands(self) -> int:
        info = self.r.info("commandstats")
        self.own += 1
        return sum(int(v["calls"]) for v in info.values())

    def used_memory(self) -> int:
        self.r.execute_command("MEMORY", "PURGE")
        self.own += 2
        return int(self.r.info("memory")["used_memory"])

    def exists_count(self, keys: list[str]) -> int:
        total = 0
        for i in range(0, len(keys), 500):
            total += int(self.r.exists(*keys[i : i + 500]))
            self.own += 1
        return total

    def delete_matching(self, pattern: str) -> None:
        batch: list[bytes] = []
        for key in self.r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                self.r.unlink(*batch)
                batch.clear()
        if batch:
            self.r.unlink(*batch)

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 500):
            self.r.unlink(*keys[i : i + 500])


class WorkerProcess:
    """A driver's worker mode as a child process; ``ready_ts`` is when it started claiming."""

    def __init__(self, argv: list[str], timeout_s: float = 60.0) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-E", "-s", *argv], stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.ready_ts = 0.0
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                tail = self.error_tail()
                self.stop()
                raise RuntimeError(f"worker not ready within {timeout_s:.0f}s: {tail}") from None
            if not line:
                raise RuntimeError(f"worker exited before ready: {self.error_tail()}")
            if line.startswith("ready "):
                self.ready_ts = float(line.split()[1])
                return

    def _read(self, stream: Any) -> None:  # also keeps a chatty worker from blocking on a full pipe
        for line in stream:
            if not self.ready_ts:
                self._lines.put(line)
        self._lines.put("")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def error_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-800:]

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_done(
    poll: Callable[[], Any], n: int, worker: WorkerProcess, timeout_s: float, interval_s: float = 0.01
) -> tuple[float, int]:
    """Poll (sync or async) until ``poll() >= n``; returns (unix time of completion, number of polls)."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while True:
        done = poll()
        if inspect.isawaitable(done):
            done = await done
        polls += 1
        if done >= n:
            return time.time(), polls
        if not worker.alive():
            raise RuntimeError(f"worker died with {done}/{n} done: {worker.error_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"drain timed out after {timeout_s:.0f}s with {done}/{n} done")
        await asyncio.sleep(interval_s)


async def poll_cost(meter: Meter, poll: Callable[[], Any], times: int = 5) -> float:
    """Server commands one ``poll()`` costs, measured with no worker running."""
    before = meter.commands()
    for _ in range(times):
        done = poll()
        if inspect.isawaitable(done):
            await done
    after = meter.commands()
    return (after - before - 1) / times


def drain_metrics(
    n: int, t0: float, t1: float, cmds: tuple[int, int, int], own: int, poll_cmds: float, mem: tuple[int, int]
) -> dict[str, float]:
    """Metrics of a drain from its measurements: snapshots A (before enqueue), B (before the worker), C."""
    a, b, c = cmds
    total = c - a - own - poll_cmds
    return {
        "drain_per_s": n / (t1 - t0),
        "drain_seconds": t1 - t0,
        "server_cmds_per_run": total / n,
        "enqueue_server_cmds_per_run": (b - a - 1) / n,
        "bytes_per_run": (mem[1] - mem[0]) / n,
    }


async def sample_latency(one: Callable[[int], Any], args: argparse.Namespace, warmup: int = 5) -> list[float]:
    """Up to ``args.latency_n`` timed calls of ``one(i)`` after a warm-up, within ``args.latency_budget_s``
    (at least 3 samples). A warm-up call slower than 0.5 s ends the warm-up and counts as a sample."""

    async def call(i: int) -> float:
        elapsed = one(i)
        return float(await elapsed if inspect.isawaitable(elapsed) else elapsed)

    samples: list[float] = []
    i = 0
    for i in range(warmup):
        elapsed = await call(i)
        if elapsed > 0.5:
            samples.append(elapsed)
            break
    deadline = time.monotonic() + args.latency_budget_s
    while len(samples) < args.latency_n and (len(samples) < 3 or time.monotonic() < deadline):
        i += 1
        samples.append(await call(i))
    return samples


def latency_metrics(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    p99 = ms[min(len(ms) - 1, max(0, round(0.99 * len(ms)) - 1))]
    return {
        "latency_p50_ms": statistics.median(ms),
        "latency_p99_ms": p99,
        "latency_mean_ms": statistics.fmean(ms),
        "latency_samples": float(len(ms)),
    }


def run(args: argparse.Namespace, scenarios: dict[str, Callable[[], Any]], settings: str) -> None:
    """Run the requested scenarios (sync or async callables), print the RESULT line."""
    metrics: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name in [s for s in args.scenarios.split(",") if s]:
        fn = scenarios.get(name)
        if fn is None:
            continue
        try:
            result = asyncio.run(fn()) if inspect.iscoroutinefunction(fn) else fn()
            metrics.update(result)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    print("RESULT " + json.dumps({"metrics": metrics, "errors": errors, "settings": settings}), flush=True)


def print_ready() -> None:
    print(f"ready {time.time():.6f}", flush=True)


def check_outside(module: Any) -> None:
    """Refuse to run if a baseline module was imported from anywhere but this venv."""
    path = os.path.realpath(getattr(module, "__file__", "") or "")
    if not path.startswith(os.path.realpath(sys.prefix) + os.sep):
        raise SystemExit(f"{module.__name__} imported from {path}, not from the venv at {sys.prefix}")
