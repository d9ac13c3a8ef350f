"""Internal records as stored in Redis, decoded with msgspec.

Every record has readable attribute names here and short names on the wire (the run header is written
by Lua, which uses the short names; every run carries one). Step records are JSON lines appended by
``step.lua``; attempt records are written by the transitions that end an attempt.

The event, subscriber, cron, registration and workflow records further down keep the wire names they
have always been stored with (Lua reads several of them by those names); only attribute names that
would be cryptic (``fp``, ``ts``, ``at``, ``since``) differ from their wire names.
"""

from __future__ import annotations

from typing import Any

import msgspec


def _wire(name: str) -> Any:
    return msgspec.field(name=name)


class RunHeader(msgspec.Struct, omit_defaults=True):
    """A run's header: a MessagePack map that Lua scripts read and write (cmsgpack) with the wire
    names (the short names below)."""

    workflow: str = _wire("w")
    queue: str = _wire("q")
    status: str = msgspec.field(default="queued", name="s")
    attempt: int = msgspec.field(default=0, name="a")  # 0 before the first claim
    max_attempts: int = msgspec.field(default=3, name="m")
    created_at_ms: int = msgspec.field(default=0, name="c")
    available_at_ms: int | None = msgspec.field(default=None, name="av")  # due time
    attempt_started_at_ms: int | None = msgspec.field(default=None, name="st")
    started_at_ms: int | None = msgspec.field(default=None, name="sa")  # first attempt's start
    finished_at_ms: int | None = msgspec.field(default=None, name="f")
    owner: str | None = msgspec.field(default=None, name="o")  # worker id holding the run
    lapses: int | None = msgspec.field(default=None, name="x")  # consecutive worker deaths in this attempt
    hook_pending: int | None = msgspec.field(default=None, name="h")  # 1 while on_failure has not run
    resumed: int | None = msgspec.field(default=None, name="rc")  # requeued without ending its attempt
    parent_id: str | None = msgspec.field(default=None, name="p")
    cancel_requested_at_ms: int | None = msgspec.field(default=None, name="cr")
    cancel_reason: str | None = msgspec.field(default=None, name="cx")
    error_stored: int | None = msgspec.field(default=None, name="e")  # an earlier attempt's error is kept
    held_member: str | None = msgspec.field(default=None, name="hd")  # waiting for capacity or a mutex
    mutex_field: str | None = msgspec.field(default=None, name="mf")  # <tag(mutex key)>, one per prefix
    throttle_member: str | None = msgspec.field(default=None, name="tq")  # place in a throttle queue
    throttle_group: str | None = msgspec.field(default=None, name="tg")  # <tag(workflow)><throttle key>
    debounced: int | None = msgspec.field(default=None, name="db")  # created through a debounce key
    debounce_deadline_ms: int | None = msgspec.field(default=None, name="dl")  # latest start of a debounce
    attempt_budget: int | None = msgspec.field(default=None, name="mb")  # attempts granted at creation, once retried
    readmit: int | None = msgspec.field(default=None, name="ad")  # an operator's retry passes admission again
    replayed_from: str | None = msgspec.field(default=None, name="rf")  # the run this one replays
    idempotency_key: str | None = msgspec.field(default=None, name="ik")  # the key it was started with
    requeue_token: str | None = msgspec.field(default=None, name="rq")  # the last request that retried it
    trace_context: str | None = msgspec.field(default=None, name="tc")  # traceparent[\ntracestate] of its starter


class StepRecord(msgspec.Struct, omit_defaults=True):
    """One line of a run's step history. A later line for the same name supersedes earlier ones.

    ``state`` is "ok" for a completed step, "wait" for a durable wait in progress, "done" for
    the resolution of a wait (``resolution``: "timeout", "event", "input", or the child's final
    status), and "failed" or "canceled" for a step that raised or was canceled (``error``); a
    failed or canceled step is not completed: a replay runs it again. A wait's line is replaced by
    its resolution, which keeps the wait's start and deadline.
    """

    name: str = _wire("n")
    position: int = _wire("q")  # position of the step in the handler's sequence of steps, from 1
    attempt: int = _wire("a")  # attempt that recorded it
    output: msgspec.Raw = msgspec.field(default=msgspec.Raw(b"null"), name="o")  # output JSON
    started_at_ms: int = msgspec.field(default=0, name="t0")
    finished_at_ms: int = msgspec.field(default=0, name="t1")
    state: str = msgspec.field(default="ok", name="s")  # ok | wait | done | failed | canceled
    kind: str = msgspec.field(default="run", name="k")  # run | sleep | event | child | input | emit
    resolution: str | None = msgspec.field(default=None, name="r")
    wait_until_ms: int | None = msgspec.field(default=None, name="u")  # a wait's deadline (server clock)
    child_id: str | None = msgspec.field(default=None, name="ch")
    info: str | None = msgspec.field(default=None, name="i")  # a wait's details, JSON text (see WaitRecord.info)
    error: msgspec.Raw = msgspec.field(default=msgspec.Raw(b"null"), name="e")  # a failed or canceled step's error


class AttemptRecord(msgspec.Struct, omit_defaults=True):
    """How one attempt ended (written by the transition that ended it; a success is the run itself)."""

    attempt: int = _wire("a")
    payload: msgspec.Raw = msgspec.field(default=msgspec.Raw(b"null"), name="o")  # error (or output) JSON
    started_at_ms: int = msgspec.field(default=0, name="t0")
    finished_at_ms: int = msgspec.field(default=0, name="t1")
    status: str = msgspec.field(default="failed", name="r")


class WaitRecord(msgspec.Struct, omit_defaults=True):
    """The durable wait a suspended run is in (hash ``waits``)."""

    name: str = _wire("n")
    position: int = _wire("q")
    kind: str = _wire("k")  # sleep | event | child | input
    started_at_ms: int | None = msgspec.field(default=None, name="t0")
    wait_until_ms: int | None = msgspec.field(default=None, name="u")
    child_id: str | None = msgspec.field(default=None, name="ch")
    waiter_member: str | None = msgspec.field(default=None, name="m")  # entry in `waiters`
    line: int | None = msgspec.field(default=None, name="ln")  # history line the resolution replaces
    info: str | None = None  # the wait's details, JSON text: {msg, schema} (input) or {event, key} (event)


_header_decoder = msgspec.msgpack.Decoder(RunHeader)  # written by the scripts with cmsgpack
_attempt_decoder = msgspec.json.Decoder(AttemptRecord)
_wait_decoder = msgspec.json.Decoder(WaitRecord)
_step_decoder = msgspec.json.Decoder(StepRecord)
_step_encoder = msgspec.json.Encoder()


def decode_header(data: bytes) -> RunHeader:
    return _header_decoder.decode(data)


def decode_steps(data: bytes) -> list[StepRecord]:
    if not data:
        return []
    return [_step_decoder.decode(line) for line in data.split(b"\n") if line]


def decode_attempt(data: bytes) -> AttemptRecord:
    return _attempt_decoder.decode(data)


def decode_wait(data: bytes) -> WaitRecord:
    return _wait_decoder.decode(data)


def encode_step(record: StepRecord) -> bytes:
    return _step_encoder.encode(record) + b"\n"


class ClaimedRun(msgspec.Struct):
    id: str
    kind: str  # "run", "hook", or "admit" (a first start that must pass throttle / rate limit)
    token: bytes
    header: RunHeader
    input: bytes
    steps: list[StepRecord]
    error: bytes


def parse_claim(reply: list[Any]) -> tuple[int, list[ClaimedRun], list[tuple[str, str]]]:
    """(ms until the next scheduled run or -1, claimed runs, (id, error) of runs put back unread)
    from a claim.lua reply."""
    runs = []
    unclaimable = []
    for i in range(2, len(reply), 7):
        if reply[i + 1] == b"unclaimable":
            unclaimable.append((reply[i].decode(), reply[i + 6].decode(errors="replace")))
            continue
        runs.append(
            ClaimedRun(
                id=reply[i].decode(),
                kind=reply[i + 1].decode(),
                token=reply[i + 2] if isinstance(reply[i + 2], bytes) else str(reply[i + 2]).encode(),
                header=_header_decoder.decode(reply[i + 3]),
                input=reply[i + 4],
                steps=decode_steps(reply[i + 5]),
                error=reply[i + 6],
            )
        )
    return int(reply[1]), runs, unclaimable


# --- events ------------------------------------------------------------------------------------------


def _array(value: list[Any] | dict[str, Any]) -> list[Any]:
    """cjson encodes an empty Lua table (an empty array) as ``{}``."""
    return value if isinstance(value, list) else []


class Delivery(msgspec.Struct, omit_defaults=True):
    """One subscriber's run of an event (an item of ``EventRecord.deliveries``; written by emit.lua)."""

    workflow: str
    queue: str
    status: str  # delivered | failed (a delayed event of a parent canceled before it came due)
    subscriber_event_id: str  # <event id>:<workflow>
    run_id: str | None = None  # absent when no run was created
    error: str | None = None  # why the delivery failed


class EventRecord(msgspec.Struct, omit_defaults=True):
    """An event's fan-out record (hash ``events``), written by emit.lua with cjson only.

    Optional fields are absent (never null) on the wire while unset. ``deliveries`` and
    ``resumed_run_ids`` are ``{}`` while empty (cjson); read them through ``delivery_list()`` and
    ``resumed_runs()``.
    """

    id: str
    name: str
    emitted_at_ms: int = _wire("ts")  # emit time (the requested time of a delayed event)
    fingerprint: str = msgspec.field(default="", name="fp")  # sha1 of (name, data, correlation key, parent)
    deliveries: list[Delivery] | dict[str, Any] = msgspec.field(default_factory=list)
    resumed_run_ids: list[str] | dict[str, Any] = msgspec.field(default_factory=list)
    subscriber_count: int = 0
    delivery_count: int = 0
    failed_delivery_count: int = 0
    resumed_run_count: int = 0
    fanout_status: str = "pending"  # pending | completed | no-subscribers
    correlation_key: str | None = None
    parent_run_id: str | None = None
    next_process_at_ms: int | None = msgspec.field(default=None, name="next_process_at")  # a delayed event's due time
    finished_at_ms: int | None = msgspec.field(default=None, name="finished_at")  # when the fan-out ran
    buffer_member: str | None = None  # entry in `event_buffer` (events with a correlation key)

    def delivery_list(self) -> list[Delivery]:
        return _array(self.deliveries)

    def resumed_runs(self) -> list[str]:
        return _array(self.resumed_run_ids)

    def public(self) -> dict[str, Any]:
        """The public shape of the record (get_event, list_events, emit): the fingerprint and buffer
        member are internal; unset optional fields are None; empty arrays are lists."""
        return {
            "id": self.id,
            "name": self.name,
            "ts": self.emitted_at_ms,
            "correlation_key": self.correlation_key,
            "parent_run_id": self.parent_run_id,
            "fanout_status": self.fanout_status,
            "subscriber_count": self.subscriber_count,
            "delivery_count": self.delivery_count,
            "failed_delivery_count": self.failed_delivery_count,
            "resumed_run_count": self.resumed_run_count,
            "deliveries": [{"run_id": None, "error": None, **msgspec.to_builtins(d)} for d in self.delivery_list()],
            "resumed_run_ids": list(self.resumed_runs()),
            "next_process_at": self.next_process_at_ms,
            "finished_at": self.finished_at_ms,
            # The fan-out is one script: it ran once (finished) or not yet (a delayed event).
            "processing_attempts": 0 if self.finished_at_ms is None else 1,
            "error": next(({"name": "DeliveryError", "message": d.error, "kind": "error"}
                           for d in self.delivery_list() if d.status == "failed" and d.error), None),
            "last_process_error": None,
            "expires_at": None,
        }


class EventData(msgspec.Struct):
    """An event's payload record (hash ``event_data``), written by emit.lua only, as
    ``{"id":<id>,"name":<name>,"data":<data>,"ts":<ts>}`` with the data JSON byte for byte as emitted
    (emit.lua slices it back out of the record; a waiting run receives the whole record). ``data`` is
    kept raw here so nothing re-encodes it; do not write this record from Python (msgspec and cjson
    escape strings differently, and emit.lua relies on cjson's encoding of id and name)."""

    id: str
    name: str
    data: msgspec.Raw
    emitted_at_ms: int = _wire("ts")

    def payload(self) -> Any:
        """The decoded data."""
        return msgspec.json.decode(self.data)


class SubscriberRecord(msgspec.Struct):
    """A workflow's subscription to an event (hash ``subscribers``, member ``<tag(event)><workflow>``);
    written at registration, read by emit.lua (queue, workflow, max_attempts)."""

    event: str
    workflow: str
    queue: str
    max_attempts: int
    input_json_schema: Any = None  # the workflow's input schema: the event's contract

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


# --- cron and registrations --------------------------------------------------------------------------


class CronRecord(msgspec.Struct):
    """A registered cron trigger (hash ``crons``, by trigger id). Every field is always written, so a
    re-registration of an unchanged trigger encodes to the same bytes."""

    workflow: str
    queue: str
    expression: str
    timezone: str | None = None  # None: the leader's local zone
    input: Any = None
    max_attempts: int = 3
    max_concurrency: int = 0  # 0: unlimited


class RegistrationRecord(msgspec.Struct, omit_defaults=True):
    """What a started worker defines (hash ``registrations``, by worker id)."""

    workflows: list[str] = msgspec.field(default_factory=list)
    registered_at_ms: int = msgspec.field(default=0, name="at")
    queues: list[str] | None = None  # the queues it claims from (None: recorded before queues were)


class CronOrphanRecord(msgspec.Struct):
    """A trigger no live worker serves (hash ``cron_orphans``, by trigger id)."""

    workflow: str
    since_slot_ms: int = _wire("since")  # the first slot not fired


# --- workflow metadata -------------------------------------------------------------------------------


class CronMeta(msgspec.Struct):
    expression: str
    timezone: str | None = None
    input: Any = None
    id: str | None = None


class EventTriggerMeta(msgspec.Struct):
    name: str
    id: str | None = None


class AdmissionMeta(msgspec.Struct, omit_defaults=True):
    """Admission rules of a workflow; absent keys are absent rules. Also the ``admission`` hash's value."""

    throttle: list[int] | None = None  # [limit, period ms]
    rate_limit: list[int] | None = None  # [limit, period ms]
    mutex: bool = False


class WorkflowMeta(msgspec.Struct):
    """What workers publish about a workflow (hash ``workflows``): ``WorkflowDefinition.meta()`` and
    the worker's app. Clients without the definition enqueue by it."""

    name: str
    queue: str
    max_attempts: int
    max_concurrency: int | None = None
    stream_enabled: bool = False
    input_json_schema: Any = None
    cron: list[CronMeta] = msgspec.field(default_factory=list)
    event: list[EventTriggerMeta] = msgspec.field(default_factory=list)
    admission: AdmissionMeta = msgspec.field(default_factory=AdmissionMeta)
    app: str = ""
    updated_at_ms: int = msgspec.field(default=0, name="updated_at")  # when it was registered (server clock)

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


_record_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(EventRecord)
_event_data_decoder = msgspec.json.Decoder(EventData)
_subscriber_decoder = msgspec.json.Decoder(SubscriberRecord)
_cron_decoder = msgspec.json.Decoder(CronRecord)
_registration_decoder = msgspec.json.Decoder(RegistrationRecord)
_cron_orphan_decoder = msgspec.json.Decoder(CronOrphanRecord)
_workflow_meta_decoder = msgspec.json.Decoder(WorkflowMeta)


def encode_record(
    record: SubscriberRecord | CronRecord | RegistrationRecord | CronOrphanRecord | WorkflowMeta | AdmissionMeta,
) -> bytes:
    """The stored JSON of a record Python writes (event records are written by Lua only)."""
    return _record_encoder.encode(record)


def decode_event(data: bytes) -> EventRecord:
    return _event_decoder.decode(data)


def decode_event_data(data: bytes) -> EventData:
    return _event_data_decoder.decode(data)


def decode_subscriber(data: bytes) -> SubscriberRecord:
    return _subscriber_decoder.decode(data)


def decode_cron(data: bytes) -> CronRecord:
    return _cron_decoder.decode(data)


def decode_registration(data: bytes) -> RegistrationRecord:
    return _registration_decoder.decode(data)


def decode_cron_orphan(data: bytes) -> CronOrphanRecord:
    return _cron_orphan_decoder.decode(data)


def decode_workflow_meta(data: bytes) -> WorkflowMeta:
    return _workflow_meta_decoder.decode(data)


def workflow_meta(meta: dict[str, Any]) -> WorkflowMeta:
    """A WorkflowMeta from ``WorkflowDefinition.meta()`` (plus ``app``)."""
    return msgspec.convert(meta, WorkflowMeta)


def admission_meta(admission: dict[str, Any]) -> AdmissionMeta:
    """An AdmissionMeta from the ``admission`` of ``WorkflowDefinition.meta()``."""
    return msgspec.convert(admission, AdmissionMeta)
