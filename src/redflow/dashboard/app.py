"""The dashboard's web application: routes, the access guard, error pages.

Server-rendered HTML (Starlette + Jinja2), plain forms for actions, no JavaScript build. Pages are in
``pages``, actions in ``actions``; both reach Redis only through the public RedflowClient API.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from ..errors import ConfigurationError, InputValidationError, PayloadEncodingError, RedflowError, RunNotFoundError
from . import actions, pages
from .context import Dashboard, dashboard_of
from .security import COOKIE, Guard

if TYPE_CHECKING:
    from ..client import RedflowClient

log = logging.getLogger("redflow.dashboard")

# --- access -----------------------------------------------------------------------------------------------
class GuardMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        guard = dashboard_of(request).guard
        host = request.headers.get("host")
        if not guard.host_allowed(host):
            return PlainTextResponse(
                f"This dashboard answers on localhost only (Host {host!r}); start it with a token to serve "
                "other host names.", status_code=421)
        if request.method == "POST" and not guard.same_origin(request.headers.get("origin"), host):
            return PlainTextResponse("Refused: a form posted from another site.", status_code=403)
        if request.url.path in ("/login", "/healthz"):
            return await call_next(request)
        if not guard.authenticated(request.headers.get("authorization"), request.cookies.get(COOKIE)):
            token = request.query_params.get("token")
            if request.method == "GET" and guard.token_matches(token):
                rest = urlencode([(k, v) for k, v in parse_qsl(request.url.query) if k != "token"])
                response = RedirectResponse(request.url.path + ("?" + rest if rest else ""), status_code=303)
                _set_session(response, guard)
                return response
            if request.method == "GET":
                return dashboard_of(request).render(request, "login.html", status=401, next=request.url.path,
                                                    failed=token is not None)
            return PlainTextResponse("The dashboard token is missing or wrong.", status_code=401)
        return await call_next(request)


def _set_session(response: Response, guard: Guard) -> None:
    response.set_cookie(COOKIE, guard.session_value, httponly=True, samesite="strict", path="/")


async def login(request: Request) -> Response:
    dashboard = dashboard_of(request)
    form = await request.form()
    token = form.get("token")
    target = str(form.get("next") or "/")
    if not target.startswith("/") or target[1:2] in ("/", "\\"):  # only a path of this site
        target = "/"
    if not dashboard.guard.token_matches(token if isinstance(token, str) else None):
        return dashboard.render(request, "login.html", status=401, next=target, failed=True)
    response = RedirectResponse(target, status_code=303)
    _set_session(response, dashboard.guard)
    return response


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


# --- errors -------------------------------------------------------------------------------------------------
def _status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, ConnectionError):  # before RedflowError: the connection errors are both
        return 503, "Redis is unreachable"
    if isinstance(exc, RunNotFoundError):
        return 404, "Not found"
    if isinstance(exc, ConfigurationError | InputValidationError | PayloadEncodingError | ValueError):
        return 400, "Bad request"
    if isinstance(exc, RedflowError):
        return 409, "Refused"
    return 500, "Internal error"


async def on_error(request: Request, exc: Exception) -> Response:
    status, title = _status_of(exc)
    if status == 500:
        log.error("dashboard request %s %s failed", request.method, request.url.path, exc_info=exc)
    message = str(exc) or type(exc).__name__
    if status == 503:
        message = f"cannot reach Redis at {dashboard_of(request).redis_url}: {message}"
    elif status == 500:
        message = f"{type(exc).__name__}: {message} (the traceback is in the dashboard's log)"
    return dashboard_of(request).error(request, status, title, message)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    title = "Not found" if exc.status_code == 404 else "Error"
    return dashboard_of(request).error(request, exc.status_code, title, str(exc.detail))


# --- application ----------------------------------------------------------------------------------------------
Handler = Callable[[Request], Awaitable[Response]]


def create_app(
    client: RedflowClient, *, token: str | None = None, redis_url: str | None = None, close_client: bool = False
) -> Starlette:
    """The dashboard as an ASGI application over ``client``. With ``close_client`` the app closes the
    client when it shuts down (the CLI and the supervisor hand it a client of its own)."""
    dashboard = Dashboard(client, Guard(token), redis_url=redis_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_client:
                await client.close()

    routes = [
        Route("/", pages.overview),
        Route("/runs", pages.runs),
        Route("/runs/bulk", actions.bulk, methods=["POST"]),
        Route("/runs/{run_id}", pages.run_detail),
        Route("/runs/{run_id}/cancel", actions.cancel, methods=["POST"]),
        Route("/runs/{run_id}/retry", actions.retry, methods=["POST"]),
        Route("/runs/{run_id}/replay", actions.replay, methods=["POST"]),
        Route("/failures", pages.failures),
        Route("/events", pages.events),
        Route("/events/{event_id:path}", pages.event_detail),
        Route("/workflows", pages.workflows),
        Route("/login", login, methods=["POST"]),
        Route("/healthz", healthz),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(GuardMiddleware)],
        # Expected failures are answered inside the app; only Exception (500) also reaches the server log.
        exception_handlers={HTTPException: on_http_error, RedflowError: on_error, ConnectionError: on_error,
                            OSError: on_error, ValueError: on_error, Exception: on_error},
        lifespan=lifespan,
    )
    app.state.dashboard = dashboard
    return app
