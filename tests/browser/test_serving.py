"""The dashboard as users start it: ``redflow dashboard`` and ``redflow supervisor --dashboard-port``,
in subprocesses against the test server, looked at in Chromium."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from redflow.embedded import free_port

from ..conftest import wait_until
from .conftest import open_page, require_dashboard_extra

require_dashboard_extra()

from playwright.async_api import expect  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "supervisor-dashboard-token"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDFLOW_DASHBOARD_TOKEN")}
    env.update(extra)
    return env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "redflow.cli", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=60)


def _spawn(args: list[str], env: dict[str, str], started: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    started.append(proc)
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            child.kill()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def _answers(url: str, headers: dict[str, str] | None = None) -> bool:
    def get() -> bool:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return await asyncio.to_thread(get)


def test_refuses_in_one_line_to_listen_beyond_loopback_without_a_token() -> None:
    result = _run("dashboard", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "without a token" in result.stderr and "--token" in result.stderr
    assert "REDFLOW_DASHBOARD_TOKEN" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_server_is_one_line() -> None:
    result = _run("dashboard", "--url", f"redis://127.0.0.1:{free_port()}", "--port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot use Redis at" in result.stderr, result.stderr
    bad = _run("dashboard", "--url", "http://example.invalid")
    assert bad.returncode == 1 and "unsupported Redis URL scheme" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.timeout(60)
async def test_redflow_dashboard_serves_until_ctrl_c(
    redis_url: str, prefix: str, page: Any, procs: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    proc = _spawn([sys.executable, "-m", "redflow.cli", "dashboard", "--url", redis_url, "--prefix", prefix,
                   "--port", str(port)], _env(), procs)
    base = f"http://127.0.0.1:{port}"
    await wait_until(lambda: _answers(base + "/healthz"), timeout_s=20, what="redflow dashboard listening")
    await open_page(page, base + "/")
    await expect(page.locator("header .where")).to_contain_text(prefix)
    proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert f"serving http://127.0.0.1:{port}/" in err and "Traceback" not in err, err


@pytest.mark.timeout(90)
async def test_supervisor_serves_the_dashboard_from_a_child_and_stops_it_on_drain(
    redis_url: str, prefix: str, page: Any, procs: list[subprocess.Popen[str]]
) -> None:
    base_args = [sys.executable, "-m", "redflow.supervisor", "--import", "tests.browser.sup_app", "--url",
                 redis_url, "--prefix", prefix, "--procs", "1", "--grace-period", "2"]
    refused = await asyncio.to_thread(
        subprocess.run, [*base_args, "--dashboard-port", str(free_port()), "--dashboard-host", "0.0.0.0"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "without a token" in refused.stderr, refused.stderr

    port = free_port()
    proc = _spawn([*base_args, "--dashboard-port", str(port)], _env(REDFLOW_DASHBOARD_TOKEN=TOKEN), procs)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    await wait_until(lambda: _answers(base + "/", auth), timeout_s=30, what="the supervisor's dashboard")
    children = psutil.Process(proc.pid).children()
    assert len(children) == 2  # one worker process and the dashboard

    await open_page(page, f"{base}/workflows?token={TOKEN}")
    await expect(page.locator("#workflows tr[data-workflow=dash-hello]")).to_be_visible()
    await open_page(page, base + "/")
    await expect(page.locator("#workers tr[data-alive=yes]")).to_have_count(1, timeout=20_000)

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 40) == 0
    assert not await _answers(base + "/healthz")
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
