"""The web dashboard (the ``dashboard`` extra): ``redflow dashboard --url URL``, or in the supervisor
with ``--dashboard-port``. ``create_app(client)`` gives the ASGI application to mount elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cli import main

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app", "main"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported on use: the web stack is an optional extra
        from .app import create_app

        return create_app
    raise AttributeError(name)
