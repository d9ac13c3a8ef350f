"""``redflow dashboard``: serve the web dashboard of one deployment (a Redis URL and a prefix)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from ..errors import ConfigurationError, RedflowError
from .config import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV, DashboardConfig, check_config, missing_extra, token_from_env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redflow dashboard",
        description="Serve the redflow web dashboard. It listens on 127.0.0.1 unless told otherwise; any "
                    f"other address needs a token (--token or {TOKEN_ENV}).",
    )
    p.add_argument("--url", default=None, help="Redis URL (default: REDIS_URL, else redis://localhost:6379)")
    p.add_argument("--prefix", default=None, help="key prefix (default: REDFLOW_PREFIX, else redflow:v1)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--token", default=None,
                   help=f"require this token from every visitor (default: {TOKEN_ENV}); needed off localhost")
    return p


def parse(argv: list[str]) -> DashboardConfig:
    ns = build_parser().parse_args(argv)
    return check_config(DashboardConfig(url=ns.url, prefix=ns.prefix, host=ns.host, port=ns.port,
                                        token=ns.token or token_from_env()))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse(args)
    except ConfigurationError as exc:
        print(f"redflow dashboard: {exc}", file=sys.stderr)
        return 2
    problem = missing_extra()
    if problem is not None:
        print(f"redflow dashboard: {problem}", file=sys.stderr)
        return 2
    from ..client import default_prefix
    from .format import safe_url
    from .server import redis_url, serve

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - Windows
        pass
    url = redis_url(config)
    try:
        asyncio.run(probe(config))
    except (RedflowError, ValueError, OSError) as exc:
        print(f"redflow dashboard: cannot use Redis at {safe_url(url)}: {exc}", file=sys.stderr)
        return 1
    host = f"[{config.host}]" if ":" in config.host else config.host
    shown = "127.0.0.1" if config.host in ("0.0.0.0", "::") else host
    print(f"redflow dashboard: serving http://{shown}:{config.port}/ for prefix {config.prefix or default_prefix()} "
          f"on {safe_url(url)}{' (token required)' if config.token else ''}; Ctrl-C stops it",
          file=sys.stderr, flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(config))
    except SystemExit:  # uvicorn could not listen; it logged why in one line
        return 1
    return 0


async def probe(config: DashboardConfig) -> None:
    """Fail at once, in one line, on a bad URL, an unreachable server or a foreign prefix."""
    from ..client import create_client

    client = create_client(url=config.url, prefix=config.prefix)
    try:
        await client.list_workflows()
    finally:
        await client.close()
