"""The dashboard's actions (POST forms): cancel, retry and replay a run; bulk retry and cancel with a
dry run first. Each checks the form's CSRF field, calls the client, and redirects to the run it
touched (post/redirect/get), or shows what went wrong."""

from __future__ import annotations

import json
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..errors import ConfigurationError
from .context import dashboard_of
from .filters import RunFilters
from .security import CSRF_FIELD

BULK_ACTIONS = ("retry", "cancel")


class FormRefused(Exception):
    """A form without this dashboard's CSRF field."""


async def _form(request: Request) -> FormData:
    form = await request.form()
    value = form.get(CSRF_FIELD)
    if not dashboard_of(request).guard.csrf_matches(value if isinstance(value, str) else None):
        raise FormRefused
    return form


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _refused(request: Request) -> Response:
    return dashboard_of(request).error(
        request, 403, "Form refused",
        "This form does not carry the dashboard's current form token: it came from another page, or the "
        "dashboard restarted since the page was loaded. Reload the page and try again.")


def _to_run(run_id: str, done: str, *, live: bool = False) -> RedirectResponse:
    """To the run's page with a notice; ``live``: the page refreshes itself until the run ends."""
    return RedirectResponse(f"/runs/{quote(run_id)}?done={done}{'&live=1' if live else ''}", status_code=303)


async def cancel(request: Request) -> Response:
    try:
        form = await _form(request)
    except FormRefused:
        return _refused(request)
    d = dashboard_of(request)
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
    handle = await dashboard_of(request).client.retry_run(request.path_params["run_id"])
    return _to_run(handle.id, "retried", live=True)


async def replay(request: Request) -> Response:
    try:
        form = await _form(request)
    except FormRefused:
        return _refused(request)
    client = dashboard_of(request).client
    run_id = request.path_params["run_id"]
    from_step, queue = _text(form, "from_step") or None, _text(form, "queue") or None
    raw_input = _text(form, "input")
    if raw_input:
        try:
            new_input = json.loads(raw_input)
        except ValueError as exc:
            raise ConfigurationError(f"the new input is not JSON: {exc}") from None
        handle = await client.replay_run(run_id, from_step=from_step, queue=queue, input=new_input)
    else:
        handle = await client.replay_run(run_id, from_step=from_step, queue=queue)
    return _to_run(handle.id, "replayed", live=True)


async def bulk(request: Request) -> Response:
    try:
        form = await _form(request)
    except FormRefused:
        return _refused(request)
    d = dashboard_of(request)
    action = _text(form, "action")
    if action not in BULK_ACTIONS:
        raise ConfigurationError(f"bulk action must be retry or cancel, got {action!r}")
    f = RunFilters.read(form)
    query = f.bulk()
    dry_run = _text(form, "stage") != "run"  # anything but a confirmation only counts
    job_id = None if dry_run else _text(form, "job_id") or None
    reason = ""
    if action == "cancel":
        reason = _text(form, "reason") or "canceled in bulk from the dashboard"
        result = await d.client.cancel_runs(query, dry_run=dry_run, reason=reason, job_id=job_id)
    else:
        result = await d.client.retry_runs(query, dry_run=dry_run, job_id=job_id)
    return d.render(request, "bulk.html", active="runs", action=action, f=f, query=query, result=result,
                    reason=reason, text_search=bool(f.q))
