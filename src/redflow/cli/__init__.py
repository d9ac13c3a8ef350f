"""The ``redflow`` command (see docs/cli.md).

    redflow runs list|show|start|retry|replay|cancel|explain|attempts ...
    redflow failures | workers | workflows | stats
    redflow events list|show|emit ...
    redflow cron list
    redflow supervisor [options]     run worker processes (python -m redflow.supervisor)
    redflow dashboard [options]      the web dashboard (redflow dashboard --help)
    redflow dev [--port 6390]        an embedded server and a supervisor for local development

Every command but ``supervisor`` and ``dev`` takes ``--url`` (default REDIS_URL), ``--prefix``
(default REDFLOW_PREFIX) and ``--json``. Exit codes: 0 done, 1 not found or refused, 2 bad usage or
input, 3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from ..client import create_client
from ..errors import ConfigurationError, RedflowError
from ..observability.logs import configure as configure_logs
from .commands import COMMANDS, NotFound

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="Redis URL (default: REDIS_URL, else redis://localhost:6379)")
    common.add_argument("--prefix", default=None, help="key prefix (default: REDFLOW_PREFIX or redflow:v1)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = argparse.ArgumentParser(prog="redflow", description="Inspect and operate a redflow deployment.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("supervisor", help="run worker processes (python -m redflow.supervisor --help)", add_help=False)
    sub.add_parser("dashboard", help="serve the web dashboard (redflow dashboard --help)", add_help=False)
    dev = sub.add_parser("dev", help="embedded server + supervisor for local development")
    dev.add_argument("--port", type=int, default=6390, help="port of the embedded server (default 6390)")
    dev.add_argument("--procs", type=int, default=1, help="worker processes (default 1)")
    dev.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                     help="module defining workflows (repeatable)")
    dev.add_argument("--data-dir", default=None, help="keep the server's data here (default: a temporary dir)")

    runs = sub.add_parser("runs", help="list, show, start, retry, replay, cancel, explain runs")
    ra = runs.add_subparsers(dest="action", required=True)
    ls = ra.add_parser("list", parents=[common], help="runs, newest first")
    ls.add_argument("--status")
    ls.add_argument("--workflow")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--cursor")
    ra.add_parser("show", parents=[common], help="a run, its steps and its error").add_argument("run_id")
    start = ra.add_parser("start", parents=[common], help="start a run of a workflow by name")
    start.add_argument("workflow")
    start.add_argument("--input", default=None, help="the input, as JSON")
    start.add_argument("--queue", default=None)
    start.add_argument("--idempotency-key", default=None)
    start.add_argument("--wait", action="store_true", help="wait for the run to end and print its output")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
    for name, verb in (("retry", "retry a failed or canceled run"), ("cancel", "cancel a run")):
        cmd = ra.add_parser(name, parents=[common], help=f"{verb}; or every run --workflow/--status/--queue select")
        cmd.add_argument("run_id", nargs="?")
        cmd.add_argument("--workflow")
        cmd.add_argument("--status")
        cmd.add_argument("--queue")
        cmd.add_argument("--dry-run", action="store_true", help="count the runs selected; change nothing")
        cmd.add_argument("--job", default=None, help="bulk job id: resumes an interrupted bulk action")
        if name == "cancel":
            cmd.add_argument("--reason", default="")
    replay = ra.add_parser("replay", parents=[common], help="a new run of an ended run, reusing steps before one")
    replay.add_argument("run_id")
    replay.add_argument("--from-step", default=None, help="reuse the outputs of the steps before this one")
    replay.add_argument("--input", default=None, help="new input, as JSON (default: the original's)")
    replay.add_argument("--queue", default=None)
    ra.add_parser("explain", parents=[common], help="why a run is not running").add_argument("run_id")
    ra.add_parser("attempts", parents=[common], help="how each attempt ended").add_argument("run_id")

    fl = sub.add_parser("failures", parents=[common], help="failed runs grouped by how they failed")
    fl.add_argument("--workflow")
    fl.add_argument("--limit", type=int, default=1000, help="newest failed runs to group (default 1000)")
    events = sub.add_parser("events", help="list, show or emit events")
    ea = events.add_subparsers(dest="action", required=True)
    els = ea.add_parser("list", parents=[common])
    els.add_argument("--name")
    els.add_argument("--limit", type=int, default=20)
    els.add_argument("--cursor")
    ea.add_parser("show", parents=[common]).add_argument("event_id")
    emit = ea.add_parser("emit", parents=[common], help="emit an event")
    emit.add_argument("name")
    emit.add_argument("--data", default=None, help="the payload, as JSON")
    emit.add_argument("--key", default=None, help="correlation key")
    emit.add_argument("--id", default=None, help="event id (emitting one id twice delivers once)")
    cron = sub.add_parser("cron", help="cron triggers")
    cron.add_subparsers(dest="action", required=True).add_parser("list", parents=[common])
    sub.add_parser("workers", parents=[common], help="workers, their queues, and the leader")
    sub.add_parser("workflows", parents=[common], help="registered workflows")
    sub.add_parser("stats", parents=[common], help="runs by status and queue backlog")
    return p


async def _main(args: argparse.Namespace) -> tuple[object, str]:
    client = create_client(url=args.url, prefix=args.prefix)
    try:
        return await COMMANDS[(args.command, getattr(args, "action", None))](args, client)
    finally:
        await client.close()


def _emit(text: str) -> None:
    """Print, quietly stopping when the reader went away (``redflow runs list | head``)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _fail(code: int, message: str) -> int:
    print(f"redflow: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["supervisor"]:
        from ..supervisor import main as supervisor_main

        return supervisor_main(args_list[1:])
    if args_list[:1] == ["dashboard"]:
        from ..dashboard import main as dashboard_main

        return dashboard_main(args_list[1:])
    configure_logs(os.environ.get("REDFLOW_LOG_LEVEL") or "WARNING")  # REDFLOW_LOG_FORMAT=json applies too
    args = _parser().parse_args(args_list)
    if args.command == "dev":
        from .dev import run_dev

        return run_dev(args)
    try:
        data, text = asyncio.run(_main(args))
    except NotFound as exc:
        return _fail(EXIT_REFUSED, str(exc))
    except (ConfigurationError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    except (OSError, ConnectionError) as exc:
        where = args.url or os.environ.get("REDIS_URL") or "redis://localhost:6379"
        return _fail(EXIT_UNREACHABLE, f"cannot reach the server at {where}: {exc.strerror or exc}")
    except RedflowError as exc:
        if isinstance(exc, ConnectionError):
            return _fail(EXIT_UNREACHABLE, str(exc))
        return _fail(EXIT_REFUSED, str(exc))
    _emit(json.dumps(data, indent=2, default=str) if args.json else text)
    return EXIT_OK
