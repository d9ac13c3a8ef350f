"""How many partitions a prefix has, and which partition a new run goes to.

The count P is fixed when a prefix is created: the first process to prepare the prefix records it
(``SET NX`` in ``p0``, before the layout version, so a prefix with a version and no count was
created before counts were recorded and has one partition). Every later process adopts the
recorded count, and a process configured with another count is refused: runs would be placed in
partitions other processes never read.

Placement keeps together what must be atomic (see docs/scaling.md):

- a child run goes to its parent's partition (the parent's cancel and the child index are checked
  in the script that creates it);
- a run of a workflow with a limit (max_concurrency, mutex, throttle, rate_limit) goes to ``p0``,
  where the limit's counters live; a mutex is shared by every workflow naming its key;
- a run with an idempotency or debounce key goes to the partition its key hashes to, so the key's
  record is read and written in the script that creates the run;
- every other run goes round robin over the partitions.
"""

from __future__ import annotations

import os
import random
import zlib
from typing import Any

from ..errors import ConfigurationError
from .keys import MAX_PARTITIONS


def check_partitions(value: Any, source: str = "partitions") -> int:
    """A partition count as configured: an integer from 1 to MAX_PARTITIONS."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigurationError(f"{source} must be a whole number of partitions, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARTITIONS:
        raise ConfigurationError(f"{source} must be an integer from 1 to {MAX_PARTITIONS}, got {value!r}")
    return value


def partitions_from_env() -> int | None:
    """REDFLOW_PARTITIONS, or None when unset (adopt what the prefix records)."""
    raw = os.environ.get("REDFLOW_PARTITIONS")
    return None if not raw else check_partitions(raw, "REDFLOW_PARTITIONS")


def agree(prefix: str, recorded: bytes | None, requested: int | None) -> int:
    """The prefix's count from what it records, refusing a process configured otherwise."""
    count = 1 if recorded is None else int(recorded)
    if requested is not None and requested != count:
        raise ConfigurationError(
            f"the key prefix {prefix!r} has {count} partition(s), fixed when it was created; this process "
            f"is configured for {requested} (REDFLOW_PARTITIONS or partitions=). Use the recorded count, or a "
            "new prefix for a new count (docs/scaling.md, changing P)"
        )
    return count


class Placement:
    """Chooses the partition of a new run (by index), as the module docstring says."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._next = random.randrange(count)

    def by_key(self, affinity: str) -> int:
        return zlib.crc32(affinity.encode()) % self.count

    def spread(self) -> int:
        index = self._next
        self._next = (index + 1) % self.count
        return index
