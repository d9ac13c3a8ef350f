"""Only ``storage`` and ``_redis`` talk to Redis: a command sent from anywhere else fails this test.

Partitions (issue 14) need every key layout and every command in one place; this keeps it so."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "redflow"
ALLOWED = ("storage", "_redis")
SENDING = {"execute", "send_now", "dedicated", "open_connection", "pipeline"}


def _senders(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SENDING:
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: .{node.func.attr}(...)")
    return found


def test_no_module_outside_storage_sends_redis_commands() -> None:
    offenders = [
        hit for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] not in ALLOWED
        for hit in _senders(path)
    ]
    assert offenders == [], "Redis commands sent outside storage/ and _redis/:\n" + "\n".join(offenders)


def test_the_check_finds_a_command(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("async def f(client):\n    return await client.redis.execute('GET', 'k')\n")
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        assert _senders(sample) == ["sample.py:2: .execute(...)"]
    finally:
        SRC = saved
