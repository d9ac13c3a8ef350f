"""The chaos run (issue 10, item 6): a mixed workload drains while workers, connections and the server fail.

One test, with its own server (AOF, ``appendfsync everysec``; never the session server), its own
FaultProxy and three worker processes of tests/chaos/workload.py (one connected directly, two through
the proxy). It enqueues ``2000 x REDFLOW_CHAOS_SCALE`` runs, then, while they drain, injects seeded
faults: SIGKILL a random worker and the leader (each restarted), SIGSTOP a worker past its lease then
SIGCONT, cut and freeze every proxied connection, add 50-200 ms of latency per direction, make every
proxied connection half-open (open ones frozen, new ones accepted and never answered, none ever
closed), SIGKILL the server and restart it from its AOF on the same port, and once restart it from an
RDB snapshot taken earlier (every write since is lost). After the last fault it waits, with a
deadline, until every run is terminal, sends each worker a probe run on a queue only it serves (a
worker whose claim loop hangs never takes it), then checks every run (checker.py) and prints a
counts table.

Environment: REDFLOW_CHAOS_SCALE (default 1), REDFLOW_CHAOS_SEED (default 20240610),
REDFLOW_CHAOS_WORKERS (default 3). Run: ``.venv/bin/pytest -q tests/chaos/test_workload.py -s``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from .checker import check, report_and_assert
from .harness import LEASE_MS, REAPER_MS, SCALE, Fault, Harness, Slot, chaos_server
from .proxy import FaultProxy

N_WORKERS = int(os.environ.get("REDFLOW_CHAOS_WORKERS", "3"))
RUNS = max(200, int(2000 * SCALE))
LATENCY_S = 1.5  # how long each proxy_latency fault lasts
LATENCY = (0.05, 0.15)  # 50 ms + up to 150 ms, per chunk and direction
HALF_OPEN_S = 2.0  # past the command deadline (1.5 s): reconnects land in the black hole
KINDS = ["worker_kill", "leader_kill", "worker_stop", "proxy_cut", "proxy_freeze", "proxy_latency", "half_open",
         "server_kill_aof"]
TIMEOUT_S = 900 if SCALE > 1 else 400


@pytest.mark.timeout(TIMEOUT_S)
async def test_chaos_workload(tmp_path: Path) -> None:
    h = Harness(tmp_path, name="workload", runs=RUNS)
    server = chaos_server(tmp_path / "server")
    await asyncio.to_thread(server.start, 30.0)
    proxy = await FaultProxy("127.0.0.1", server.port, seed=h.rng.randrange(1 << 30)).start()
    client = h.connect(server.url)
    try:
        h.slots = [Slot(i, proxy.url if i > 0 else server.url, probe_queue=f"probe-{i}") for i in range(N_WORKERS)]
        await asyncio.gather(*(h.spawn(s) for s in h.slots))
        await h.enqueue_workload()
        # The RDB snapshot every later write is lost from: all runs exist in it, none has finished much.
        await h.redis("BGSAVE")
        h.snapshot_at = time.time()
        await h.persisted("rdb_bgsave_in_progress:0")
        h.start_cancels()

        rounds = max(3, round(2 * SCALE))
        schedule = [k for _ in range(rounds) for k in h.rng.sample(KINDS, len(KINDS))]
        schedule.insert(len(schedule) // 2, "server_rdb_restore")

        async def inject(fault: Fault) -> None:
            kind = fault.kind
            if kind in ("worker_kill", "leader_kill", "worker_stop"):
                slot = h.rng.choice(h.slots)
                if kind == "leader_kill":
                    pid = await h.leader_pid()
                    slot = next((s for s in h.slots if s.proc is not None and s.proc.pid == pid), slot)
                assert slot.proc is not None
                fault.pids = [slot.proc.pid]
                if kind == "worker_stop":
                    slot.proc.send_signal(signal.SIGSTOP)
                    await asyncio.sleep(LEASE_MS * 2 / 1000 + REAPER_MS / 1000)  # the fault's duration
                    slot.proc.send_signal(signal.SIGCONT)
                else:
                    slot.proc.kill()
                    await slot.proc.wait()
                    await h.spawn(slot)
                    fault.detail = f"restarted as {slot.proc.pid}"
            elif kind == "proxy_cut":
                fault.detail = f"{proxy.cut()} connections"
            elif kind == "proxy_freeze":
                fault.detail = f"{proxy.freeze()} connections"
            elif kind == "proxy_latency":
                proxy.set_latency(*LATENCY)
                await asyncio.sleep(LATENCY_S)  # the fault's duration
                proxy.set_latency(0.0)
                fault.detail = f"{len(proxy.pairs)} connections"
            elif kind == "half_open":
                frozen = proxy.half_open()
                before = len(proxy.blackholed)
                proxy.blackhole = True
                await asyncio.sleep(HALF_OPEN_S)  # the fault's duration
                proxy.blackhole = False
                fault.detail = f"{frozen} frozen, {len(proxy.blackholed) - before} black-holed"
            elif kind == "server_kill_aof":
                server.kill()
                await asyncio.sleep(0.2)  # the server stays down this long
                await asyncio.to_thread(server.start, 30.0)
                await h.server_restarted()
            elif kind == "server_rdb_restore":
                server.kill()
                shutil.rmtree(server.data_dir / "appendonlydir", ignore_errors=True)
                server.appendonly = False  # load dump.rdb (taken after the enqueue), then turn AOF back on
                await asyncio.to_thread(server.start, 30.0)
                server.appendonly = True
                await h.redis("CONFIG", "SET", "appendonly", "yes")
                await h.persisted("aof_enabled:1", "aof_rewrite_in_progress:0", "aof_rewrite_scheduled:0")
                await h.server_restarted()

        await h.run_faults(schedule, inject)
        await h.drain(TIMEOUT_S)
        probe_violations = await h.probe(h.slots)
        h.extra_rows += [
            ("half-open connections left open (frozen + black-holed)", len(proxy.detached) + len(proxy.blackholed)),
            ("slowest worker to claim its probe after the drain (s)", round(max(h.probe_s.values(), default=0), 2)),
            ("  (each slot)", " ".join(f"{i}:{s:.2f}" for i, s in sorted(h.probe_s.items()))),
        ]
        await h.stop_workers()
        report = await check(h, [*KINDS, "server_rdb_restore"])
        await report_and_assert(h, report, probe_violations)
    finally:
        await h.stop_workers()
        await client.close()
        await proxy.close()
        server.stop()
