"""A page costs the same Redis commands with 100,000 runs in the server as with 100: every page reads
index pages and bounded counts, never the whole history. Counted on the dashboard's client
(``counters.commands``), never timed."""

from __future__ import annotations

from typing import Any

import pytest

from redflow import RedflowClient, WorkflowRegistry

from .apps import Shop, define_shop, populate
from .conftest import Served, open_page, require_dashboard_extra

require_dashboard_extra()

from playwright.async_api import expect  # noqa: E402

SEARCH_SCAN_LIMIT = 1000  # redflow.client.queries.SEARCH_SCAN_LIMIT, documented in docs/queries.md
BIG = 100_000
SMALL = 100


async def _cost(dashboard: Served, page: Any, path: str) -> int:
    return sum((await _cost_by_name(dashboard, page, path)).values())


async def _cost_by_name(dashboard: Served, page: Any, path: str) -> dict[str, int]:
    """The commands a page load sends, by name. PING is left out: the client's subscription (left
    from the results the setup waited for) sends one every 10 s, whichever page is loading."""
    before = dashboard.by_name
    await open_page(page, dashboard.url(path))
    after = dashboard.by_name
    return {name: n - before.get(name, 0) for name, n in after.items()
            if n != before.get(name, 0) and name != "PING"}


@pytest.mark.timeout(150)
async def test_each_page_costs_the_same_commands_at_100k_runs_as_at_100(
    client: RedflowClient, registry: WorkflowRegistry, make_worker: Any, dashboard: Served, page: Any, shots: Any
) -> None:
    define_shop(registry, Shop())
    worker = await make_worker(concurrency=8, queues=["default", "fulfilment"])
    ids = await populate(client, registry)
    await worker.stop()  # nothing moves while pages are counted
    digest = registry.get("send-digest")
    assert digest is not None
    existing = (await client.get_stats())["total"]
    queued = await client.enqueue_many(digest, [{"n": i} for i in range(SMALL - existing)])
    assert (await client.get_stats())["total"] == SMALL

    await open_page(page, dashboard.url("/runs"))
    second_page = await page.locator("#next-page").get_attribute("href")
    assert second_page is not None
    pages = [
        "/", "/runs", second_page, "/runs?workflow=send-digest&status=queued", "/runs?status=failed",
        "/runs?queue=mail", "/failures", "/events", "/workflows", f"/runs/{ids['report']}",
        f"/runs/{ids['declined']}", f"/events/{ids['event']}", f"/runs/{ids['waiting']}",
        f"/runs/{queued[40].id}",  # explain_run: queued behind the runs before it
    ]
    for path in pages:  # first loads: anything a client does once is done before counting
        await open_page(page, dashboard.url(path))
    small = {path: await _cost_by_name(dashboard, page, path) for path in pages}

    for start in range(SMALL, BIG, 20_000):
        await client.enqueue_many(digest, [{"n": i} for i in range(start, min(BIG, start + 20_000))],
                                  chunk_size=5000)
    assert (await client.get_stats())["total"] == BIG
    big = {path: await _cost_by_name(dashboard, page, path) for path in pages}
    assert big == small, {p: (small[p], big[p]) for p in pages if small[p] != big[p]}
    # A text search reads runs one by one, but at most SEARCH_SCAN_LIMIT of them per page (then it
    # offers to go on): bounded by that, not by the history.
    search = await _cost(dashboard, page, "/runs?q=cus_typo")
    assert search <= 3 * SEARCH_SCAN_LIMIT + 100, search  # 3 reads per run read, and its index pages
    await expect(page.locator("#runs")).to_contain_text("No runs.")
    await expect(page.locator("main")).to_contain_text(f"read {SEARCH_SCAN_LIMIT} runs")

    # The page of runs really is the newest 50 of 100,000, and its cursor leads on.
    await open_page(page, dashboard.url("/runs"))
    await expect(page.locator("#runs tbody tr")).to_have_count(50)
    await expect(page.locator("#runs")).to_contain_text("send-digest")
    await page.click("#next-page")
    await expect(page.locator("#runs tbody tr")).to_have_count(50)
    await open_page(page, dashboard.url("/"))
    await expect(page.locator("#by-status a.stat").first.locator("b")).to_have_text(str(BIG))
    await expect(page.locator("#queues tr[data-queue=mail] td.num").first).to_have_text(str(BIG - existing))
    print("commands per page at 100k runs:", big)
    await client.reset_state()
