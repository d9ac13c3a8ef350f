"""The redflow scenarios: enqueue in this process, the worker in a subprocess (``bench.worker_proc``)."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redflow
from redflow import RedflowClient, WorkflowDefinition, create_client, set_default_client
from redflow._redis.client import RedisClient

from . import server, snapshot
from .workflows import WORKFLOWS, registry

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Params:
    n: int = 5000  # runs per drain
    serial_n: int = 2000
    batched_n: int = 10000
    chunk: int = 1000
    latency_n: int = 500
    latency_budget_s: float = 30.0
    idle_s: float = 30.0
    concurrency: int = 100
    cleanup_n: int = 100_000
    timers_n: int = 100_000  # delayed runs and sleeping runs (bench/timers.py)
    ceiling_rounds: int = 5  # rounds the minimal-lifecycle probe drains (bench/ceiling.py), of 10 n runs each
    ceiling_batch: int = 100  # runs per claim of the probe (the bench worker's concurrency)


class WorkerProc:
    """``python -m bench.worker_proc`` as a child; ``ready_ts`` is the unix time it started claiming and
    ``ready_cpu`` its process CPU time (seconds) at that moment."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Any) -> None:
        self.proc = proc
        self.stderr = stderr
        self.ready_ts = 0.0
        self.ready_cpu = 0.0

    @classmethod
    async def start(
        cls, url: str, prefix: str, concurrency: int, idle_s: float = 0.0, tracing: str = "off"
    ) -> WorkerProc:
        stderr = tempfile.TemporaryFile()
        args = [sys.executable, "-m", "bench.worker_proc", url, prefix, "--concurrency", str(concurrency)]
        if idle_s:
            args += ["--idle", str(idle_s)]
        args += ["--tracing", tracing]
        proc = await asyncio.create_subprocess_exec(*args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=stderr)
        self = cls(proc, stderr)
        line = await self._line(60)
        if not line.startswith("ready "):
            raise RuntimeError(f"bench worker did not start: {line!r} {self.error_tail()}")
        fields = line.split()
        self.ready_ts = float(fields[1])
        self.ready_cpu = float(fields[2])
        return self

    async def _line(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                return (await self.proc.stdout.readline()).decode()
        except TimeoutError:
            return ""

    def alive(self) -> bool:
        return self.proc.returncode is None

    def error_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-1000:]

    async def stats(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait for the ``stats`` line (after SIGTERM, or at the end of an idle window)."""
        while True:
            line = await self._line(timeout_s)
            if not line:
                raise RuntimeError(f"bench worker gave no stats: {self.error_tail()}")
            if line.startswith("stats "):
                await self.proc.wait()
                result: dict[str, Any] = json.loads(line[6:])
                return result

    async def stop(self) -> dict[str, Any]:
        if self.alive():
            self.proc.terminate()
        try:
            return await self.stats()
        finally:
            if self.alive():
                self.proc.kill()
                await self.proc.wait()


def check_frozen(stats: dict[str, Any]) -> None:
    """The worker must run the copy of src/redflow taken at start (see bench/snapshot.py)."""
    frozen = snapshot.state()
    if not frozen:
        return
    for who, path in (("bench worker", stats.get("redflow_file")), ("harness", redflow.__file__)):
        if not str(path).startswith(str(frozen["src"])):
            raise RuntimeError(f"the {who} imported redflow from {path}, not from the frozen copy")


def succeeded_count_args(client: RedflowClient) -> tuple[str, str, str, str]:
    return ("ZLEXCOUNT", client.keys.index, "[s:succeeded:", "(s:succeeded;")


async def enqueue_batched(wf: WorkflowDefinition[Any], n: int, chunk: int) -> None:
    for start in range(0, n, chunk):
        await asyncio.gather(*(wf.run({"i": i}) for i in range(start, min(start + chunk, n))))


class Scenarios:
    def __init__(self, url: str, params: Params) -> None:
        self.url = url
        self.p = params

    async def _client(self, kind: str) -> RedflowClient:
        client = create_client(url=self.url, prefix=server.new_prefix(kind))
        client.registry = registry
        set_default_client(client)
        await client.store.ensure_ready()
        return client

    async def _done(self, client: RedflowClient, delete: bool = True) -> None:
        set_default_client(None)
        if delete:
            await server.delete_prefix(client.redis, client.prefix)
        await client.close()

    async def enqueue_serial(self) -> dict[str, float]:
        client = await self._client("serial")
        wf = WORKFLOWS["echo"]
        try:
            for i in range(20):
                await wf.run({"i": i})
            before = client.redis.counters.commands
            t = time.perf_counter()
            for i in range(self.p.serial_n):
                await wf.run({"i": i})
            elapsed = time.perf_counter() - t
            sent = client.redis.counters.commands - before
        finally:
            await self._done(client)
        n = self.p.serial_n
        return {"enqueue_serial_per_s": n / elapsed, "enqueue_client_cmds_per_run": sent / n}

    async def enqueue_batched(self) -> dict[str, float]:
        client = await self._client("batched")
        try:
            await enqueue_batched(WORKFLOWS["echo"], 200, 200)
            t = time.perf_counter()
            await enqueue_batched(WORKFLOWS["echo"], self.p.batched_n, self.p.chunk)
            elapsed = time.perf_counter() - t
            inputs = [{"i": i} for i in range(self.p.batched_n)]
            t = time.perf_counter()
            await client.enqueue_many(WORKFLOWS["echo"], inputs, chunk_size=1000)
            many_elapsed = time.perf_counter() - t
        finally:
            await self._done(client)
        return {"enqueue_batched_per_s": self.p.batched_n / elapsed,
                "enqueue_many_per_s": self.p.batched_n / many_elapsed}

    async def drain(self, workflow: str = "echo", tracing: str = "off") -> dict[str, float]:
        """Fill the queue, start the worker, time it until the last run is succeeded; memory and commands.

        Measurements go through a connection of their own (``meter``), opened before the client's, so its
        commands are subtracted exactly and the client's connection is closed before memory is read.
        """
        meter = server.connect(self.url)
        n, own = self.p.n, meter.counters
        try:
            mem0 = await server.used_memory(meter)
            client = await self._client("drain")
            own_a = own.commands
            a = await server.total_commands(meter)
            await enqueue_batched(WORKFLOWS[workflow], n, self.p.chunk)
            b = await server.total_commands(meter)
            cpu0, stats0 = await server.server_cpu_s(meter), await server.command_stats(meter)
            polls0 = dict(own.by_name)
            worker = await WorkerProc.start(self.url, client.prefix, self.p.concurrency, tracing=tracing)
            t1 = await self._wait_succeeded(meter, client, n, worker, timeout_s=60 + n / 20)
            stats = await worker.stop()
            polls = {k: v - polls0.get(k, 0) for k, v in own.by_name.items()}
            polls["INFO"] = polls.get("INFO", 0) + 2  # stats0's (recorded once done) and cpu1's
            cpu1, stats1 = await server.server_cpu_s(meter), await server.command_stats(meter)
            cmd_us, nested_us = server.command_usec(stats0, stats1, stats["by_name"], polls)
            check_frozen(stats)
            measuring = own.commands - own_a
            c = await server.total_commands(meter)
            prefix = client.prefix
            await self._done(client, delete=False)
            await asyncio.sleep(0.2)  # let the server drop the closed connections
            mem1 = await server.used_memory(meter)
            await server.delete_prefix(meter, prefix)
        finally:
            await meter.close()
        tag = "" if workflow == "echo" else "_3step"
        seconds = t1 - worker.ready_ts
        metrics = {
            f"drain{tag}_per_s": n / seconds,
            f"drain{tag}_seconds": seconds,
            f"worker{tag}_cmds_per_run": stats["commands"] / n,
            f"worker{tag}_writes_per_run": stats["writes"] / n,
            f"server{tag}_cmds_per_run": (c - a - measuring) / n,
            # CPU from just before the worker starts to just after it stopped (its start and stop included)
            f"server{tag}_cpu_us_per_run": (cpu1 - cpu0) * 1e6 / n,
            f"server{tag}_cmd_us_per_run": cmd_us / n,
            f"server{tag}_nested_us_per_run": nested_us / n,
            f"worker{tag}_cpu_us_per_run": (stats["cpu_s"] - worker.ready_cpu) * 1e6 / n,
        }
        if workflow == "echo":
            metrics["enqueue_server_cmds_per_run"] = (b - a - 1) / n
            metrics["bytes_per_run"] = (mem1 - mem0) / n
        return metrics

    async def drain_3step(self) -> dict[str, float]:
        return await self.drain("three_step")

    async def tracing(self) -> dict[str, float]:
        """The echo and 3-step drains with tracing off (REDFLOW_TRACING=0), installed without a tracer
        provider, and recording every span (an OpenTelemetry SDK provider), back to back; ratios are
        throughput over the untraced drain's."""
        out: dict[str, float] = {}
        for workflow, tag in (("echo", ""), ("three_step", "_3step")):
            rates = {mode: (await self.drain(workflow, tracing=mode))[f"drain{tag}_per_s"]
                     for mode in ("off", "installed", "sdk")}
            out |= {f"drain{tag}_tracing_{mode}_per_s": rate for mode, rate in rates.items()}
            out |= {f"tracing{tag}_{mode}_ratio": rates[mode] / rates["off"] for mode in ("installed", "sdk")}
        return out

    async def _wait_succeeded(
        self, meter: RedisClient, client: RedflowClient, n: int, worker: WorkerProc, timeout_s: float
    ) -> float:
        count_cmd = succeeded_count_args(client)
        deadline = time.monotonic() + timeout_s
        while True:
            done = int(await meter.execute(*count_cmd))
            if done >= n:
                return time.time()
            if not worker.alive():
                raise RuntimeError(f"bench worker died with {done}/{n} runs done: {worker.error_tail()}")
            if time.monotonic() > deadline:
                state = await self._diagnose(client)
                stats = await worker.stop()
                raise RuntimeError(
                    f"drain timed out after {timeout_s:.0f}s with {done}/{n} runs succeeded; {state}; worker "
                    f"commands {stats.get('by_name')}; worker log: {worker.error_tail()[-400:]!r}"
                )
            await asyncio.sleep(0.005)

    async def _diagnose(self, client: RedflowClient) -> str:
        counts = {}
        for status in ("scheduled", "queued", "running", "succeeded", "failed", "canceled"):
            counts[status] = int(
                await client.redis.execute("ZLEXCOUNT", client.keys.index, f"[s:{status}:", f"(s:{status};")
            )
        ready = await client.redis.execute("LLEN", client.keys.ready("bench"))
        return f"status counts {counts}, ready list {ready}"

    async def ceiling(self) -> dict[str, float]:
        """The minimal-lifecycle probe (bench/ceiling.py) and one EVALSHA round trip on an idle connection."""
        from . import ceiling

        # 10 n runs per round: the probe is ~20x faster than a drain, and a round must last long enough
        # (0.2-0.5 s at --quick) for a scheduling hiccup on this shared machine not to decide its rate.
        return await ceiling.scenario(self.url, 10 * self.p.n, self.p.ceiling_rounds, self.p.ceiling_batch)

    async def latency(self) -> dict[str, float]:
        client = await self._client("latency")
        wf = WORKFLOWS["echo"]
        worker = await WorkerProc.start(self.url, client.prefix, self.p.concurrency)
        samples: list[float] = []
        try:
            async def one(i: int) -> float:
                t = time.perf_counter()
                handle = await wf.run({"i": i})
                await handle.result(timeout_ms=30_000)
                return time.perf_counter() - t

            samples = await sample(one, self.p.latency_n, self.p.latency_budget_s)
        finally:
            await worker.stop()
            await self._done(client)
        return latency_metrics(samples)

    async def idle(self) -> dict[str, float]:
        client = await self._client("idle")
        try:
            worker = await WorkerProc.start(self.url, client.prefix, self.p.concurrency, idle_s=self.p.idle_s)
            stats = await worker.stats(timeout_s=self.p.idle_s + 60)
        finally:
            await self._done(client)
        if not stats.get("leader"):
            raise RuntimeError("the idle worker never became leader")
        return {"idle_cmds_per_s": stats["idle_commands"] / stats["idle_seconds"]}


    async def waits(self) -> dict[str, float]:
        """Wake-up lateness of durable sleeps, cancel latency of running runs, fan-out to 10 subscribers."""
        from redflow import CanceledError

        from .workflows import FANOUT_EVENT

        client = await self._client("waits")
        worker = await WorkerProc.start(self.url, client.prefix, self.p.concurrency)
        try:
            # Sleeps: 50 runs sleeping 200-700 ms; lateness = wake time - the due time stored with the step.
            sleepers = [await WORKFLOWS["sleeper"].run({"ms": 200 + 10 * i}) for i in range(50)]
            woke = await asyncio.gather(*(h.result(timeout_ms=60_000) for h in sleepers))
            late = []
            for handle, woke_ms in zip(sleepers, woke, strict=True):
                steps = await client.get_run_steps(handle.id)
                late.append(woke_ms - steps[0]["wait_until_at"])
            # Cancel: from cancel_run() to result() raising CanceledError, for a run that is running.
            cancels = []
            for _ in range(30):
                handle = await WORKFLOWS["cancelable"].run({})
                while (await client.get_run(handle.id) or {}).get("status") != "running":  # noqa: ASYNC110
                    await asyncio.sleep(0.002)
                t = time.perf_counter()
                await client.cancel_run(handle.id)
                try:
                    await handle.result(timeout_ms=30_000)
                except CanceledError:
                    cancels.append(time.perf_counter() - t)
            # Fan-out: one event, 10 subscriber runs, until all of them finished.
            fanouts = []
            for i in range(20):
                t = time.perf_counter()
                handles = await client.emit_event(FANOUT_EVENT, {"i": i})
                await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles))
                fanouts.append(time.perf_counter() - t)
        finally:
            await worker.stop()
            await self._done(client)
        late.sort()
        return {
            "sleep_lateness_p50_ms": statistics.median(late),
            "sleep_lateness_max_ms": late[-1],
            "cancel_latency_p50_ms": statistics.median(cancels) * 1000,
            "fanout_10_ms": statistics.median(fanouts) * 1000,
        }


    async def cleanup(self) -> dict[str, float]:
        """Retention: runs deleted per second by cleanup_expired_runs_now once they all expired."""
        client = await self._client("cleanup")
        n = self.p.cleanup_n
        worker = await WorkerProc.start(self.url, client.prefix, self.p.concurrency)
        meter = server.connect(self.url)
        try:
            await client.enqueue_many(WORKFLOWS["echo"], [{"i": i} for i in range(n)], chunk_size=1000)
            await self._wait_succeeded(meter, client, n, worker, timeout_s=60 + n / 20)
            await worker.stop()
            t = time.perf_counter()
            deleted = await client.cleanup_expired_runs_now(reference_time_ms=2**45)
            elapsed = time.perf_counter() - t
        finally:
            await meter.close()
            await self._done(client)
        if deleted != n:
            raise RuntimeError(f"cleanup deleted {deleted} of {n} runs")
        return {"cleanup_runs_per_s": n / elapsed}

    async def supervisor(self) -> dict[str, float]:
        """Drain through ``python -m redflow.supervisor`` with --procs 1 and 2 (enqueued once workers are up)."""
        import os
        import signal

        metrics: dict[str, float] = {}
        for procs in (1, 2):
            client = await self._client(f"supervisor{procs}")
            meter = server.connect(self.url)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "redflow.supervisor", "--import", "bench.supervisor_app", "--url", self.url,
                "--prefix", client.prefix, "--procs", str(procs), "--concurrency", str(self.p.concurrency),
                "--log-level", "WARNING", cwd=REPO, env=dict(os.environ), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 60
                while int(await client.redis.execute("ZCARD", client.keys.workers)) < procs:
                    if time.monotonic() > deadline or proc.returncode is not None:
                        raise RuntimeError(f"the supervisor's {procs} worker(s) did not register")
                    await asyncio.sleep(0.05)
                n = self.p.n
                count_cmd = succeeded_count_args(client)
                t = time.perf_counter()
                await client.enqueue_many(WORKFLOWS["echo"], [{"i": i} for i in range(n)], chunk_size=1000)
                while int(await meter.execute(*count_cmd)) < n:
                    if time.perf_counter() - t > 60 + n / 20:
                        raise RuntimeError(f"supervisor drain with --procs {procs} timed out")
                    await asyncio.sleep(0.005)
                metrics[f"supervisor_procs{procs}_drain_per_s"] = n / (time.perf_counter() - t)
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(proc.wait(), 60)
                await meter.close()
                await self._done(client)
        return metrics


async def sample(one: Callable[[int], Awaitable[float]], n: int, budget_s: float, warmup: int = 10) -> list[float]:
    """Up to ``n`` timed calls after a warm-up, within ``budget_s`` (at least 3)."""
    for i in range(warmup):
        await one(i)
    deadline = time.monotonic() + budget_s
    samples: list[float] = []
    while len(samples) < n and (len(samples) < 3 or time.monotonic() < deadline):
        samples.append(await one(warmup + len(samples)))
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


# Run in this order: the latency scenario warms the server's script cache before the drains measure memory;
# the ceiling (and its EVALSHA round trip) comes right before the latency and drains it is compared with.
SCENARIOS = ("enqueue_serial", "enqueue_batched", "ceiling", "latency", "drain", "drain_3step", "idle", "waits",
             "cleanup", "supervisor", "tracing")
