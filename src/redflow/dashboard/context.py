"""What every page and action works with: the client, the access guard, and template rendering."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from .format import FILTERS, now_ms, safe_url
from .security import CSRF_FIELD, Guard

if TYPE_CHECKING:
    from ..client import RedflowClient

NAV = [("overview", "/", "Overview"), ("runs", "/runs", "Runs"), ("failures", "/failures", "Failures"),
       ("events", "/events", "Events"), ("workflows", "/workflows", "Workflows")]


class Dashboard:
    """What every handler needs: the client, the guard and the templates."""

    def __init__(self, client: RedflowClient, guard: Guard, *, redis_url: str | None) -> None:
        self.client = client
        self.guard = guard
        self.redis_url = safe_url(redis_url)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("redflow.dashboard", "templates"),
            autoescape=jinja2.select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(FILTERS)
        # Globals reach imported macros too (the CSRF field is rendered by a macro).
        self.env.globals.update(nav=NAV, csrf_field=CSRF_FIELD, csrf=guard.csrf_token, qs=_query)

    def render(self, request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("active", "")
        context.setdefault("notice", None)
        context.setdefault("now", now_ms())
        html = self.env.get_template(template).render(
            request=request, prefix=self.client.prefix, redis_url=self.redis_url,
            token_mode=self.guard.token is not None, **context,
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def error(self, request: Request, status: int, title: str, message: str) -> HTMLResponse:
        return self.render(request, "error.html", status=status, title=title, message=message)


def _query(params: dict[str, Any], **changes: Any) -> str:
    """A query string from ``params`` with ``changes`` applied; empty values are left out."""
    merged = {**params, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


def dashboard_of(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard
