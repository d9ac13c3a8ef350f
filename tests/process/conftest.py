from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from redflow import RedflowClient

ROOT = Path(__file__).resolve().parents[2]

Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn_worker(redis_url: str, prefix: str) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[str]] = []

    def spawn(concurrency: int = 10, lease_ms: int = 1500) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.process.worker_proc", redis_url, prefix, str(concurrency), str(lease_ms)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"worker did not start: {line!r}"
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def counter(client: RedflowClient, name: str) -> int:
    raw = await client.redis.execute("GET", f"{client.prefix}:test:count:{name}")
    return int(raw or 0)


from .supervised import start_supervisor  # noqa: E402,F401 (the fixture, for every process test)
