"""``redflow dev``: an embedded server on a fixed port and a supervisor, in one command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from redflow.embedded import free_port

from .conftest import ROOT


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.mark.timeout(90)
def test_redflow_dev_runs_a_workflow_and_stops_cleanly() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(SUP_TEST_URL=url, SUP_TEST_PREFIX="redflow:v1")
    dev = subprocess.Popen(
        [sys.executable, "-m", "redflow.cli", "dev", "--port", str(port), "--import", "tests.process.sup_apps"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert dev.stdout is not None
        first = dev.stdout.readline()
        assert first.strip() == f"redflow dev: server at {url}  (export REDIS_URL={url})"
        started = subprocess.run(
            [sys.executable, "-m", "redflow.cli", "runs", "start", "sup-plain", "--wait", "--timeout", "60",
             "--url", url, "--json"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=80,
        )
        assert started.returncode == 0, started.stderr
        assert isinstance(json.loads(started.stdout)["output"]["pid"], int)
    finally:
        dev.send_signal(signal.SIGINT)
        _, err = dev.communicate(timeout=60)  # waits, and closes the pipes
    assert dev.returncode == 0, err
    deadline = time.monotonic() + 10
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the port until the server is gone, with a deadline
    assert not _port_open(port), "the embedded server outlived redflow dev"
