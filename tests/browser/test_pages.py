"""Every dashboard page, loaded in Chromium against a server holding real runs of every kind."""

from __future__ import annotations

from typing import Any

import pytest

from redflow import RedflowClient, WorkflowRegistry

from .apps import Shop, define_shop, populate
from .conftest import Served, open_page, require_dashboard_extra

require_dashboard_extra()

from playwright.async_api import expect  # noqa: E402


@pytest.fixture
async def shop_runs(client: RedflowClient, registry: WorkflowRegistry, make_worker: Any) -> dict[str, Any]:
    define_shop(registry, Shop())
    await make_worker(concurrency=8, queues=["default", "fulfilment", "mail"])
    return await populate(client, registry)


@pytest.mark.timeout(60)
async def test_every_page_renders_real_runs(dashboard: Served, page: Any, shop_runs: dict[str, Any],
                                            shots: Any) -> None:
    # Overview: counts by status, the last hour, queues, and the cron trigger with its next fire.
    await open_page(page, dashboard.url("/"))
    await expect(page.locator("#by-status [data-status=failed] b")).to_have_text("4")
    await expect(page.locator("#last-hour [data-outcome=succeeded] b")).to_have_text("9")
    await expect(page.locator("#queues tr[data-queue=fulfilment]")).to_be_visible()
    await expect(page.locator("#crons")).to_contain_text("0 3 * * *")
    await expect(page.locator("#crons")).to_contain_text("nightly-report")
    await expect(page.locator("#workers tr[data-alive=yes]")).to_have_count(1)
    await expect(page.locator("#workers tr[data-alive=yes]")).to_contain_text("fulfilment")
    await shots(page, "overview")

    # Runs: the newest first, with filters; a workflow and status filter narrows the page.
    await open_page(page, dashboard.url("/runs"))
    await expect(page.locator("#runs tbody tr")).to_have_count(14)
    await page.select_option("select[name=workflow]", "charge-card")
    await page.select_option("select[name=status]", "failed")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#runs tbody tr")).to_have_count(4)
    await shots(page, "runs")
    await page.fill("input[name=q]", "cus_typo")
    await page.click("#filters button[type=submit]")
    await expect(page.locator("#runs tbody tr")).to_have_count(1)
    await expect(page.locator("#runs")).to_contain_text(shop_runs["negative"])

    # Run detail of a run with a child, a stream and steps: the timeline and the parent link.
    await open_page(page, dashboard.url(f"/runs/{shop_runs['report']}"))
    await expect(page.locator("h1 .badge")).to_have_text("succeeded")
    await expect(page.locator("#timeline tr[data-kind=attempt]")).to_have_count(1)
    await expect(page.locator("#timeline tr[data-kind=child]")).to_contain_text("render")
    # Values written before the child ended are written again by the replay (streams keep both).
    await expect(page.locator("#stream tbody tr").last).to_contain_text('{"progress": 100}')
    await expect(page.locator("#output")).to_contain_text('"rows": 2')
    await shots(page, "run")
    await page.click("#children a.mono")
    await expect(page.locator("h1 .badge")).to_have_text("succeeded")
    await expect(page.locator("#timeline tr[data-kind=sleep]")).to_contain_text("let-cache-warm")
    await page.click("text=" + shop_runs["report"])
    await expect(page).to_have_url(dashboard.url(f"/runs/{shop_runs['report']}"))

    # A failed run: two attempts, the error with its stack as lines.
    await open_page(page, dashboard.url(f"/runs/{shop_runs['declined']}"))
    await expect(page.locator("#timeline tr[data-kind=attempt]")).to_have_count(2)
    await expect(page.locator("#timeline")).to_contain_text("until the next attempt")
    await expect(page.locator("#error pre.stack")).to_contain_text("Traceback (most recent call last)")
    await expect(page.locator("#error pre.stack")).to_contain_text("card declined by issuer")
    await expect(page.locator("#retry")).to_be_visible()
    await shots(page, "failed-run")

    # A run waiting for an event: explain_run says so, and it can be canceled.
    await open_page(page, dashboard.url(f"/runs/{shop_runs['waiting']}"))
    await expect(page.locator("#explanation")).to_have_attribute("data-reason", "waiting_event")
    await expect(page.locator("#explanation")).to_contain_text("refund.approved")
    await expect(page.locator("#cancel")).to_be_visible()
    await shots(page, "waiting-run")

    # Failures: exhausted, non-retriable and their groups.
    await open_page(page, dashboard.url("/failures"))
    await expect(page.locator("#cat-exhausted .failure-group")).to_have_count(1)
    await expect(page.locator("#cat-exhausted")).to_contain_text("card declined by issuer")
    await expect(page.locator("#cat-exhausted .failure-group td.num")).to_have_text("3")
    await expect(page.locator("#cat-non_retriable .failure-group")).to_have_count(1)
    await shots(page, "failures")

    # Events: the list, then the detail with its delivery to the subscriber's run.
    await open_page(page, dashboard.url("/events"))
    await expect(page.locator("#events tbody tr")).to_have_count(1)
    await page.click(f"text={shop_runs['event']}")
    await expect(page.locator("#deliveries")).to_contain_text("on-order-paid")
    await expect(page.locator("#event-data")).to_contain_text("ord_42")
    await shots(page, "event")
    await page.click(f"#deliveries a:has-text('{shop_runs['paid']}')")
    await expect(page.locator("h1")).to_contain_text(shop_runs["paid"])

    # Workflows: metadata, limits and their live state.
    await open_page(page, dashboard.url("/workflows"))
    row = page.locator("#workflows tr[data-workflow=on-order-paid]")
    await expect(row).to_contain_text("max concurrency 4")
    await expect(row).to_contain_text("throttle 50 per 1.0 s")
    await expect(page.locator("#workflows tr[data-workflow=nightly-report]")).to_contain_text("0 3 * * *")
    await expect(page.locator("#workflows tr[data-workflow=await-approval] td.num").nth(3)).to_have_text("1")
    await shots(page, "workflows")


@pytest.mark.timeout(30)
async def test_missing_run_and_bad_filter_get_clear_error_pages(dashboard: Served, page: Any) -> None:
    response = await page.goto(dashboard.url("/runs/01NOPE0000000000000000000-p0"))
    assert response is not None and response.status == 404
    await expect(page.locator(".alert")).to_contain_text("does not exist")
    response = await page.goto(dashboard.url("/runs?status=exploded"))
    assert response is not None and response.status == 400
    await expect(page.locator(".alert")).to_contain_text("status must be one of")
    response = await page.goto(dashboard.url("/runs?after=yesterday-ish"))
    assert response is not None and response.status == 400
    await expect(page.locator(".alert")).to_contain_text("created after must be a date")
    response = await page.goto(dashboard.url("/events/evt_missing"))
    assert response is not None and response.status == 404
