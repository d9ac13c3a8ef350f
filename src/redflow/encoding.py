"""JSON encoding of payloads and internal records (msgspec; reused encoder and decoders).

User values (inputs, step and workflow outputs) are encoded once and decoded again before they are
handed back, also on the first run, so a replay sees exactly the types the first run saw.
"""

from __future__ import annotations

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


def encode_payload(value: Any, what: str, limit: int) -> bytes:
    """Encode a user value; ``what`` names it in errors ("input of workflow 'x'")."""
    try:
        data = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadEncodingError(f"{what} is not JSON-serializable: {exc}") from exc
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"{what} is {len(data)} bytes encoded, over the limit of {limit} bytes "
            "(REDFLOW_MAX_PAYLOAD_BYTES)"
        )
    return data


def encode_output(value: Any, what: str, limit: int) -> bytes:
    """Encode a step or workflow output; failures are OutputSerializationError (not retried)."""
    try:
        data = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise OutputSerializationError(f"{what} is not JSON-serializable: {exc}", exc) from exc
    if len(data) > limit:
        raise OutputSerializationError(
            f"{what} is {len(data)} bytes encoded, over the limit of {limit} bytes "
            "(REDFLOW_MAX_PAYLOAD_BYTES)"
        )
    return data
