"""The dashboard's buttons, clicked in Chromium: each calls the client API and the change is real."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from redflow import ListRunsParams, RedflowClient, RunFailedError, WorkflowRegistry

from ..conftest import wait_until
from .apps import Shop, define_shop
from .conftest import Served, open_page, require_dashboard_extra

require_dashboard_extra()

from playwright.async_api import expect  # noqa: E402

RESULT_MS = 15_000


@pytest.fixture
def shop(registry: WorkflowRegistry) -> Shop:
    state = Shop()
    define_shop(registry, state)
    return state


@pytest.mark.timeout(60)
async def test_failed_run_followed_from_failures_is_retried_from_its_page_and_succeeds(
    client: RedflowClient, make_worker: Any, dashboard: Served, page: Any, shop: Shop, shots: Any
) -> None:
    await make_worker(concurrency=4, queues=["fulfilment"])
    handle = await client.run_by_name("ship-order", {"order": "ord_7"})
    with pytest.raises(RunFailedError):
        await handle.result(timeout_ms=RESULT_MS)
    assert shop.calls == {"reserve": 1, "ship": 2}

    await open_page(page, dashboard.url("/failures"))
    group = page.locator("#cat-exhausted .failure-group")
    await expect(group).to_have_count(1)
    await expect(group).to_contain_text("carrier API unreachable")
    await expect(group.locator("td").nth(1)).to_have_text("ship")  # the failing step
    await group.locator(f"a:has-text('{handle.id}')").click()

    await expect(page).to_have_url(dashboard.url(f"/runs/{handle.id}"))
    await expect(page.locator("h1 .badge")).to_have_text("failed")
    await expect(page.locator("#error pre.stack")).to_contain_text("connection refused")

    shop.carrier_down = False
    await page.click("#retry")
    await expect(page.locator(".notice")).to_contain_text("Retry started")
    # After a retry the run page refreshes itself until the run ends: no reload by hand.
    await expect(page).to_have_url(dashboard.url(f"/runs/{handle.id}?done=retried&live=1"))
    await expect(page.locator("h1 .badge")).to_have_text("succeeded", timeout=RESULT_MS)
    await expect(page.locator("#output")).to_contain_text("TRK-ord_7")
    await expect(page.locator("#timeline tr[data-kind=attempt]")).to_have_count(3)
    assert await handle.result(timeout_ms=RESULT_MS) == {"slot": "A-7", "order": "ord_7", "tracking": "TRK-ord_7"}
    assert shop.calls == {"reserve": 1, "ship": 3}  # the recorded step did not run again
    await shots(page, "retried-run")


@pytest.mark.timeout(60)
async def test_bulk_cancel_shows_the_dry_run_count_then_cancels_exactly_those_runs(
    client: RedflowClient, dashboard: Served, page: Any, shop: Shop, shots: Any
) -> None:
    later = datetime.now() + timedelta(hours=1)
    digest = client.registry.get("send-digest") if client.registry else None
    report = client.registry.get("nightly-report") if client.registry else None
    assert digest is not None and report is not None
    doomed = await client.enqueue_many(digest, [{"user": i} for i in range(25)], run_at=later)
    kept = await client.enqueue_many(report, [None] * 3, run_at=later)

    await open_page(page, dashboard.url("/runs?workflow=send-digest&status=scheduled"))
    await expect(page.locator("#runs tbody tr")).to_have_count(25)
    await page.click("#bulk-cancel")
    await expect(page.locator("#dry-run #matched")).to_have_text("25")
    await expect(page.locator("#confirm")).to_have_text("Cancel 25 runs")
    await shots(page, "bulk-dry-run")
    # The dry run changed nothing.
    scheduled = await client.list_runs(ListRunsParams(workflow="send-digest", status="scheduled", limit=100))
    assert len(scheduled) == 25

    await page.fill("input[name=reason]", "digest paused for maintenance")
    await page.click("#confirm")
    await expect(page.locator("#bulk-result #done-count")).to_have_text("25")
    await expect(page.locator("#bulk-result #finished")).to_have_text("yes")
    for h in doomed:
        state = await client.get_run(h.id)
        assert state is not None and state["status"] == "canceled", state
        assert state.get("cancel_reason") == "digest paused for maintenance"
    for h in kept:
        state = await client.get_run(h.id)
        assert state is not None and state["status"] == "scheduled"

    await page.click("text=Back to the runs")
    await expect(page.locator("#runs tbody")).to_have_text("No runs.")


@pytest.mark.timeout(60)
async def test_bulk_retry_and_replay_from_a_step_and_cancel_buttons(
    client: RedflowClient, make_worker: Any, dashboard: Served, page: Any, shop: Shop
) -> None:
    await make_worker(concurrency=4, queues=["default", "fulfilment"])
    failed = [await client.run_by_name("ship-order", {"order": f"ord_{i}"}) for i in range(3)]
    for h in failed:
        with pytest.raises(RunFailedError):
            await h.result(timeout_ms=RESULT_MS)

    # Bulk retry of the failed ship-order runs, after the dry run.
    shop.carrier_down = False
    await open_page(page, dashboard.url("/runs?workflow=ship-order&status=failed"))
    await page.click("#bulk-retry")
    await expect(page.locator("#dry-run #matched")).to_have_text("3")
    await page.click("#confirm")
    await expect(page.locator("#bulk-result #done-count")).to_have_text("3")
    for h in failed:
        assert (await h.result(timeout_ms=RESULT_MS))["tracking"].startswith("TRK-")
    assert shop.calls["reserve"] == 3

    # Replay from the middle step: a new linked run that reuses "reserve" and runs "ship" again.
    await open_page(page, dashboard.url(f"/runs/{failed[0].id}"))
    await page.select_option("#replay-form select[name=from_step]", "ship")
    await page.click("#replay")
    await expect(page.locator(".notice")).to_contain_text("Replay started")
    replay_id = page.url.split("/runs/")[1].split("?")[0]
    assert replay_id != failed[0].id
    assert (await client.make_run_handle(replay_id).result(timeout_ms=RESULT_MS))["tracking"] == "TRK-ord_0"
    assert shop.calls["reserve"] == 3
    await page.reload()
    await expect(page.locator("dl.kv")).to_contain_text(failed[0].id)  # replayed from

    # A bad input in the replay form: a clear error, nothing started.
    await open_page(page, dashboard.url(f"/runs/{failed[0].id}"))
    await page.fill("#replay-form textarea[name=input]", "{not json")
    await page.click("#replay")
    await expect(page.locator(".alert")).to_contain_text("not JSON")

    # Cancel a run waiting for an event.
    waiting = await client.run_by_name("await-approval", {"refund": "rf_9"})
    await wait_until(lambda: _status_is(client, waiting.id, "scheduled"), what="run waiting")
    await open_page(page, dashboard.url(f"/runs/{waiting.id}"))
    await page.fill("input[name=reason]", "refund withdrawn")
    await page.click("#cancel")
    await expect(page.locator(".notice")).to_contain_text("Run canceled")
    await expect(page.locator("h1 .badge")).to_have_text("canceled")
    # Retrying a run that succeeded is refused with the client's reason.
    response = await page.request.post(dashboard.url(f"/runs/{failed[0].id}/retry"),
                                       form={"csrf": await _csrf(page)})
    assert response.status == 409
    assert "only a failed or canceled run can be retried" in await response.text()


async def _status_is(client: RedflowClient, run_id: str, status: str) -> bool:
    state = await client.get_run(run_id)
    return state is not None and state["status"] == status


async def _csrf(page: Any) -> str:
    value = await page.locator("input[name=csrf]").first.get_attribute("value")
    assert value
    return str(value)
