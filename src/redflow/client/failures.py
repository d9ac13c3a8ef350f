"""The failures view: failed runs grouped by workflow and by how they failed."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from ..encoding import decode
from ..errors import ConfigurationError
from ..storage.index import index_prefixes
from ..types import FailureGroup

if TYPE_CHECKING:
    from .facade import RedflowClient

# What varies between two failures of one kind: ids, hex digests, quoted values, numbers.
_SHAPES = (
    (re.compile(r"[0-9A-HJKMNP-TV-Z]{26}(-[a-z0-9]+)?"), "<id>"),  # run ids
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<uuid>"),
    (re.compile(r"\b[0-9a-fA-F]{12,}\b"), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
)


def message_shape(message: str) -> str:
    """The message with what varies between occurrences replaced by placeholders."""
    for pattern, placeholder in _SHAPES:
        message = pattern.sub(placeholder, message)
    return message[:300]


def category_of(error: dict[str, Any], attempt: int, max_attempts: int) -> str:
    kind = error.get("kind")
    if kind == "crashed":
        return "crashed"
    if attempt >= max_attempts:
        return "exhausted"
    if kind not in (None, "error", "timeout"):
        return "non_retriable"
    return "other"


async def list_failures(client: RedflowClient, workflow: str | None, limit: int) -> list[FailureGroup]:
    """The newest ``limit`` failed runs (of ``workflow``), grouped by workflow, category (exhausted
    its attempts, failed for good at once, crashed), error name and kind, failing step and message
    shape; biggest groups first."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000:
        raise ConfigurationError(f"limit must be between 1 and 10000, got {limit!r}")
    if workflow is not None and (not isinstance(workflow, str) or not workflow):
        raise ConfigurationError(f"workflow must be a non-empty string, got {workflow!r}")
    store = client.store
    await store.ensure_ready()
    prefix = index_prefixes("failed", workflow)[0]
    ids = await client.index_page(prefix, None, limit, descending=True)
    records = await store.headers_and_errors(ids) if ids else []
    groups: dict[str, FailureGroup] = {}
    for run_id, (h, raw) in zip(ids, records, strict=True):
        if h is None or h.status != "failed":
            continue
        error = decode(raw) if raw else {}
        if not isinstance(error, dict):
            error = {}
        category = category_of(error, h.attempt, h.max_attempts)
        name, kind = str(error.get("name", "Error")), str(error.get("kind", "error"))
        step = error.get("step") if isinstance(error.get("step"), str) else None
        shape = message_shape(str(error.get("message", "")))
        fingerprint = hashlib.sha1(
            "\0".join((h.workflow, category, name, kind, step or "", shape)).encode()
        ).hexdigest()[:12]
        seen = h.finished_at_ms or h.created_at_ms
        group = groups.get(fingerprint)
        if group is None:
            groups[fingerprint] = FailureGroup(
                workflow=h.workflow, category=category, fingerprint=fingerprint,  # type: ignore[typeddict-item]
                error_name=name, error_kind=kind, message=str(error.get("message", "")), step=step, count=1,
                first_seen_ms=seen, last_seen_ms=seen, sample_run_ids=[run_id],
            )
            continue
        group["count"] += 1
        group["first_seen_ms"] = min(group["first_seen_ms"], seen)
        if seen > group["last_seen_ms"]:
            group["last_seen_ms"], group["message"] = seen, str(error.get("message", ""))
        if len(group["sample_run_ids"]) < 5:
            group["sample_run_ids"].append(run_id)
    return sorted(groups.values(), key=lambda g: (-g["count"], -g["last_seen_ms"]))
