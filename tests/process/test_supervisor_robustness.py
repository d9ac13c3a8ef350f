"""Supervisor robustness (issue 10, item 5): Ctrl-C drains without forking, blocked workers are replaced,
an unreachable Redis at start is retried quietly.

Each test fails on f04b3d6: Ctrl-C during a drain forked new workers; a worker with a blocked event loop
kept counting as healthy; an unreachable Redis made every worker crash and restart with tracebacks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from redflow import RedflowClient
from redflow.embedded import EmbeddedServer, free_port

from ..conftest import wait_until
from .conftest import ROOT
from .test_supervisor import _children, _fetch_text, _get


def _start(redis_url: str, prefix: str, *args: str, log: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["SUP_TEST_URL"], env["SUP_TEST_PREFIX"] = redis_url, prefix
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "redflow.supervisor", "--import", "tests.process.sup_apps", "--url", redis_url,
             "--prefix", prefix, "--lease-ms", "1500", *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True,
        )


def _stop(proc: subprocess.Popen[str]) -> None:
    for child in _children(proc.pid):
        child.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait()


async def test_ctrl_c_drains_and_starts_no_new_worker(redis_url: str, prefix: str, tmp_path: Path) -> None:
    log = tmp_path / "sup.log"
    sup = _start(redis_url, prefix, "--procs", "2", log=log)
    try:
        await wait_until(lambda: len(_children(sup.pid)) == 2 and "started (slot 1)" in log.read_text(),
                         timeout_s=20, what="two workers")
        os.killpg(sup.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group gets SIGINT
        assert await asyncio.to_thread(sup.wait, 30) == 0
        text = log.read_text()
        after = text.split("draining", 1)[1]
        assert "started (slot" not in after, text
        assert "Traceback" not in text, text
    finally:
        _stop(sup)


async def test_a_worker_with_a_blocked_event_loop_is_replaced(
    client: RedflowClient, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    log = tmp_path / "sup.log"
    port = free_port()
    sup = _start(redis_url, prefix, "--procs", "1", "--stale-after", "2", "--http-port", str(port), log=log)
    try:
        await wait_until(lambda: _get(port, "/readyz"), timeout_s=20, what="ready")
        first = _children(sup.pid)[0].pid
        handle = await client.run_by_name("sup-block", None)  # blocks the loop of the worker that runs it

        async def replaced() -> bool:
            kids = _children(sup.pid)
            return bool(kids) and kids[0].pid != first

        await wait_until(replaced, timeout_s=30, what="the blocked worker killed and replaced")
        assert "event loop is blocked" in log.read_text()
        assert await handle.result(timeout_ms=30_000) == 2  # recovered and run again on the new worker
        metrics = await asyncio.to_thread(_fetch_text, port, "/metrics")
        assert "redflow_worker_stale_kills_total 1.0" in metrics or "redflow_worker_stale_kills_total 1" in metrics
    finally:
        _stop(sup)


async def test_unreachable_redis_at_start_is_retried_quietly(prefix: str, tmp_path: Path) -> None:
    log = tmp_path / "sup.log"
    redis_port, http_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}"
    sup = _start(url, prefix, "--procs", "1", "--http-port", str(http_port), log=log)
    server = None
    try:
        await wait_until(lambda: log.read_text().count("cannot start (attempt") >= 3, timeout_s=30,
                         what="three start attempts")
        assert _get(http_port, "/healthz") == {"ok": True}
        assert _get(http_port, "/readyz") is None  # 503 while Redis is down
        text = log.read_text()
        assert "Traceback" not in text and "exited with" not in text, text
        server = EmbeddedServer(os.environ.get("REDFLOW_TEST_REDIS_SERVER") or None, port=redis_port,
                                data_dir=tmp_path / "data", appendonly=False).start()
        await wait_until(lambda: _get(http_port, "/readyz"), timeout_s=30, what="ready once Redis is up")
    finally:
        _stop(sup)
        if server is not None:
            server.stop()
