"""Run states as the public API shows them, built from the stored records."""

from __future__ import annotations

from ..encoding import decode, encode
from ..storage.records import RunHeader, StepRecord, WaitRecord
from ..types import EventWaitInfo, InputWaitInfo, RunState, StepState, WaitInfo


def wait_info(r: StepRecord, pending: WaitRecord | None) -> WaitInfo | None:
    """What an event or input wait step waited for and how it ended (None for other steps)."""
    if r.kind not in ("event", "input"):
        return None
    raw = r.info or (pending.info if pending is not None else None)
    if not raw and pending is not None and pending.waiter_member:
        raw = _event_from_member(pending.waiter_member)
    details = decode(raw) if raw else {}
    if not isinstance(details, dict):
        details = {}
    resolved_by = r.resolution if r.state == "done" else None
    if r.kind == "input":
        return InputWaitInfo(
            kind="input", message=str(details.get("msg", "")), input_json_schema=details.get("schema"),
            resolved_by=resolved_by,  # type: ignore[typeddict-item]
        )
    event = decode(r.output) if resolved_by == "event" else None
    if not isinstance(event, dict):
        event = {}
    return EventWaitInfo(
        kind="event", event=details.get("event", event.get("name")), correlation_key=details.get("key"),
        event_id=event.get("id"), resolved_by=resolved_by, ts=event.get("ts"),  # type: ignore[typeddict-item]
    )


def _event_from_member(member: str) -> str | None:
    """{event, key} from an event waiter member ``<len>:<event>:<len>:<key>:<run id>``."""
    try:  # the lengths count bytes (storage.keys.tag)
        size, rest = member.encode().split(b":", 1)
        event, rest = rest[: int(size)], rest[int(size) + 1:]
        size, rest = rest.split(b":", 1)
        key = rest[: int(size)]
        return encode({"event": event.decode(), "key": key.decode()}).decode()
    except ValueError:
        return None


def step_state(r: StepRecord, pending: WaitRecord | None = None) -> StepState:
    status = "succeeded"
    if r.state == "wait":
        status = "running"
    elif r.state in ("failed", "canceled"):  # a step that raised, timed out or was canceled
        status = r.state
    elif r.resolution in ("failed", "canceled"):
        status = r.resolution
    elif r.kind == "child" and r.resolution == "timeout":
        status = "failed"
    state = StepState(name=r.name, seq=r.position, attempt=r.attempt, status=status, started_at=r.started_at_ms,
                      finished_at=r.finished_at_ms, output=decode(r.output))
    if r.kind != "run":
        state["kind"] = r.kind
    wait = wait_info(r, pending)
    if wait is not None:
        state["wait"] = wait
    if r.wait_until_ms is not None:
        state["wait_until_at"] = r.wait_until_ms
    if r.child_id is not None:
        state["child_run_id"] = r.child_id
    state["error"] = decode(r.error)
    return state


def run_state(
    run_id: str, h: RunHeader, inp: bytes | None, out: bytes | None, err: bytes | None
) -> RunState:
    state = RunState(
        id=run_id,
        workflow=h.workflow,
        queue=h.queue,
        status=h.status,  # type: ignore[typeddict-item]
        input=None if inp is None else decode(inp),
        output=None if out is None else decode(out),
        error=None if err is None else decode(err),
        attempt=h.attempt,
        max_attempts=h.max_attempts,
        created_at=h.created_at_ms,
        available_at=h.available_at_ms,
        started_at=h.started_at_ms,
        finished_at=h.finished_at_ms,
        cancel_requested_at=h.cancel_requested_at_ms,
        cancel_reason=h.cancel_reason,
        parent_run_id=h.parent_id,
        stream_enabled=False,  # get_run fills it in from the workflow's definition or metadata
    )
    if h.replayed_from is not None:
        state["replayed_from"] = h.replayed_from
    return state
