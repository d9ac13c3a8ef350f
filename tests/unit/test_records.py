"""Stored records decode from the exact JSON written today and keep every public shape."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from redflow.encoding import decode, encode
from redflow.storage.records import (
    AdmissionMeta,
    CronOrphanRecord,
    CronRecord,
    Delivery,
    EventRecord,
    RegistrationRecord,
    SubscriberRecord,
    WorkflowMeta,
    admission_meta,
    decode_cron,
    decode_cron_orphan,
    decode_event,
    decode_event_data,
    decode_registration,
    decode_subscriber,
    decode_workflow_meta,
    encode_record,
    workflow_meta,
)
from redflow.storage.scripts import _read


def normalize_event(record: dict[str, Any]) -> dict[str, Any]:
    """The public shape of an event record as event_store built it before the records were typed."""
    for field in ("deliveries", "resumed_run_ids"):
        if record.get(field) == {}:
            record[field] = []
    record.pop("fp", None)
    record.pop("buffer_member", None)
    record.setdefault("correlation_key", None)
    record.setdefault("parent_run_id", None)
    record.setdefault("next_process_at", None)
    record.setdefault("finished_at", None)
    record.setdefault("failed_delivery_count", 0)
    # Added for redflow 0.1.9's EventRecord / EventDelivery shapes (issue 11).
    record["deliveries"] = [{"run_id": None, "error": None, **d} for d in record["deliveries"]]
    record["processing_attempts"] = 0 if record["finished_at"] is None else 1
    record["error"] = next(({"name": "DeliveryError", "message": d["error"], "kind": "error"}
                            for d in record["deliveries"] if d["status"] == "failed" and d["error"]), None)
    record["last_process_error"] = None
    record["expires_at"] = None
    return record


def wire_names(struct: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct)}


# --- events ------------------------------------------------------------------------------------------

# As cjson writes them (key order is cjson's, empty arrays are {}).
PENDING = (
    b'{"fanout_status":"pending","resumed_run_ids":{},"next_process_at":1700000060000,"subscriber_count":0,'
    b'"ts":1700000060000,"fp":"3f786850e387550fdab836ed7e6dc881de23001b","deliveries":{},"name":"paid",'
    b'"delivery_count":0,"resumed_run_count":0,"failed_delivery_count":0,"id":"evt-1","correlation_key":"o-1"}'
)
COMPLETED = (
    b'{"finished_at":1700000000123,"resumed_run_ids":["r-9"],"subscriber_count":1,"parent_run_id":"r-0",'
    b'"buffer_member":"4:paid:3:o-1:1700000000000:evt-2","ts":1700000000000,"fp":"aa","name":"paid",'
    b'"deliveries":[{"run_id":"01HX-p0","status":"delivered","queue":"default","workflow":"bill",'
    b'"subscriber_event_id":"evt-2:bill"}],"delivery_count":1,"resumed_run_count":1,"failed_delivery_count":0,'
    b'"id":"evt-2","correlation_key":"o-1","fanout_status":"completed"}'
)
NO_SUBSCRIBERS = (
    b'{"finished_at":1700000000005,"resumed_run_ids":{},"subscriber_count":0,"ts":1700000000001,"fp":"bb",'
    b'"name":"nobody","deliveries":{},"delivery_count":0,"resumed_run_count":0,"failed_delivery_count":0,'
    b'"id":"evt-3","fanout_status":"no-subscribers"}'
)


@pytest.mark.parametrize("raw", [PENDING, COMPLETED, NO_SUBSCRIBERS])
def test_event_record_public_shape_is_the_old_normalized_shape(raw: bytes) -> None:
    assert decode_event(raw).public() == normalize_event(decode(raw))


def test_event_record_readable_attributes_and_empty_arrays() -> None:
    pending = decode_event(PENDING)
    assert pending.deliveries == {} and pending.delivery_list() == [] and pending.resumed_runs() == []
    assert pending.emitted_at_ms == pending.next_process_at_ms == 1700000060000
    assert pending.fingerprint == "3f786850e387550fdab836ed7e6dc881de23001b"
    assert pending.finished_at_ms is None and pending.parent_run_id is None
    done = decode_event(COMPLETED)
    assert done.delivery_list() == [Delivery(workflow="bill", queue="default", status="delivered", run_id="01HX-p0",
                                             subscriber_event_id="evt-2:bill")]
    assert done.resumed_runs() == ["r-9"]
    assert done.buffer_member == "4:paid:3:o-1:1700000000000:evt-2"
    public = done.public()
    assert "fp" not in public and "buffer_member" not in public
    assert public["deliveries"][0]["run_id"] == "01HX-p0"


def test_event_record_knows_every_field_emit_lua_writes() -> None:
    """No field only Lua knows: every key emit.lua puts into an event record or a delivery is a field."""
    lua = _read("emit.lua")
    literal = re.search(r"rec = \{(.*?)\}\n", lua, re.DOTALL)
    assert literal is not None
    written = set(re.findall(r"(\w+) = ", literal.group(1))) | set(re.findall(r"\brec\.(\w+) = ", lua))
    assert written and written <= wire_names(EventRecord), written - wire_names(EventRecord)
    delivery = re.search(r"deliveries\[#deliveries \+ 1\] = \{(.*?)\}\n", lua, re.DOTALL)
    assert delivery is not None
    assert set(re.findall(r"(\w+) = ", delivery.group(1))) == wire_names(Delivery)


def test_event_data_keeps_the_data_bytes() -> None:
    data = b'{"amount": 1.10, "tags": [], "big": 12345678901234567890, "s": "\\u00e9\\/"}'
    raw = b'{"id":"evt-1","name":"paid","data":' + data + b',"ts":1700000000000}'
    record = decode_event_data(raw)
    assert bytes(record.data) == data
    assert record.id == "evt-1" and record.name == "paid" and record.emitted_at_ms == 1700000000000
    assert record.payload() == decode(data)
    assert decode_event_data(b'{"id":"e","name":"n","data":null,"ts":1}').payload() is None


# --- subscribers, cron, registrations ----------------------------------------------------------------


def test_subscriber_record_bytes_and_public_shape() -> None:
    old = {"event": "paid", "workflow": "bill", "queue": "default", "max_attempts": 3,
           "input_json_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}
    record = SubscriberRecord(event="paid", workflow="bill", queue="default", max_attempts=3,
                              input_json_schema=old["input_json_schema"])
    assert encode_record(record) == encode(old)
    assert decode_subscriber(encode(old)) == record
    assert record.public() == old
    plain = {**old, "input_json_schema": None}
    assert decode_subscriber(encode(plain)).public() == plain
    assert encode_record(decode_subscriber(encode(plain))) == encode(plain)


def test_cron_record_bytes_unchanged() -> None:
    """Registration compares the stored bytes: an unchanged trigger must encode exactly as before."""
    old = {"workflow": "nightly", "queue": "default", "expression": "0 3 * * *", "timezone": None,
           "input": {"full": True, "n": [1, 2.5]}, "max_attempts": 3, "max_concurrency": 0}
    record = decode_cron(encode(old))
    assert record == CronRecord(workflow="nightly", queue="default", expression="0 3 * * *", timezone=None,
                                input={"full": True, "n": [1, 2.5]}, max_attempts=3, max_concurrency=0)
    assert encode_record(record) == encode(old)
    zoned = {**old, "timezone": "Europe/Berlin", "input": None, "max_concurrency": 2}
    assert encode_record(decode_cron(encode(zoned))) == encode(zoned)


def test_registration_and_orphan_records() -> None:
    raw = encode({"workflows": ["a", "b"], "at": 1700000000000})
    record = decode_registration(raw)
    assert record == RegistrationRecord(workflows=["a", "b"], registered_at_ms=1700000000000)
    assert encode_record(record) == raw
    assert decode_registration(b'{"workflows":{},"at":5}'.replace(b"{}", b"[]")).workflows == []
    orphan = encode({"workflow": "gone", "since": 1700000040000})
    assert decode_cron_orphan(orphan) == CronOrphanRecord(workflow="gone", since_slot_ms=1700000040000)
    assert encode_record(decode_cron_orphan(orphan)) == orphan


# --- workflow metadata -------------------------------------------------------------------------------


def _definitions() -> list[Any]:
    from redflow import CronTrigger, EventTrigger, WorkflowRateLimitOptions, WorkflowRegistry, define_workflow

    reg = WorkflowRegistry()

    async def handler(ctx: Any) -> None:
        return None

    plain = define_workflow("plain", handler=handler, registry=reg)
    full = define_workflow(
        "full", handler=handler, registry=reg, queue="q2", max_attempts=5, max_concurrency=4, stream=True,
        cron=[CronTrigger(expression="*/5 * * * *"),
              CronTrigger(expression="0 3 * * *", timezone="UTC", input={"x": [1, 2.5]}, id="nightly")],
        event=[EventTrigger(name="paid"), EventTrigger(name="refunded", id="r")],
        throttle=WorkflowRateLimitOptions(key=lambda _: "k", limit=10, period="1m"),
        rate_limit=WorkflowRateLimitOptions(key=lambda _: "k", limit=3, period=1000),
        mutex=lambda _: "k",
    )
    return [plain, full]


def test_workflow_meta_round_trips_losslessly() -> None:
    definitions = _definitions()
    for d in definitions:
        meta = {**d.meta(), "app": "billing", "updated_at": 1_700_000_000_000}
        raw = encode(meta)
        record = decode_workflow_meta(raw)
        assert record.public() == meta
        assert encode_record(record) == raw  # same bytes as stored today
        assert workflow_meta(meta) == record
        assert admission_meta(meta["admission"]) == record.admission
        assert encode_record(record.admission) == encode(meta["admission"])
    full = decode_workflow_meta(encode({**definitions[1].meta(), "app": "billing"}))
    assert full.admission == AdmissionMeta(throttle=[10, 60_000], rate_limit=[3, 1000], mutex=True)
    assert [c.id for c in full.cron] == [None, "nightly"] and full.cron[1].input == {"x": [1, 2.5]}
    assert [e.name for e in full.event] == ["paid", "refunded"] and full.stream_enabled is True
    assert decode_workflow_meta(encode({**definitions[0].meta(), "app": ""})).admission == AdmissionMeta()


def test_workflow_meta_decodes_a_stored_sample() -> None:
    raw = (b'{"name":"w","queue":"default","max_attempts":3,"max_concurrency":null,"stream_enabled":false,'
           b'"input_json_schema":null,"cron":[],"event":[{"name":"paid","id":null}],"admission":{},"app":"a"}')
    record = decode_workflow_meta(raw)
    assert record == WorkflowMeta(name="w", queue="default", max_attempts=3, event=[
        msgspec.convert({"name": "paid"}, type(record.event[0]))], app="a")
    assert record.updated_at_ms == 0  # stored before registrations carried their time
    assert encode_record(record) == raw[:-1] + b',"updated_at":0}'


# --- what emit.lua and registration write today ------------------------------------------------------


async def test_records_written_by_the_server_decode_to_the_old_shapes(client: Any) -> None:
    """Emit real events (delivered, delayed, with a waiter-less correlation key, to nobody) and check
    every stored record against the shapes the untyped code produced."""
    from datetime import UTC, datetime, timedelta

    events, k, redis = client.events, client.keys, client.redis
    sec, usec = await redis.execute("TIME")
    now = int(sec) * 1000 + int(usec) // 1000
    meta = {"name": "bill", "queue": "default", "max_attempts": 2, "input_json_schema": None,
            "max_concurrency": None, "admission": {}}
    cron = CronRecord(workflow="bill", queue="default", expression="0 3 * * *")
    await events.register({"bill": meta}, {"bill": ["paid"]}, {"nightly": cron}, now)
    await events.record_registration("w-1", ["bill"], ["default"])
    raw_sub = (await redis.execute("HGETALL", k.subscribers))[1]
    assert raw_sub == encode({"event": "paid", "workflow": "bill", "queue": "default", "max_attempts": 2,
                              "input_json_schema": None})
    assert await redis.execute("HGET", k.crons, "nightly") == encode(
        {"workflow": "bill", "queue": "default", "expression": "0 3 * * *", "timezone": None, "input": None,
         "max_attempts": 3, "max_concurrency": 0})
    registration = decode(await redis.execute("HGET", k.registrations, "w-1"))
    assert registration["workflows"] == ["bill"] and registration["queues"] == ["default"]
    assert now <= registration["at"] <= now + 5000

    await client.emit_event("paid", {"n": 1.10, "l": []}, event_id="e-1", correlation_key="c")
    await client.emit_event("nobody.listens", None, event_id="e-2")
    await client.emit_event("paid", {"later": True}, event_id="e-3",
                            emit_at=datetime.now(UTC) + timedelta(hours=1))
    flat = await redis.execute("HGETALL", k.events)
    assert len(flat) == 6
    for i in range(0, len(flat), 2):
        raw = flat[i + 1]
        assert decode_event(raw).public() == normalize_event(decode(raw))
        got = await client.get_event(flat[i].decode())
        data = await redis.execute("HGET", k.event_data, flat[i])
        expires = await redis.execute("ZSCORE", k.event_expiry, flat[i])
        assert got == {**normalize_event(decode(raw)), "data": decode(data)["data"],
                       "expires_at": None if expires is None else int(float(expires))}
    assert decode_event(await redis.execute("HGET", k.events, "e-3")).deliveries == {}
    data = await redis.execute("HGET", k.event_data, "e-1")
    assert bytes(decode_event_data(data).data) == b'{"n":1.1,"l":[]}'
    listed = await client.list_cron_triggers()
    assert listed == [{"id": "nightly", "workflow": "bill", "queue": "default", "expression": "0 3 * * *",
                       "timezone": None, "input": None, "last_slot_ms": now, "orphaned": False,
                       "orphaned_since": None}]
    assert await events.mark_cron_orphaned("nightly", "bill", now + 5)
    assert decode(await redis.execute("HGET", k.cron_orphans, "nightly")) == {"workflow": "bill", "since": now + 5}
    assert (await client.list_cron_triggers())[0]["orphaned_since"] == now + 5
