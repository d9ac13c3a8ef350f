"""The runs page's filters, read from a query string or a form: one definition for the list, its
cursor links and the bulk actions over the same selection."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, cast

from ..errors import ConfigurationError
from ..types import BulkQuery, RunStatus, SearchRunsParams

STATUSES: tuple[str, ...] = ("scheduled", "queued", "running", "succeeded", "failed", "canceled")
PAGE_SIZE = 50


def parse_time(value: str, name: str) -> int | None:
    """A datetime-local value ('2026-11-01T14:03', this machine's zone) or epoch ms, as epoch ms."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return int(value)
    try:
        return int(datetime.fromisoformat(value).astimezone().timestamp() * 1000)
    except ValueError:
        raise ConfigurationError(f"{name} must be a date and time like 2026-11-01T14:03, got {value!r}") from None


def time_input(ms: int | None) -> str:
    """Epoch ms as a datetime-local input's value."""
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%dT%H:%M")


@dataclass(slots=True)
class RunFilters:
    workflow: str = ""
    status: str = ""
    queue: str = ""
    q: str = ""
    after: str = ""
    before: str = ""
    parent: str = ""
    cursor: str = ""
    sort: str = "desc"

    @classmethod
    def read(cls, source: Mapping[str, Any]) -> RunFilters:
        def get(name: str) -> str:
            value = source.get(name)
            return value.strip() if isinstance(value, str) else ""

        f = cls(**{name: get(name) for name in ("workflow", "status", "queue", "q", "after", "before", "parent",
                                                 "cursor")})
        f.sort = "asc" if get("sort") == "asc" else "desc"
        if f.status and f.status not in STATUSES:
            raise ConfigurationError(f"status must be one of {', '.join(STATUSES)}, got {f.status!r}")
        return f

    @property
    def after_ms(self) -> int | None:
        return parse_time(self.after, "created after")

    @property
    def before_ms(self) -> int | None:
        return parse_time(self.before, "created before")

    def search(self, limit: int = PAGE_SIZE) -> SearchRunsParams:
        return SearchRunsParams(
            status=cast(RunStatus, self.status) if self.status else None, workflow=self.workflow or None,
            queue=self.queue or None, parent_run_id=self.parent or None, query=self.q or None,
            created_after=self.after_ms, created_before=self.before_ms, cursor=self.cursor or None,
            limit=limit, sort="asc" if self.sort == "asc" else "desc",
        )

    def bulk(self) -> BulkQuery:
        """The selection of a bulk action: the index filters (text search and parent do not apply)."""
        query = BulkQuery()
        if self.workflow:
            query["workflow"] = self.workflow
        if self.status:
            query["status"] = cast(RunStatus, self.status)
        if self.queue:
            query["queue"] = self.queue
        if (after := self.after_ms) is not None:
            query["created_after_ms"] = after
        if (before := self.before_ms) is not None:
            query["created_before_ms"] = before
        return query

    def params(self, **changes: str) -> dict[str, str]:
        """The filters as query parameters (the cursor only when given in ``changes``)."""
        values = {k: v for k, v in asdict(self).items() if v and k != "cursor"}
        if values.get("sort") == "desc":
            del values["sort"]
        values.update(changes)
        return {k: v for k, v in values.items() if v}

    def describe(self) -> str:
        parts = [f"{name} {value}" for name, value in (
            ("workflow", self.workflow), ("status", self.status), ("queue", self.queue),
            ("created after", self.after), ("created before", self.before)) if value]
        return ", ".join(parts) if parts else "every run"
