"""Errors raised by the Redis connection layer."""

from __future__ import annotations

from ..errors import RedflowError


class RedisError(RedflowError):
    """The Redis server could not be reached or refused a command."""

    kind = "redis"


class ConnectionClosedError(RedisError, ConnectionError):
    """The connection to the server is closed or could not be opened."""


class ConnectError(ConnectionClosedError):
    """A connection could not be opened: nothing was sent on it, so no command ran."""


class CommandTimeoutError(ConnectionClosedError):
    """The server did not answer within the command deadline; the connection was closed."""


class ResponseError(RedisError):
    """The server answered a command with an error reply."""


class NoScriptError(ResponseError):
    """EVALSHA named a script the server does not hold (it restarted or was flushed)."""
