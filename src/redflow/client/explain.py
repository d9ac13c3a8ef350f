"""explain_run: why a run is where it is, in words and as data."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..encoding import decode
from ..errors import RunNotFoundError
from ..storage.index import untag
from ..storage.keys import partition_of
from ..storage.records import RunHeader, WaitRecord
from ..storage.store import EXPLAIN_SCAN
from ..types import RunExplanation
from ..validation import check_run_id

if TYPE_CHECKING:
    from .facade import RedflowClient


def _at(ms: int | None) -> str:
    if ms is None:
        return "an unknown time"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def explain_run(client: RedflowClient, run_id: str) -> RunExplanation:
    check_run_id(run_id)
    store = client.store
    await store.ensure_ready()
    h = await store.read_header(run_id)
    if h is None:
        raise RunNotFoundError(f"run {run_id} not found (never created, or removed by retention)")
    facts = await store.explain_facts(run_id, h)
    reason, message, details = await _explain(client, run_id, h, facts)
    details.setdefault("attempt", h.attempt)
    details.setdefault("max_attempts", h.max_attempts)
    return RunExplanation(run_id=run_id, status=h.status, reason=reason, message=message,  # type: ignore[typeddict-item]
                          details=details)


async def _explain(
    client: RedflowClient, run_id: str, h: RunHeader, facts: dict[str, Any]
) -> tuple[str, str, dict[str, Any]]:
    now = facts["now_ms"]
    error = decode(facts["error"]) if facts["error"] else None
    if h.status in ("succeeded", "failed", "canceled"):
        details: dict[str, Any] = {"finished_at_ms": h.finished_at_ms, "error": error}
        if h.status == "failed" and h.hook_pending:
            return "hook_pending", f"failed at {_at(h.finished_at_ms)}; its on_failure hook has not run yet", details
        why = f": {error.get('name')}: {error.get('message')}" if h.status != "succeeded" and error else ""
        return "ended", f"ended as {h.status} at {_at(h.finished_at_ms)}{why}", details
    if h.status == "running":
        deadline = facts["owner_deadline_ms"]
        details = {"worker_id": h.owner, "attempt_started_at_ms": h.attempt_started_at_ms,
                   "worker_lease_until_ms": deadline}
        if h.cancel_requested_at_ms:
            return ("cancel_requested", f"running on worker {h.owner}; canceling since "
                    f"{_at(h.cancel_requested_at_ms)} (its worker stops it at the handler's next await)", details)
        if deadline is None or deadline < now:
            return ("worker_lost", f"its worker {h.owner} stopped renewing its lease; the leader takes the run back "
                    "and queues it again within one reaper interval", details)
        return ("running", f"running on worker {h.owner} since {_at(h.attempt_started_at_ms)} "
                f"(attempt {h.attempt} of {h.max_attempts})", details)
    if h.status == "queued":
        return await _queued(client, run_id, h, facts)
    return _scheduled(h, facts, facts["wait"], error, now)


async def _queued(
    client: RedflowClient, run_id: str, h: RunHeader, facts: dict[str, Any]
) -> tuple[str, str, dict[str, Any]]:
    if h.held_member and h.held_member.startswith("c:"):
        details: dict[str, Any] = {"running": facts["running"], "max_concurrency": facts["limit"]}
        return ("held_capacity", f"held by max_concurrency of workflow {h.workflow!r}: {facts['running']} of "
                f"{facts['limit']} running; it starts when one of them stops", details)
    if h.held_member and h.held_member.startswith("m:"):
        key = untag(h.mutex_field or "")
        details = {"mutex": key, "held_by": facts["mutex_holder"]}
        return ("held_mutex", f"waiting for mutex {key!r}, held by run {facts['mutex_holder']}", details)
    if h.owner:
        deadline = facts["owner_deadline_ms"]
        if deadline is None or deadline < facts["now_ms"]:
            return ("worker_lost", f"claimed for admission by worker {h.owner}, which stopped renewing its lease; "
                    "the leader takes the run back within one reaper interval", {"worker_id": h.owner})
        return ("admitting", f"claimed by worker {h.owner}, which is checking its admission limits",
                {"worker_id": h.owner})
    ahead = facts["ahead"]
    details = {"queue": h.queue, "ahead": ahead}
    serving = await _queue_workers(client, h.queue, facts["now_ms"])
    details["workers"] = serving
    if serving is not None and not serving:
        return ("no_worker_for_queue", f"no live worker claims from queue {h.queue!r}; start one with that queue",
                details)
    where = f"queue {h.queue!r}"
    count = len(client.store.partitions)
    if count > 1:
        # Every partition's ready list is claimed in parallel: only the runs ahead in its own list
        # are certainly claimed before it.
        details["partition"] = partition_of(run_id)
        where += f" (partition {details['partition']} of {count}, claimed in parallel with the others)"
    if ahead is None:
        return "queued_behind", f"queued behind at least {EXPLAIN_SCAN} runs in {where}", details
    if ahead:
        return "queued_behind", f"queued behind {ahead} runs in {where}", details
    return "queued", f"next to be claimed from {where}", details


async def _queue_workers(client: RedflowClient, queue: str, now_ms: int) -> list[str] | None:
    """Live workers known to claim from ``queue``; None when some live worker did not record its queues."""
    serving: list[str] = []
    for record in await client.events.live_registrations(now_ms):
        if record.queues is None:
            return None
        if queue in record.queues:
            serving.append(",".join(record.workflows))
    return serving


def _scheduled(
    h: RunHeader, facts: dict[str, Any], wait: WaitRecord | None, error: Any, now: int
) -> tuple[str, str, dict[str, Any]]:
    due = h.available_at_ms
    if h.throttle_member:
        if due is None:
            return ("throttled", f"throttled: behind other runs of throttle key {untag(h.throttle_group or '')!r}",
                    {"throttle_group": h.throttle_group})
        return "throttled", f"throttled until {_at(due)}", {"until_ms": due}
    if wait is not None:
        details: dict[str, Any] = {"step": wait.name, "until_ms": wait.wait_until_ms}
        until = f" until {_at(wait.wait_until_ms)}" if wait.wait_until_ms else ""
        info = decode(wait.info) if wait.info else {}
        if wait.kind == "sleep":
            return "sleeping", f"sleeping in step {wait.name!r}{until}", details
        if wait.kind == "child":
            details["child_run_id"] = wait.child_id
            return "waiting_child", f"waiting in step {wait.name!r} for child run {wait.child_id}{until}", details
        if wait.kind == "event":
            details.update(event=info.get("event"), correlation_key=info.get("key"))
            return ("waiting_event", f"waiting in step {wait.name!r} for event {info.get('event')!r}"
                    + (f" with key {info.get('key')!r}" if info.get("key") else "") + until, details)
        details["message"] = info.get("msg")
        return "waiting_input", f"waiting for input: {info.get('msg', '')!r}{until}", details
    if isinstance(error, dict) and error.get("kind") == "unknown_workflow":
        return ("deferred_no_worker", f"deferred: no worker that claimed it defines workflow {h.workflow!r}; "
                f"tried again at {_at(due)}", {"until_ms": due, "error": error})
    if h.error_stored and isinstance(error, dict):
        return ("retry_delay", f"attempt {h.attempt} failed ({error.get('name')}: {error.get('message')}); "
                f"attempt {h.attempt + 1} starts at {_at(due)}", {"until_ms": due, "error": error})
    return "run_at", f"scheduled to start at {_at(due)}", {"until_ms": due}
