"""How the CLI shows things to people: local times, durations, tables, a run's story."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


def local_time(ms: Any) -> str:
    """Epoch milliseconds as this machine's local time ("-" for none)."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(int(ms) / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def duration(ms: Any) -> str:
    """A duration in milliseconds, short ("850 ms", "12.5 s", "3 min 20 s", "2 h 5 min")."""
    if ms is None:
        return "-"
    ms = int(ms)
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def took(start: Any, end: Any) -> str:
    return duration(int(end) - int(start)) if start and end else "-"


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Rows as aligned columns; keys ending in ``_at`` are shown as local times."""
    if not rows:
        return "(none)"
    cells = [[_cell(key, r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if key.endswith("_at"):
        return local_time(value)
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def compact(value: Any, limit: int = 400) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_lines(error: dict[str, Any] | None, indent: str = "  ") -> list[str]:
    """An error record as lines: ``Name: message (kind ..., step ...)`` then its stack."""
    if not error:
        return []
    extra = [f"kind {error.get('kind', 'error')}"]
    if error.get("step"):
        extra.append(f"step {error['step']!r}")
    if error.get("retryAfterMs") is not None:
        extra.append(f"retry after {duration(error['retryAfterMs'])}")
    lines = [f"{error.get('name', 'Error')}: {error.get('message', '')} ({', '.join(extra)})"]
    stack = error.get("stack")
    if isinstance(stack, str) and stack.strip():
        lines += [indent + line for line in stack.rstrip().splitlines()]
    return lines


def run_story(run: dict[str, Any], steps: list[dict[str, Any]], explanation: dict[str, Any] | None) -> str:
    """``redflow runs show``: the run, why it is where it is, its steps, its error with the stack."""
    out = [
        f"run       {run['id']}",
        f"workflow  {run['workflow']}  (queue {run['queue']})",
        f"status    {run['status']}  (attempt {run['attempt']} of {run['max_attempts']})",
        f"created   {local_time(run.get('created_at'))}",
        f"started   {local_time(run.get('started_at'))}",
        f"finished  {local_time(run.get('finished_at'))}  (took {took(run.get('started_at'), run.get('finished_at'))})",
    ]
    if run.get("parent_run_id"):
        out.append(f"parent    {run['parent_run_id']}")
    if run.get("replayed_from"):
        out.append(f"replays   {run['replayed_from']}")
    if run.get("cancel_requested_at"):
        reason = run.get("cancel_reason") or "no reason given"
        out.append(f"canceled  requested {local_time(run['cancel_requested_at'])}: {reason}")
    if explanation is not None:
        out.append(f"why       {explanation['message']}")
    out.append(f"input     {compact(run.get('input'))}")
    if run["status"] == "succeeded":
        out.append(f"output    {compact(run.get('output'))}")
    rows = [{
        "seq": s.get("seq"), "name": s.get("name"), "kind": s.get("kind", "run"), "status": s.get("status"),
        "attempt": s.get("attempt"), "started_at": s.get("started_at"),
        "took": took(s.get("started_at"), s.get("finished_at")) if s.get("status") != "running" else "-",
        "wakes_at": s.get("wait_until_at"),
    } for s in steps]
    out += ["", "steps", table(rows, [("seq", "#"), ("name", "NAME"), ("kind", "KIND"), ("status", "STATUS"),
                                       ("attempt", "ATTEMPT"), ("started_at", "STARTED"), ("took", "TOOK"),
                                       ("wakes_at", "WAKES")])]
    if run.get("error"):
        out += ["", "error", *("  " + line for line in error_lines(run["error"]))]
    for s in steps:
        if s.get("error") and s.get("status") in ("failed", "canceled"):
            out += ["", f"step {s['name']!r} (attempt {s.get('attempt')})",
                    *("  " + line for line in error_lines(s["error"]))]
    return "\n".join(out)
