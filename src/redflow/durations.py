"""Durations and points in time given as milliseconds, duration strings or datetimes."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

from .errors import ConfigurationError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(value: Any, what: str) -> int:
    """Milliseconds from an int/float of ms or a string like "500ms", "30s", "5m", "2h", "1d"."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{what}: expected milliseconds or a duration string, got {value!r}")
    if isinstance(value, int | float):
        if value < 0 or value != value:
            raise ConfigurationError(f"{what}: a duration must be a non-negative number, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    raise ConfigurationError(
        f"{what}: expected milliseconds or a duration string such as '500ms', '30s', '5m', '2h' or "
        f"'1d', got {value!r}"
    )


# The latest point in time redflow stores: 5000-01-01T00:00:00Z. Its epoch ms have 14 digits; Lua
# numbers and cjson keep 14 significant digits, so every stored time up to this bound is exact.
MAX_TIME_MS = 95_617_584_000_000


def datetime_ms(value: datetime, what: str = "time") -> int:
    """Epoch ms of a datetime (a naive one is taken as local time), at most MAX_TIME_MS: a later
    time is refused with a ConfigurationError naming ``what`` and the value."""
    try:
        ms = int(value.timestamp() * 1000)
    except (OverflowError, OSError, ValueError) as exc:
        if value.year < 5000:
            raise ConfigurationError(f"{what} {value.isoformat()} has no epoch timestamp: {exc}") from None
        ms = MAX_TIME_MS + 1
    if ms > MAX_TIME_MS:
        raise ConfigurationError(
            f"{what} {value.isoformat()} is too far in the future: redflow stores times up to the year 5000 "
            "(5000-01-01T00:00:00Z)"
        )
    return ms


def delay_ms(value: Any, what: str) -> int:
    """A relative delay in ms: a duration, or the time left until a datetime (never negative)."""
    if isinstance(value, datetime):
        return max(0, datetime_ms(value, what) - int(time.time() * 1000))
    return duration_ms(value, what)
