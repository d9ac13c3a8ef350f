"""The embedded server starts only when its own process answers: a port taken between the pick and the
bind (by another test session, a listener, or a server of ours) is picked again, and an explicit port
that is in use is a clear error rather than a client talking to someone else's server."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

import redflow.embedded as embedded
from redflow.embedded import EmbeddedServer
from redflow.errors import RedflowError

BINARY = os.environ.get("REDFLOW_TEST_REDIS_SERVER") or None


@pytest.fixture
def listener() -> Iterator[int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        yield int(holder.getsockname()[1])
    finally:
        holder.close()


def test_a_picked_port_taken_before_the_bind_is_picked_again(listener: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    picks = iter([listener])
    real = embedded.free_port
    monkeypatch.setattr(embedded, "free_port", lambda: next(picks, 0) or real())
    server = EmbeddedServer(BINARY, appendonly=False).start()
    try:
        assert server.port != listener
        assert embedded._server_pid(server.port) == server.process.pid  # type: ignore[union-attr]
    finally:
        server.stop()


def test_an_explicit_port_in_use_is_a_clear_error(listener: int) -> None:
    with pytest.raises(RedflowError, match=f"could not bind port {listener}: it is in use"):
        EmbeddedServer(BINARY, port=listener, appendonly=False).start()


def test_another_server_on_the_port_is_not_taken_for_ours() -> None:
    other = EmbeddedServer(BINARY, appendonly=False).start()
    try:
        with pytest.raises(RedflowError, match="in use"):
            EmbeddedServer(BINARY, port=other.port, appendonly=False).start()
        assert embedded._server_pid(other.port) == other.process.pid  # type: ignore[union-attr]
    finally:
        other.stop()


def test_a_restart_keeps_its_port() -> None:
    server = EmbeddedServer(BINARY, appendonly=False).start()
    try:
        port = server.port
        server.kill()
        server.start()
        assert server.port == port
    finally:
        server.stop()
