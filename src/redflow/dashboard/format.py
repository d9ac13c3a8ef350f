"""How the dashboard writes times, durations, JSON and errors (Jinja filters; no web imports)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def now_ms() -> int:
    return int(time.time() * 1000)


def local_time(ms: Any) -> str:
    """Epoch ms as this machine's local time, to the second; '-' for none."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(int(ms) / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def iso_time(ms: Any) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(int(ms) / 1000).astimezone().isoformat(timespec="milliseconds")


def duration(ms: Any) -> str:
    """A duration in ms as its two largest units: '850 ms', '4.2 s', '3 m 04 s', '2 h 05 m', '3 d 4 h'."""
    if ms is None:
        return "-"
    value = int(ms)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1000:
        return f"{sign}{value} ms"
    if value < 60_000:
        return f"{sign}{value / 1000:.1f} s"
    seconds = value // 1000
    if seconds < 3600:
        return f"{sign}{seconds // 60} m {seconds % 60:02d} s"
    if seconds < 86_400:
        return f"{sign}{seconds // 3600} h {seconds % 3600 // 60:02d} m"
    return f"{sign}{seconds // 86_400} d {seconds % 86_400 // 3600} h"


def relative(ms: Any, reference_ms: int | None = None) -> str:
    """'5 m 02 s ago' or 'in 3.0 s' from now (or ``reference_ms``)."""
    if not ms:
        return ""
    delta = int(ms) - (reference_ms if reference_ms is not None else now_ms())
    return f"in {duration(delta)}" if delta > 0 else f"{duration(-delta)} ago"


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def short_json(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_line(error: Any) -> str:
    """An error record {name, message, kind, stack} as one line: 'ValueError: bad input'."""
    if not isinstance(error, dict):
        return "" if error is None else str(error)
    name = str(error.get("name") or "Error")
    message = str(error.get("message") or "")
    return f"{name}: {message}" if message else name


def error_extra(error: Any) -> dict[str, Any]:
    """The fields of an error record beyond name, message, kind and stack (retryAfterMs, ...)."""
    if not isinstance(error, dict):
        return {}
    return {k: v for k, v in error.items() if k not in ("name", "message", "kind", "stack")}


def safe_url(url: str | None) -> str:
    """A Redis URL without its password, to show on a page."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable url)"
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def period(ms: Any) -> str:
    """A limit's window: 1000 -> '1 s', 60000 -> '1 m 00 s'."""
    return duration(ms)


FILTERS = {
    "local_time": local_time,
    "iso_time": iso_time,
    "duration": duration,
    "relative": relative,
    "pretty_json": pretty_json,
    "short_json": short_json,
    "error_line": error_line,
    "error_extra": error_extra,
    "period": period,
}
