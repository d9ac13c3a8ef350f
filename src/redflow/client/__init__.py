"""The client API: ``create_client``, ``RedflowClient`` and the handle of a started run."""

from .facade import (
    DEFAULT_PREFIX,
    DEFAULT_URL,
    RedflowClient,
    create_client,
    default_prefix,
    get_default_client,
    retention_ms_from_env,
    set_default_client,
)
from .handle import DEFAULT_RESULT_TIMEOUT_MS, RunHandle

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_RESULT_TIMEOUT_MS",
    "DEFAULT_URL",
    "RedflowClient",
    "RunHandle",
    "create_client",
    "default_prefix",
    "get_default_client",
    "retention_ms_from_env",
    "set_default_client",
]
