"""Browser tests: the dashboard served in the test's event loop, driven by a real headless Chromium.

Chromium is Debian's package (.ci/run installs it); Playwright drives it through ``executable_path``
and never downloads a browser. The dashboard reads the test's own server and prefix through the
``client`` fixture, so a test can count the Redis commands a page costs on that client.

Screenshots go to a temporary directory; with REDFLOW_DASHBOARD_SCREENSHOTS=docs/images they
replace the pictures of docs/dashboard.md.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from redflow import RedflowClient

DASHBOARD_EXTRA = ("starlette", "jinja2", "uvicorn", "multipart")
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
PAGE_TIMEOUT_MS = 15_000


def require_dashboard_extra() -> None:
    """Skip the module when the ``dashboard`` extra is not installed (CI installs it through ``dev``)."""
    for module in DASHBOARD_EXTRA:
        pytest.importorskip(module, reason="the 'dashboard' extra is not installed")


def chromium_path() -> str:
    given = os.environ.get("REDFLOW_TEST_CHROMIUM")
    found = given or next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)
    if not found:
        pytest.fail("no chromium on PATH: install Debian's chromium package (.ci/run does) or set "
                    "REDFLOW_TEST_CHROMIUM")
    return found


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=PAGE_TIMEOUT_MS)  # a loaded 2-core machine is slower than the default 5 s
    path = chromium_path()
    playwright = await async_playwright().start()
    try:
        browser = await playwright.chromium.launch(executable_path=path, args=["--disable-gpu"])
        try:
            yield browser
        finally:
            await browser.close()
    finally:
        await playwright.stop()


class Served:
    """A dashboard served on a free loopback port for one test."""

    def __init__(self, client: RedflowClient, base: str, stop: Callable[[], Awaitable[None]]) -> None:
        self.client = client
        self.base = base
        self.stop = stop

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def commands(self) -> int:
        """Redis commands the dashboard's client has sent so far."""
        return int(self.client.store.redis.counters.commands)

    @property
    def by_name(self) -> dict[str, int]:
        """Redis commands the dashboard's client has sent so far, by command name."""
        return {str(k): int(v) for k, v in self.client.store.redis.counters.by_name.items()}


async def serve_dashboard(client: RedflowClient, *, token: str | None = None) -> Served:
    from redflow.dashboard.app import create_app
    from redflow.dashboard.server import _Server, server_config

    app = create_app(client, token=token, redis_url="redis://test-server")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(server_config(app), handle_signals=False)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not server.started:
        if task.done():
            task.result()
        if loop.time() > deadline:
            raise AssertionError("the dashboard did not start within 10 s")
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()

    return Served(client, f"http://127.0.0.1:{port}", stop)


@pytest.fixture
async def dashboard(client: RedflowClient) -> AsyncIterator[Served]:
    require_dashboard_extra()
    served = await serve_dashboard(client)
    try:
        yield served
    finally:
        await served.stop()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def shots(tmp_path: Path) -> Callable[[Any, str], Awaitable[None]]:
    """``await shots(page, "name")`` saves a full-page screenshot (see the module docstring)."""
    target = os.environ.get("REDFLOW_DASHBOARD_SCREENSHOTS")
    folder = Path(target) if target else tmp_path
    folder.mkdir(parents=True, exist_ok=True)

    async def take(page: Any, name: str) -> None:
        await page.screenshot(path=str(folder / f"dashboard-{name}.png"), full_page=True)

    return take


async def open_page(page: Any, url: str) -> Any:
    """Load a page and check it answered 200."""
    response = await page.goto(url)
    assert response is not None and response.status == 200, f"{url}: {response and response.status}"
    return response
