"""Dashboard options and the token rule: a dashboard reachable beyond this machine needs a token.

This module imports nothing from the web stack, so the CLI and the supervisor can check options
(and say what is wrong in one line) without the ``dashboard`` extra installed.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
from dataclasses import dataclass

from ..errors import ConfigurationError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
TOKEN_ENV = "REDFLOW_DASHBOARD_TOKEN"
EXTRA_MODULES = ("starlette", "jinja2", "uvicorn", "multipart")
MIN_TOKEN_CHARS = 8


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    url: str | None  # None: REDIS_URL, else redis://localhost:6379
    prefix: str | None  # None: REDFLOW_PREFIX, else redflow:v1
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None


def is_local_host(host: str) -> bool:
    """Whether binding ``host`` keeps the dashboard on this machine (a loopback address)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def check_config(config: DashboardConfig) -> DashboardConfig:
    """Refuse options that would expose the dashboard without a token, or cannot be served."""
    if not 0 <= config.port <= 65535:
        raise ConfigurationError(f"dashboard port must be between 0 and 65535, got {config.port}")
    if config.token is not None and len(config.token) < MIN_TOKEN_CHARS:
        raise ConfigurationError(f"the dashboard token must have at least {MIN_TOKEN_CHARS} characters")
    if config.token is None and not is_local_host(config.host):
        raise ConfigurationError(
            f"refusing to serve the dashboard on {config.host} without a token: anyone who reaches it could "
            f"cancel and retry runs; pass --token or set {TOKEN_ENV} (or bind 127.0.0.1)"
        )
    return config


def missing_extra() -> str | None:
    """A one-line message when the ``dashboard`` extra is not installed, else None."""
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    names = ", ".join("python-multipart" if m == "multipart" else m for m in missing)
    return f"the dashboard needs the 'dashboard' extra ({names} missing): pip install 'redflow[dashboard]'"
