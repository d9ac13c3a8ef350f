"""Serving the dashboard with uvicorn: from the ``redflow dashboard`` command, from the supervisor's
dashboard process, or inside a test's event loop (without touching signal handlers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from ..client import DEFAULT_URL, create_client
from .app import create_app
from .config import DashboardConfig


class _Server(uvicorn.Server):
    """uvicorn's server; with ``handle_signals=False`` it leaves the process's signal handlers alone
    (a test, or a host process that stops it through ``should_exit``)."""

    def __init__(self, config: uvicorn.Config, handle_signals: bool) -> None:
        super().__init__(config)
        self._handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if self._handle_signals:
            with super().capture_signals():
                yield
        else:
            yield


def build_server(config: DashboardConfig, *, handle_signals: bool = True) -> uvicorn.Server:
    """A server for ``config`` with a client of its own, closed when the server stops."""
    client = create_client(url=config.url, prefix=config.prefix)
    app = create_app(client, token=config.token, redis_url=redis_url(config), close_client=True)
    return _Server(server_config(app, config.host, config.port), handle_signals)


def server_config(app: Any, host: str = "127.0.0.1", port: int = 0) -> uvicorn.Config:
    """uvicorn's settings for the dashboard: no access log, no websockets (it serves none)."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                          server_header=False, ws="none")


def redis_url(config: DashboardConfig) -> str:
    """The URL the dashboard's client connects to (as create_client resolves it)."""
    return config.url or os.environ.get("REDIS_URL") or DEFAULT_URL


async def serve(config: DashboardConfig, *, sockets: list[socket.socket] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return (a second signal
    stops at once)."""
    server = build_server(config, handle_signals=False)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.serve(sockets=sockets)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
