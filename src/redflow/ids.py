"""Run ids: made by the client, unique, sortable by creation time, ending with their partition.

Format ``<10 chars ms timestamp><16 chars randomness>-<partition>`` in Crockford base32, so ids of one
partition sort by creation time (to the millisecond) and a retried enqueue can reuse its id.
"""

from __future__ import annotations

import base64
import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# base64.b32encode speaks RFC 4648's alphabet; this maps it onto Crockford's, digit for digit.
_FROM_RFC4648 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET)
_last_ms = -1
_last_prefix = ""


def _b32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_run_id(partition: str, now_ms: int | None = None) -> str:
    global _last_ms, _last_prefix
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    if ms != _last_ms:
        _last_ms, _last_prefix = ms, _b32(ms, 10)
    rand = base64.b32encode(os.urandom(10)).decode().translate(_FROM_RFC4648)
    return f"{_last_prefix}{rand}-{partition}"


def run_id_time_ms(run_id: str) -> int:
    """The creation time (ms) a run id carries in its first 10 characters."""
    value = 0
    for ch in run_id[:10]:
        value = value * 32 + _ALPHABET.index(ch)
    return value
