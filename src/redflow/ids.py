"""Run ids: made by the client, unique, sortable by creation time, ending with their partition.

Format ``<10 chars ms timestamp><16 chars randomness>-<partition>`` in Crockford base32, so ids of one
partition sort by creation time (to the millisecond) and a retried enqueue can reuse its id.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_run_id(partition: str, now_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{_b32(ms, 10)}{_b32(rand, 16)}-{partition}"


def run_id_time_ms(run_id: str) -> int:
    """The creation time (ms) a run id carries in its first 10 characters."""
    value = 0
    for ch in run_id[:10]:
        value = value * 32 + _ALPHABET.index(ch)
    return value
