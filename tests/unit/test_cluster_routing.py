"""Routing rules of the cluster client: which argument a command is routed by, and hash slots."""

from __future__ import annotations

from redflow._redis.cluster import command_key, key_slot


def test_commands_route_by_their_key() -> None:
    assert command_key(("HGET", "a:{t}:runs", "id")) == "a:{t}:runs"
    assert command_key(("EVALSHA", "sha", 2, "k1", "k2", "arg")) == "k1"
    assert command_key(("EVALSHA", "sha", 0, "arg")) is None
    assert command_key(("EVAL", "return 1", "1", "k")) == "k"
    assert command_key(("XREAD", "COUNT", 5, "BLOCK", 10, "STREAMS", "s:{t}", "0-0")) == "s:{t}"
    assert command_key(("MEMORY", "USAGE", "k")) == "k"
    for keyless in (("TIME",), ("INFO", "memory"), ("SCRIPT", "LOAD", "x"), ("CLIENT", "ID"), ("PING",),
                    ("KEYS", "p:*"), ("SCAN", 0), ("MEMORY", "PURGE"), ("CONFIG", "GET", "x")):
        assert command_key(keyless) is None, keyless


def test_key_slots_follow_the_hash_tag_rule() -> None:
    assert key_slot("foo") == 12182
    assert key_slot("123456789") == 0x31C3
    assert key_slot("a:{app:p0}:runs") == key_slot("b:{app:p0}:q:x:ready") == key_slot("app:p0")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}") != key_slot("bar")  # an empty tag hashes the key
    assert key_slot("foo{bar}{zap}") == key_slot("bar")
