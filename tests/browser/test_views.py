"""The dashboard's formatting, filters and timeline, without a browser or a server."""

from __future__ import annotations

from typing import Any

import pytest

from redflow import ConfigurationError

from .conftest import require_dashboard_extra

require_dashboard_extra()

from redflow.dashboard import format as fmt  # noqa: E402
from redflow.dashboard import timeline  # noqa: E402
from redflow.dashboard.filters import RunFilters, parse_time  # noqa: E402
from redflow.dashboard.security import Guard  # noqa: E402


def test_durations_read_as_their_two_largest_units() -> None:
    assert [fmt.duration(ms) for ms in (None, 0, 850, 4200, 184_000, 7_500_000, 273_600_000)] == [
        "-", "0 ms", "850 ms", "4.2 s", "3 m 04 s", "2 h 05 m", "3 d 4 h"]
    assert fmt.relative(10_000, 4_000) == "in 6.0 s" and fmt.relative(1_000, 4_000) == "3.0 s ago"


def test_urls_lose_their_password_and_errors_read_as_one_line() -> None:
    assert fmt.safe_url("redis://:hunter2@cache:6380/1") == "redis://***@cache:6380/1"
    assert fmt.safe_url("rediss://app:hunter2@cache/0") == "rediss://app:***@cache/0"
    assert fmt.safe_url("redis://cache:6379") == "redis://cache:6379"
    assert fmt.error_line({"name": "ValueError", "message": "bad", "stack": "..."}) == "ValueError: bad"
    assert fmt.error_extra({"name": "E", "message": "m", "kind": "k", "stack": "s", "step": "ship"}) == {
        "step": "ship"}


def test_filters_make_the_search_and_the_bulk_query_of_one_selection() -> None:
    f = RunFilters.read({"workflow": "charge", "status": "failed", "queue": "q", "q": "cus_1",
                         "after": "1700000000000", "cursor": "01ABC-p0", "sort": "asc"})
    params = f.search()
    assert (params.workflow, params.status, params.queue, params.query, params.created_after, params.cursor,
            params.sort) == ("charge", "failed", "q", "cus_1", 1_700_000_000_000, "01ABC-p0", "asc")
    assert f.bulk() == {"workflow": "charge", "status": "failed", "queue": "q", "created_after_ms": 1_700_000_000_000}
    assert "cursor" not in f.params() and f.params(cursor="X")["cursor"] == "X"
    assert parse_time("2026-11-01T14:03", "t") is not None
    with pytest.raises(ConfigurationError, match="status must be one of"):
        RunFilters.read({"status": "exploded"})
    with pytest.raises(ConfigurationError, match="created after"):
        RunFilters.read({"after": "soon"}).search()


def test_guard_tokens() -> None:
    open_guard, other = Guard(None), Guard(None)
    assert open_guard.csrf_matches(open_guard.csrf_token) and not open_guard.csrf_matches(other.csrf_token)
    assert open_guard.authenticated(None, None)
    assert open_guard.host_allowed("127.0.0.1:8080") and open_guard.host_allowed("[::1]:8080")
    assert not open_guard.host_allowed("attacker.example:8080") and not open_guard.host_allowed(None)
    guarded = Guard("a-long-token")
    assert Guard("a-long-token").csrf_token == guarded.csrf_token  # forms survive a restart
    assert not guarded.authenticated(None, None) and guarded.authenticated("Bearer a-long-token", None)
    assert guarded.authenticated(None, guarded.session_value) and not guarded.authenticated(None, "forged")
    assert guarded.host_allowed("dashboard.internal")
    assert Guard.same_origin(None, "h:1") and Guard.same_origin("http://h:1", "h:1")
    assert not Guard.same_origin("http://evil:1", "h:1") and not Guard.same_origin("null", "h:1")


def _step(name: str, attempt: int, start: int, end: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "seq": 1, "attempt": attempt, "status": "succeeded", "started_at": start,
            "finished_at": end, "output": None, **extra}


def test_timeline_of_a_run_waiting_in_its_second_attempt() -> None:
    run: Any = {"id": "r", "status": "scheduled", "created_at": 1000, "started_at": 1500, "attempt": 2}
    first: Any = {"attempt": 1, "status": "failed", "started_at": 1100, "finished_at": 1200, "output": None,
                  "error": {}, "steps": [_step("a", 1, 1110, 1150)]}
    waiting = _step("nap", 2, 1600, 1600, status="running", kind="sleep", wait_until_at=9000)
    bars = timeline.build(run, [waiting], [first], now_ms=2000)
    assert [(b.label, b.kind, b.end_ms) for b in bars] == [
        ("waiting to start", "queue", 1100), ("attempt 1", "attempt", 1200), ("a", "step", 1150),
        ("until the next attempt", "queue", 1500), ("attempt 2", "attempt", None), ("nap", "sleep", None)]
    assert bars[0].left_pct == 0 and bars[4].left_pct == 50.0 and bars[4].width_pct == 50.0
    assert "until" in bars[5].note
    assert all(0 <= b.left_pct <= 100 and b.width_pct > 0 for b in bars)
