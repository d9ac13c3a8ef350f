"""JSON encoding of payloads and internal records (msgspec; reused encoder and decoders).

User values (inputs, step and workflow outputs) are encoded once and decoded again before they are
handed back, also on the first run, so a replay sees exactly the types the first run saw. They are
encoded as strict JSON, with what the standard ``json`` module accepts and nothing more: sets, bytes,
Decimal, datetime, UUID, dataclasses and other objects, and NaN / Infinity are refused with the path
of the bad value, never silently turned into something else (msgspec would make a set a list, NaN
null, a datetime a string).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import msgspec

from .errors import ConfigurationError, OutputSerializationError, PayloadEncodingError, PayloadTooLargeError

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


def max_payload_bytes() -> int:
    raw = os.environ.get("REDFLOW_MAX_PAYLOAD_BYTES")
    if not raw:
        return DEFAULT_MAX_PAYLOAD_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"REDFLOW_MAX_PAYLOAD_BYTES must be an integer, got {raw!r}") from None
    if value <= 0:
        raise ConfigurationError(f"REDFLOW_MAX_PAYLOAD_BYTES must be positive, got {value}")
    return value


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode(data: bytes | str) -> Any:
    return _decoder.decode(data)


# One encoder for every user value: json.dumps with these options builds a new one per call.
_strict_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _strict_json(value: Any) -> bytes:
    return _strict_encoder.encode(value).encode()


def _step(path: str, key: Any) -> str:
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


def non_json(value: Any, path: str = "$") -> str | None:
    """Where ``value`` stops being JSON, and why ("$.tags[2] is a set"); None when it is JSON."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if item is None or isinstance(item, (str, bool, int)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{where} is {item!r} (JSON has no NaN or Infinity)"
            continue
        if isinstance(item, dict):
            children = []
            for key, sub in item.items():
                if key is not None and not isinstance(key, (str, int, float, bool)):
                    return f"{where} has a key of type {type(key).__name__} ({key!r})"
                children.append((sub, _step(where, key)))
            stack.extend(reversed(children))
            continue
        if isinstance(item, (list, tuple)):
            stack.extend(reversed([(sub, f"{where}[{i}]") for i, sub in enumerate(item)]))
            continue
        return f"{where} is a {type(item).__name__}, which JSON cannot represent"
    return None


def _explain(value: Any, exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    return non_json(value) or str(exc)


def encode_payload(value: Any, what: str, limit: int) -> bytes:
    """Encode a user value; ``what`` names it in errors ("input of workflow 'x'")."""
    try:
        data = _strict_json(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise PayloadEncodingError(f"{what} is not JSON-serializable: {_explain(value, exc)}") from exc
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"{what} is {len(data)} bytes encoded, over the limit of {limit} bytes "
            "(REDFLOW_MAX_PAYLOAD_BYTES)"
        )
    return data


def encode_output(value: Any, what: str, limit: int) -> bytes:
    """Encode a step or workflow output; failures are OutputSerializationError (not retried)."""
    try:
        data = _strict_json(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise OutputSerializationError(f"{what} is not JSON-serializable: {_explain(value, exc)}", exc) from exc
    if len(data) > limit:
        raise OutputSerializationError(
            f"{what} is {len(data)} bytes encoded, over the limit of {limit} bytes "
            "(REDFLOW_MAX_PAYLOAD_BYTES)"
        )
    return data
