"""The dashboard's actions (POST forms): cancel, retry and replay a run; bulk retry and cancel with a
dry run first. Each checks the form's CSRF field, calls the client, and redirects to the run it
touched (post/redirect/get), or shows what went wrong."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..errors import ConfigurationError
from .filters import RunFilters
from .security import CSRF_FIELD

if TYPE_CHECKING:
    from .app import Dashboard

BULK_ACTIONS = ("retry", "cancel")


class FormRefused(Exception):
    """A form without this dashboard's CSRF field."""


def _dashboard(request: Request) -> Dashboard:
    from .app import dashboard_of

    return dashboard_of(request)


async def _form(request: Request) -> FormData:
    form = await request.form()
    value = form.get(CSRF_FIELD)
    if not _dashboard(request).guard.csrf_matches(value if isinstance(value, str) else None):
        raise FormRefused
    return form


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _refused(request: Request) -> Response:
    return _dashboard(request).error(
        request, 403, "Form refused",
        "This form does not carry the dashboard's current form token: it came from another page, or the "
        "dashboard restarted since the page was loaded. Reload the page and try again.")


def _to_run(run_id: str, done: str, *, live: bool = False) -> RedirectResponse:
    """To the run's page with a notice; ``live``: the page refreshes itself until the run ends."""
    return RedirectResponse(f"/runs/{quote(run_id)}?done={done}{'&live=1' if live else ''}", status_code=303)


def _needs(request: Request, method: str) -> Response:
    return _dashboard(request).error(request, 501, "Not available",
                                     f"this redflow client has no {method}(): upgrade redflow")


async def cancel(request: Request) -> Response:
    try:
        form = await _form(request)
    except FormRefused:
        return _refused(request)
    d = _dashboard(request)
    run_id = request.path_params["run_id"]
    if await d.client.get_run(run_id) is None:
        return d.error(request, 404, "Run not found", f"run {run_id} does not exist")
    reason = _text(form, "reason") or "canceled from the dashboard"
    if not await d.client.cancel_run(run_id, reason=reason):
        return _to_run(run_id, "not_canceled")
    after = await d.client.get_run(run_id)
    return _to_run(run_id, "canceled" if after is not None and after.get("status") == "canceled" else
                   "cancel_requested")


async def retry(request: Request) -> Response:
    try:
        await _form(request)
    except FormRefused:
        return _refused(request)
    d = _dashboard(request)
    method = getattr(d.client, "retry_run", None)
    if method is None:
        return _needs(request, "retry_run")
    handle = await method(request.path_params["run_id"])
    return _to_run(handle.id, "retried", live=True)


async def replay(request: Request) -> Response:
    try:
        form = await _form(request)
    except FormRefused:
        return _refused(request)
    d = _dashboard(request)
    method = getattr(d.client, "replay_run", None)
    if method is None:
        return _needs(request, "replay_run")
    kwargs: dict[str, Any] = {"from_step": _text(form, "from_step") or None, "queue": _text(form, "queue") or None}
    raw_input = _text(form, "input")
    if raw_input:
        try:
            kwargs["input"] = json.loads(raw_input)
        except ValueError as exc:
            raise ConfigurationError(f"the new input is not JSON: {exc}") from None
    handle = await method(request.path_params["run_id"], **kwargs)
    return _to_run(handle.id, "replayed", live=True)


async def bulk(request: Request) -> Response:
    try:
        form = await _form(request)
    except FormRefused:
        return _refused(request)
    d = _dashboard(request)
    action = _text(form, "action")
    if action not in BULK_ACTIONS:
        raise ConfigurationError(f"bulk action must be retry or cancel, got {action!r}")
    method = getattr(d.client, f"{action}_runs", None)
    if method is None:
        return _needs(request, f"{action}_runs")
    f = RunFilters.read(form)
    query = f.bulk()
    stage = _text(form, "stage")
    kwargs: dict[str, Any] = {}
    if action == "cancel":
        kwargs["reason"] = _text(form, "reason") or "canceled in bulk from the dashboard"
    if stage == "run":
        result = await method(query, job_id=_text(form, "job_id") or None, **kwargs)
    else:
        result = await method(query, dry_run=True)
    return d.render(request, "bulk.html", active="runs", action=action, f=f, query=query, result=result,
                    reason=kwargs.get("reason", ""), text_search=bool(f.q))
