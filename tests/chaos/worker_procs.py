"""Worker processes a chaos test starts from its own module (``python -m <module> URL PREFIX ...``):
each prints ``ready`` once it claims, logs to its own file, and is killed (after a SIGCONT, so a
paused one goes too) when the test ends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcs:
    def __init__(self, module: str, url: str, prefix: str, logs: Path) -> None:
        self.module, self.url, self.prefix, self.logs = module, url, prefix, logs
        self.procs: list[subprocess.Popen[str]] = []

    def _popen(self, args: tuple[str, ...]) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["REDFLOW_COMMAND_TIMEOUT_MS"] = "1500"
        with open(self.logs / f"worker-{len(self.procs)}.log", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, self.url, self.prefix, *args],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
            )
        self.procs.append(proc)
        return proc

    async def start(self, *args: str) -> subprocess.Popen[str]:
        """One more worker, given ``args`` after URL and PREFIX; returns once it is ready."""
        proc = self._popen(args)
        assert proc.stdout is not None
        # Read off the loop: a proxy of this loop may stand between the worker and the server.
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == "ready", f"worker did not start: {line!r}"
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
