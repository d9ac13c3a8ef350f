"""Logs operators read: one line per run outcome, Redis outages without storms, and the JSON format.

Run outcomes go to the ``redflow.runs`` logger with the fields in ``record.redflow`` (the JSON format
writes them as keys): run_id, workflow, queue, attempt, max_attempts, outcome, duration_ms, and where
they apply error_kind, error_name, delay_ms. Failures log at WARNING; retries, cancellations,
deferrals and recoveries at INFO; successes at DEBUG, or INFO with ``REDFLOW_LOG_SUCCESSES=1``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

runs_log = logging.getLogger("redflow.runs")

_LEVELS = {"failed": logging.WARNING, "crashed": logging.WARNING, "rate_limited": logging.WARNING}
_VERBS = {
    "succeeded": "succeeded", "failed": "failed for good", "retried": "failed; retrying",
    "canceled": "was canceled", "deferred": "was deferred: this worker does not define its workflow",
    "recovered": "was taken back from a dead worker", "crashed": "failed: its workers kept dying",
    "rate_limited": "failed: over its rate limit",
}


def log_outcome(
    outcome: str, *, run_id: str, workflow: str, queue: str, attempt: int, max_attempts: int,
    duration_ms: float | None = None, error: dict[str, Any] | None = None, delay_ms: int | None = None,
) -> None:
    """The one line a run outcome logs."""
    if outcome == "succeeded":
        if not runs_log.isEnabledFor(logging.INFO):  # DEBUG and INFO both off: no environment read per run
            return
        level = logging.INFO if os.environ.get("REDFLOW_LOG_SUCCESSES") == "1" else logging.DEBUG
    else:
        level = _LEVELS.get(outcome, logging.INFO)
    if not runs_log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {"run_id": run_id, "workflow": workflow, "queue": queue, "attempt": attempt,
                              "max_attempts": max_attempts, "outcome": outcome}
    if duration_ms is not None:
        fields["duration_ms"] = round(duration_ms, 1)
    text = f"run {run_id} of workflow {workflow!r} {_VERBS.get(outcome, outcome)} (attempt {attempt}/{max_attempts}"
    text += f", queue {queue!r}" + (f", {duration_ms / 1000:.3f}s" if duration_ms is not None else "") + ")"
    if delay_ms is not None:
        fields["delay_ms"] = delay_ms
        text += f"; next attempt in {delay_ms / 1000:.3f}s"
    if error:
        fields["error_kind"], fields["error_name"] = error.get("kind", "error"), error.get("name", "Error")
        if error.get("step"):
            fields["step"] = error["step"]
        text += f": {fields['error_name']} [{fields['error_kind']}]: {str(error.get('message', ''))[:500]}"
    runs_log.log(level, text, extra={"redflow": fields})


class OutageLog:
    """Logs an outage once when it starts, a summary every ``summary_s`` while it lasts, and once when
    it ends ("Redis is back after 8.7 s"), however many commands fail in between."""

    def __init__(self, logger: logging.Logger, what: str, summary_s: float = 30.0) -> None:
        self._log = logger
        self._what = what
        self._summary_s = summary_s
        self._since: float | None = None
        self._last_summary = 0.0
        self._failures = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        self._failures += 1
        if self._since is None:
            self._since = self._last_summary = now
            self._log.warning("%s is unreachable: %s", self._what, error,
                              extra={"redflow": {"event": "outage_started"}})
        elif now - self._last_summary >= self._summary_s:
            self._last_summary = now
            self._log.warning("%s still unreachable after %.1f s (%d failed attempts): %s", self._what,
                              now - self._since, self._failures, error,
                              extra={"redflow": {"event": "outage_ongoing", "down_s": round(now - self._since, 1)}})

    def succeeded(self) -> None:
        if self._since is None:
            return
        down = time.monotonic() - self._since
        self._log.warning("%s is back after %.1f s (%d failed attempts)", self._what, down, self._failures,
                          extra={"redflow": {"event": "outage_ended", "down_s": round(down, 1)}})
        self._since, self._failures = None, 0


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, message, the record's redflow fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "redflow", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fmt: str | None = None) -> None:
    """Log to stderr in ``fmt`` ("text" or "json"; default REDFLOW_LOG_FORMAT, else text)."""
    fmt = fmt or os.environ.get("REDFLOW_LOG_FORMAT") or "text"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
