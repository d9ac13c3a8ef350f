"""The chaos run through replica failovers (issue 10, item 6): the primary dies, its replica is promoted.

Two servers on loopback (AOF, ``appendfsync everysec``), one a replica of the other through a
FaultProxy that adds 20-50 ms per chunk (a replication link with some lag, so a failover has an
unreplicated tail to lose); three worker processes of workload.py and the driver all reach "the
primary" through a second FaultProxy, the service address, which a failover re-targets (what a
virtual IP, a DNS name or Sentinel-aware routing does). While ``2000 x REDFLOW_CHAOS_SCALE`` runs drain
(plus a trickle of runs enqueued during the faults, with idempotency keys), seeded failovers:

- ``failover``: SIGKILL the primary; the service address refuses connections for 0.3 s (detection);
  ``REPLICAOF NO ONE`` on the replica; the service address now leads to it;
- ``failover_routed_early``: the same, but clients reach the replica 0.5 s *before* it is promoted:
  every write is refused with ``READONLY`` meanwhile.

Then the old primary restarts from its own AOF as a replica of the new one (a full resync drops the
tail it alone had) and the next failover waits until it is in sync. After each failover the driver
re-sends its cancels and the events of runs still waiting (checker.py explains why).

Before each kill the test takes a checkpoint: it reads the primary's replication offset, then waits
until the replica holds it, and kills at once. Whatever a client was told before the checkpoint is on
the replica; only the tail between the checkpoint and the kill may be lost. What the promoted server
forgot is measured against what clients had been told: acknowledged enqueues it does not have (each
must have been acknowledged inside a checkpoint-to-kill window), runs a client had seen finished
that it sends back to run again, cancels it forgot. Everything it does know must end exactly once
(checker.py), and nothing may be stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from redflow._redis.client import RedisClient, ServerAddress
from redflow._redis.errors import RedisError
from redflow.embedded import EmbeddedServer

from ..conftest import wait_until
from .checker import check, report_and_assert
from .harness import SCALE, TERMINAL, Fault, Harness, Slot, chaos_server
from .proxy import FaultProxy
from .workload import registry

RUNS = max(200, int(2000 * SCALE))
N_WORKERS = 3
LINK_LATENCY = (0.02, 0.03)  # 20 ms + up to 30 ms per chunk on the replication link
DETECTION_S = 0.3  # the service address refuses connections this long after the primary died
EARLY_S = 0.5  # failover_routed_early: clients reach the replica this long before its promotion
TRICKLE_EVERY_S = 0.1
KINDS = ["failover", "failover_routed_early"]
TIMEOUT_S = 1200 if SCALE > 1 else 300


class Node:
    """One server of the pair and an admin connection straight to it (not through the service address)."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        # A full resync starts at once (Valkey waits 5 s by default for more replicas to join it).
        self.server: EmbeddedServer = chaos_server(tmp / name, ["--repl-diskless-sync-delay", "0"])
        self.base_args = list(self.server.extra_args)
        self.admin = RedisClient(ServerAddress.from_url(self.server.url), command_timeout_s=5.0)

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self, replica_of: int | None) -> None:
        self.server.extra_args = self.base_args + (["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else [])
        await asyncio.to_thread(self.server.start, 30.0)

    async def info(self) -> dict[str, str]:
        raw = (await self.admin.execute("INFO", "replication")).decode()
        return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)

    async def in_sync(self) -> bool:
        try:
            info = await self.info()
        except RedisError:
            return False
        return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == "0"

    async def offset(self) -> int:
        info = await self.info()
        return int(info.get("slave_repl_offset") or info.get("master_repl_offset") or 0)


@pytest.mark.timeout(TIMEOUT_S)
async def test_chaos_failover(tmp_path: Path) -> None:
    h = Harness(tmp_path, name="failover", runs=RUNS)
    primary, replica = Node("a", tmp_path), Node("b", tmp_path)
    await primary.start(None)
    link = await FaultProxy("127.0.0.1", primary.port, seed=h.rng.randrange(1 << 30)).start()
    link.set_latency(*LINK_LATENCY)
    await replica.start(link.port)
    await wait_until(replica.in_sync, timeout_s=30, interval_s=0.05, what="the replica in sync")
    service = await FaultProxy("127.0.0.1", primary.port).start()
    client = h.connect(service.url)
    acked_at: dict[str, float] = {}  # trickle runs: when the client was told the run exists
    sent_at: dict[str, float] = {}  # and when it first asked for it
    stop_trickle = asyncio.Event()
    lags: list[int] = []
    killed_at: list[float] = []
    windows: list[tuple[float, float]] = []  # per failover: (checkpoint asked, kill)
    rolled_back: dict[str, str] = {}  # runs a client had seen finished that a failover sent back: status seen
    roles = [primary, replica]  # the primary first
    try:
        h.slots = [Slot(i, service.url, probe_queue=f"probe-{i}") for i in range(N_WORKERS)]
        await asyncio.gather(*(h.spawn(s) for s in h.slots))
        await h.enqueue_workload()
        h.start_cancels()
        steps = registry.get("chaos-steps")
        assert steps is not None

        async def trickle() -> None:
            i = 0
            while not stop_trickle.is_set():
                first_sent = time.time()  # a retry may be answered with the run an earlier try created
                handle = await h.retry("trickle", client.enqueue_definition, steps, {"trickle": i},
                                       idempotency_key=f"trickle-{i}")
                acked_at[handle.id] = time.time()
                sent_at[handle.id] = first_sent
                h.workflow_of[handle.id] = "chaos-steps"
                h.top_ids.append(handle.id)
                i += 1
                await asyncio.sleep(TRICKLE_EVERY_S)  # the trickle's pace

        trickling = asyncio.ensure_future(trickle())
        rounds = max(3, round(2 * SCALE))
        schedule = [k for _ in range(rounds) for k in h.rng.sample(KINDS, len(KINDS))]

        async def inject(fault: Fault) -> None:
            old, new = roles
            await wait_until(new.in_sync, timeout_s=30, interval_s=0.05, what=f"replica {new.name} in sync")
            # A checkpoint: whatever a client was told before `asked` is in the stream before `target`;
            # once the replica holds `target`, only what was acknowledged after `asked` can be lost.
            asked = time.time()
            target = await h.retry("offset", old.offset)
            lags.append(max(0, target - await h.retry("offset", new.offset)))
            await wait_until(lambda: _reached(new, target), timeout_s=30, interval_s=0.01, what="the checkpoint")
            ids = list(h.top_ids)  # what a client sees finished now, in the tail (it reads the primary)
            finished = {r: s for r, s in zip(ids, await h.statuses(ids), strict=True) if s in TERMINAL}
            old.server.kill()
            killed_at.append(time.time())
            fault.loss_at = killed_at[-1]
            windows.append((asked, killed_at[-1]))
            service.refuse = True
            service.cut()
            link.cut()
            await asyncio.sleep(DETECTION_S)  # the fault: nothing answers at the service address
            if fault.kind == "failover_routed_early":
                service.retarget("127.0.0.1", new.port)
                service.refuse = False
                await asyncio.sleep(EARLY_S)  # the fault: clients reach a replica that refuses writes
            await new.admin.execute("REPLICAOF", "NO", "ONE")
            service.retarget("127.0.0.1", new.port)
            service.refuse = False
            link.retarget("127.0.0.1", new.port)
            await old.start(link.port)  # back from its own AOF, then resynced from the new primary
            roles.reverse()
            await h.server_restarted()
            now = await h.statuses(list(finished))
            back = {r: s for (r, s), n in zip(finished.items(), now, strict=True) if n not in TERMINAL}
            rolled_back.update(back)
            fault.detail = f"lag {lags[-1]} B, {len(back)} finished runs sent back"

        await h.run_faults(schedule, inject, pause=(1.0, 2.5))
        stop_trickle.set()
        await trickling
        headers = await h.all_headers()
        for run_id in acked_at:
            if run_id not in headers:
                h.lost_allowed[run_id] = "acknowledged enqueue lost with the unreplicated tail"
        await h.drain(TIMEOUT_S)
        probe_violations = await h.probe(h.slots)
        await h.stop_workers()

        def before_kill(run_id: str) -> float:  # how long before the next kill the client asked
            return min((k - sent_at[run_id] for k in killed_at if k >= sent_at[run_id]), default=float("inf"))

        # Lost although acknowledged before the last checkpoint ahead of a kill (or first asked for after
        # the kill): more than the tail. A reply can reach the client after the kill, so the ack may follow it.
        too_old = [r for r in h.lost_allowed if not any(a < acked_at[r] and sent_at[r] < k for a, k in windows)]
        final = await h.all_headers()
        ended_otherwise = [r for r, s in rolled_back.items() if r in final and final[r].status != s]
        h.extra_rows += [
            ("runs enqueued during the faults (trickle)", len(acked_at)),
            ("acknowledged enqueues lost by a failover", len(h.lost_allowed)),
            ("  first asked for at most this long before the kill (s)",
             round(max((before_kill(r) for r in h.lost_allowed), default=0), 3)),
            ("runs a client had seen finished, sent back by a failover", len(rolled_back)),
            ("  of which ended differently the second time", len(ended_otherwise)),
            ("replication lag at the checkpoint before a kill (bytes, worst)", max(lags, default=0)),
            ("loss window: checkpoint to kill (s, worst)", round(max((k - a for a, k in windows), default=0), 3)),
            ("slowest worker to claim its probe after the drain (s)", round(max(h.probe_s.values(), default=0), 2)),
        ]
        report = await check(h, KINDS)
        violations = probe_violations + [
            f"run {r}: asked for {before_kill(r):.2f}s before a kill and acknowledged before the replica was "
            "known to hold it, yet lost" for r in too_old]
        await report_and_assert(h, report, violations)
    finally:
        stop_trickle.set()
        await h.stop_workers()
        await client.close()
        for node in reversed(roles):  # the replica first: a primary stopping waits for connected replicas
            with contextlib.suppress(RedisError):
                await node.admin.close()
            await asyncio.to_thread(node.server.stop)  # in a thread: the link proxy runs on this loop
        for proxy in (service, link):
            await proxy.close()


async def _reached(node: Node, offset: int) -> bool:
    try:
        return await node.offset() >= offset
    except RedisError:
        return False
