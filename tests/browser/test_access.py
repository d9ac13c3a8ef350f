"""Who may use the dashboard: the token rule, the token login, and forms only from its own pages."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest

from redflow import ConfigurationError, RedflowClient, WorkflowRegistry

from .apps import Shop, define_shop
from .conftest import Served, open_page, require_dashboard_extra, serve_dashboard

require_dashboard_extra()

from playwright.async_api import expect  # noqa: E402

from redflow.dashboard.config import DashboardConfig, check_config, is_local_host  # noqa: E402

TOKEN = "t0ken-for-the-browser-tests"


def test_binding_beyond_loopback_needs_a_token() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_local_host(host), host
        check_config(DashboardConfig(url=None, prefix=None, host=host))
    for host in ("0.0.0.0", "::", "10.1.2.3", "dashboard.internal", "192.168.0.9"):
        assert not is_local_host(host), host
        with pytest.raises(ConfigurationError, match="without a token"):
            check_config(DashboardConfig(url=None, prefix=None, host=host))
        check_config(DashboardConfig(url=None, prefix=None, host=host, token=TOKEN))
    with pytest.raises(ConfigurationError, match="at least 8"):
        check_config(DashboardConfig(url=None, prefix=None, token="short"))


@pytest.fixture
async def guarded(client: RedflowClient) -> Any:
    served = await serve_dashboard(client, token=TOKEN)
    try:
        yield served
    finally:
        await served.stop()


@pytest.mark.timeout(30)
async def test_with_a_token_every_page_asks_for_it_once(guarded: Served, page: Any, browser: Any) -> None:
    response = await page.goto(guarded.url("/runs?status=failed"))
    assert response is not None and response.status == 401
    await expect(page.locator("h1")).to_have_text("Dashboard token")
    await page.fill("input[name=token]", "not-the-token")
    await page.click("button[type=submit]")
    await expect(page.locator(".alert")).to_contain_text("not this dashboard's token")
    await page.fill("input[name=token]", TOKEN)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(guarded.url("/runs"))
    await expect(page.locator("h1")).to_have_text("Runs")
    await open_page(page, guarded.url("/workflows"))  # the session cookie carries on
    cookies = await page.context.cookies()
    assert [c["name"] for c in cookies] == ["redflow_dashboard"] and TOKEN not in cookies[0]["value"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"

    # A link with ?token= signs a new browser in and drops the token from the address.
    other = await browser.new_context()
    try:
        fresh = await other.new_page()
        await open_page(fresh, guarded.url(f"/events?token={TOKEN}"))
        await expect(fresh).to_have_url(guarded.url("/events"))
    finally:
        await other.close()
    # Scripts send it as a bearer token.
    api = page.context.request
    anonymous = await browser.new_context()
    try:
        assert (await anonymous.request.get(guarded.url("/"))).status == 401
        bearer = await anonymous.request.get(guarded.url("/"), headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status == 200
        refused = await anonymous.request.post(guarded.url("/runs/bulk"), form={"action": "cancel"})
        assert refused.status == 401
        for target in ("//evil.example/x", "/\\evil.example", "https://evil.example"):  # no open redirect
            signed_in = await anonymous.request.post(guarded.url("/login"), form={"token": TOKEN, "next": target},
                                                     max_redirects=0)
            assert signed_in.status == 303 and signed_in.headers["location"] == "/", target
    finally:
        await anonymous.close()
    assert (await api.get(guarded.url("/healthz"))).status == 200


@pytest.mark.timeout(30)
async def test_forms_from_elsewhere_are_refused_and_change_nothing(
    client: RedflowClient, registry: WorkflowRegistry, dashboard: Served, page: Any
) -> None:
    define_shop(registry, Shop())
    digest = registry.get("send-digest")
    assert digest is not None
    [handle] = await client.enqueue_many(digest, [None], run_at=datetime.now() + timedelta(hours=1))
    await open_page(page, dashboard.url(f"/runs/{handle.id}"))
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    api = page.context.request
    cancel = dashboard.url(f"/runs/{handle.id}/cancel")

    no_token = await api.post(cancel, form={"reason": "x"})
    assert no_token.status == 403 and "Form refused" in await no_token.text()
    wrong_token = await api.post(cancel, form={"csrf": "0" * len(csrf)})
    assert wrong_token.status == 403
    cross_site = await api.post(cancel, form={"csrf": csrf}, headers={"Origin": "http://evil.example"})
    assert cross_site.status == 403 and "another site" in await cross_site.text()
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "scheduled"

    # DNS rebinding: a page of another host name that resolves to 127.0.0.1 gets nothing.
    assert await _status_with_host(dashboard, "evil.example") == 421
    assert await _status_with_host(dashboard, "localhost:1234") == 200

    same_site = await api.post(cancel, form={"csrf": csrf, "reason": "by hand"},
                               headers={"Origin": dashboard.base})
    assert same_site.status == 200
    state = await client.get_run(handle.id)
    assert state is not None and state["status"] == "canceled"


async def _status_with_host(served: Served, host: str) -> int:
    port = int(served.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()
