"""Running ``python -m redflow.supervisor`` from process tests: the fixture and its helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from ..conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]

Start = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def start_supervisor(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Start]:
    """Starts supervisors; each one's stderr goes to a file (a pipe nobody reads would block it once
    full), whose tail is printed at teardown so a failing test shows what the supervisor said."""
    procs: list[subprocess.Popen[str]] = []
    logs: list[Path] = []

    os.environ["SUP_TEST_URL"], os.environ["SUP_TEST_PREFIX"] = redis_url, prefix

    def start(*args: str, cron: bool = False) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        if cron:
            env["SUP_TEST_CRON"] = "1"
        log = tmp_path / f"supervisor-{len(logs)}.log"
        logs.append(log)
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "redflow.supervisor", "--import", "tests.process.sup_apps", "--url",
                 redis_url, "--prefix", prefix, "--lease-ms", "1500", *args],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        for child in _children(proc.pid):
            child.kill()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for log in logs:
        print(f"--- {log.name} (last 4000 characters)\n{log.read_text()[-4000:]}")


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


async def _workers(proc: subprocess.Popen[str], n: int) -> list[psutil.Process]:
    """The supervisor's n worker processes, once their workers registered with the server."""

    async def ready() -> list[psutil.Process] | None:
        kids = _children(proc.pid)
        if len(kids) != n:
            return None
        registered = await _registered_workers(proc.pid)
        return kids if registered >= n else None

    return await wait_until(ready, timeout_s=20, what=f"{n} worker processes")


async def _registered_workers(supervisor_pid: int) -> int:
    from redflow import create_client

    checker = create_client(url=os.environ["SUP_TEST_URL"], prefix=os.environ["SUP_TEST_PREFIX"])
    try:
        ids = await checker.redis.execute("ZRANGE", checker.keys.workers, 0, -1)
    finally:
        await checker.close()
    pids = {int(i.decode().split(":")[1]) for i in ids}
    return len(pids & {c.pid for c in _children(supervisor_pid)})


def _fetch_text(port: int, path: str) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()


