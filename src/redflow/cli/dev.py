"""``redflow dev``: an embedded server on a fixed port and, with ``--import``, a supervisor running
those workflows (and the dashboard when the supervisor can serve one), in one command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..errors import RedflowError


def run_dev(args: argparse.Namespace) -> int:
    from ..embedded import EmbeddedServer

    try:
        server = EmbeddedServer(port=args.port, data_dir=args.data_dir, die_with_parent=True).start()
    except RedflowError as exc:
        print(f"redflow dev: the embedded server did not start on port {args.port}: {exc}", file=sys.stderr)
        return 3
    try:
        print(f"redflow dev: server at {server.url}  (export REDIS_URL={server.url})", flush=True)
        if not args.imports:
            print("redflow dev: no --import given, so no workers; Ctrl-C stops the server", flush=True)
            _wait_for_stop()
            return 0
        from ..supervisor import main as supervisor_main

        argv = ["--url", server.url, "--procs", str(args.procs)]
        for module in args.imports:
            argv += ["--import", module]
        if _dashboard_available():
            argv += ["--dashboard-port", "8080"]
            print("redflow dev: dashboard at http://127.0.0.1:8080", flush=True)
        return supervisor_main(argv)
    finally:
        server.stop()


def _dashboard_available() -> bool:
    """Whether the supervisor can serve the dashboard (the ``dashboard`` extra is installed)."""
    try:
        from ..dashboard.config import missing_extra
    except ImportError:
        return False
    return missing_extra() is None


def _wait_for_stop() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
