"""Operator actions on runs: retry, replay from a step, bulk retry and cancel."""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Any

import msgspec

from ..encoding import decode, encode, encode_payload
from ..errors import ConfigurationError, InvalidRunStateError, RunNotFoundError
from ..ids import new_run_id
from ..storage.codes import Code
from ..storage.index import index_prefixes
from ..storage.records import RunHeader, StepRecord, decode_steps, encode_step
from ..storage.scripts import check_queue_name
from ..types import TERMINAL_STATUSES, BulkQuery, BulkResult, FailureGroup, RunExplanation
from ..validation import check_run_id
from .explain import explain_run
from .failures import list_failures
from .handle import RunHandle

if TYPE_CHECKING:
    from .facade import RedflowClient

UNSET: Any = object()  # replay_run(input=UNSET): keep the original input
BULK_BATCH = 200
_BULK_FIELDS = frozenset(BulkQuery.__annotations__)
_RETRYABLE = ("failed", "canceled")
_CANCELABLE = ("queued", "scheduled", "running")


def reusable(record: StepRecord) -> bool:
    """Whether a replay may reuse this history line's outcome instead of running the step."""
    if record.state == "ok":
        return True
    if record.state != "done":
        return False
    if record.kind == "child":
        return record.resolution == "succeeded"
    if record.kind == "sleep":
        return not (record.info and "timeout_ms" in decode(record.info))  # a sleep cut short failed
    return True


class Actions:
    """retry_run, replay_run, retry_runs, cancel_runs, list_failures and explain_run; RedflowClient
    forwards its methods of those names here."""

    def __init__(self, client: RedflowClient) -> None:
        self._client = client
        self._store = client.store

    async def list_failures(self, *, workflow: str | None = None, limit: int = 1000) -> list[FailureGroup]:
        """The newest ``limit`` failed runs grouped by workflow, category (exhausted, non_retriable,
        crashed, other), error, failing step and message shape, biggest groups first."""
        return await list_failures(self._client, workflow, limit)

    async def explain_run(self, run_id: str) -> RunExplanation:
        """Why the run is where it is right now: ``reason`` (a code), ``message`` (words), ``details``."""
        return await explain_run(self._client, run_id)

    async def retry_run(self, run_id: str) -> RunHandle:
        """Run a failed or canceled run again as its next attempt, keeping its recorded step outputs
        (failed and canceled steps run again), with a fresh attempt budget and through admission
        control. Raises RunNotFoundError, or InvalidRunStateError when the run has not ended that way."""
        await self._requeue(check_run_id(run_id), "")
        return RunHandle(self._client, run_id)

    async def _requeue(self, run_id: str, token: str) -> bool:
        """Requeue one run; False when ``token`` had requeued it already."""
        store = self._store
        await store.ensure_ready()
        header: RunHeader | None = None
        code, detail = Code.NOT_FOUND, ""
        for _ in range(2):
            header = await store.read_header(run_id)
            if header is None:
                raise RunNotFoundError(f"run {run_id} not found (never created, or removed by retention)")
            code, detail = await store.requeue(run_id, header, token)
            if code is Code.OK:
                return detail != "repeat"
            if code is Code.HELD and detail == "cascade":
                await self._client.cancel_descendants(run_id)  # finish its cancel first, then retry it
                continue
            break
        if code is Code.NOT_FOUND or header is None:
            raise RunNotFoundError(f"run {run_id} not found (never created, or removed by retention)")
        status = header.status
        if code is Code.WRONG_STATUS:
            why = f"is {detail}: only a failed or canceled run can be retried"
        elif code is Code.HELD and detail == "hook":
            why = "failed and its on_failure hook has not finished yet; retry it once the hook is done"
        elif code is Code.HELD:
            why = "is still canceling its child runs; retry it once that is done"
        elif code is Code.CANCELED and detail == "child":
            why = (f"was canceled with its parent run {header.parent_id}: retry the parent, which starts its "
                   "children again")
        elif code is Code.CANCELED:
            why = f"cannot be retried: its parent run {header.parent_id} was canceled"
        elif code is Code.EXISTING:
            why = (f"cannot be retried: its idempotency key {header.idempotency_key!r} now belongs to run "
                   f"{detail}, which has not failed")
        else:
            why = f"cannot be retried ({code.name})"
        raise InvalidRunStateError(run_id, status if code is not Code.WRONG_STATUS else detail, f"run {run_id} {why}")

    async def replay_run(
        self, run_id: str, *, from_step: str | None = None, input: Any = UNSET, queue: str | None = None
    ) -> RunHandle:
        """Start a new run of an ended run's workflow, linked to it (``replayed_from``): the steps
        recorded before ``from_step`` return their recorded outputs without running (none are reused
        without ``from_step``); ``input`` and ``queue`` default to the original's."""
        client, store = self._client, self._store
        check_run_id(run_id)
        if queue is not None:
            check_queue_name(queue)
        await store.ensure_ready()
        found = await store.read_run(run_id)
        if found is None:
            raise RunNotFoundError(f"run {run_id} not found (never created, or removed by retention)")
        header, original_input, _, _ = found
        if header.status not in TERMINAL_STATUSES:
            raise InvalidRunStateError(run_id, header.status, f"run {run_id} is {header.status}: only an ended run "
                                       "can be replayed (cancel it first)")
        lines = await self._lines_before(run_id, from_step) if from_step is not None else []
        if input is UNSET:
            data = original_input or b"null"
        else:
            definition = client.registry_or_default().get(header.workflow)
            value = definition.prepare_input(input) if definition is not None else input
            data = encode_payload(value, f"input of workflow {header.workflow!r}", client.max_payload_bytes)
        new_id = new_run_id(store.of(run_id).keys.partition)  # the script copies from the source run
        code, status = await store.replay(
            new_id, run_id, header.workflow, queue or header.queue, data,
            header.attempt_budget or header.max_attempts, lines,
        )
        if code is Code.NOT_FOUND:
            raise RunNotFoundError(f"run {run_id} not found (removed by retention while replaying)")
        if code is Code.WRONG_STATUS:
            raise InvalidRunStateError(run_id, status, f"run {run_id} is {status}: only an ended run can be replayed")
        return RunHandle(client, new_id)

    async def _lines_before(self, run_id: str, from_step: str) -> list[bytes]:
        """The latest reusable line of every step recorded before ``from_step``, marked as copied
        (attempt 0: recorded by no attempt of the new run)."""
        records = decode_steps(b"".join(await self._store.read_history_lines(run_id)))
        named = [r for r in records if r.name]
        start = next((r.position for r in named if r.name == from_step), None)
        if start is None:
            known = ", ".join(dict.fromkeys(r.name for r in named)) or "none"
            raise ConfigurationError(f"run {run_id} has no step {from_step!r} to replay from (its steps: {known})")
        latest: dict[str, StepRecord] = {}
        for r in named:
            if r.position < start and reusable(r):
                latest[r.name] = r
        # The latest answered input before from_step (a step's or the handler's own) gives ctx.resume;
        # it goes before the lines of its step, which supersede it.
        answered = [r for r in records if r.kind == "input" and r.state == "done" and r.resolution == "input"
                    and r.position < start and (not r.name or latest.get(r.name) is not r)]
        ordered = [(r.position, 1, r) for r in latest.values()] + [(r.position, 0, r) for r in answered[-1:]]
        return [encode_step(msgspec.structs.replace(r, attempt=0)) for _, _, r in sorted(ordered, key=lambda t: t[:2])]

    # --- bulk ---------------------------------------------------------------------------------------
    async def retry_runs(self, query: BulkQuery, *, dry_run: bool = False, job_id: str | None = None) -> BulkResult:
        """Retry every failed or canceled run ``query`` matches, in batches; ``dry_run`` only counts
        them. Progress is saved after each batch: call again with the returned ``job_id`` to resume."""
        return await self._bulk("retry", query, dry_run, job_id, "")

    async def cancel_runs(
        self, query: BulkQuery, *, dry_run: bool = False, reason: str = "", job_id: str | None = None
    ) -> BulkResult:
        """Cancel every queued, scheduled or running run ``query`` matches (like ``retry_runs``)."""
        return await self._bulk("cancel", query, dry_run, job_id, reason)

    async def _bulk(self, action: str, query: BulkQuery, dry_run: bool, job_id: str | None, reason: str) -> BulkResult:
        statuses = _bulk_statuses(action, query)
        if job_id is not None and (not isinstance(job_id, str) or not job_id or len(job_id) > 200 or "\n" in job_id):
            raise ConfigurationError(f"job_id must be a non-empty string of at most 200 characters, got {job_id!r}")
        store = self._store
        await store.ensure_ready()
        job: dict[str, Any] | None = None
        if job_id is not None:
            raw = await store.read_bulk_job(job_id)
            if raw is not None:
                job = decode(raw)
                if job["action"] != action or job["query"] != dict(query):
                    raise ConfigurationError(f"bulk job {job_id!r} is a {job['action']} of {job['query']}, "
                                             f"not a {action} of {dict(query)}")
        if job is None:
            job = {"action": action, "query": dict(query), "reason": reason, "status": 0, "cursor": None,
                   "matched": 0, "done": 0, "skipped": 0}
        job_id = job_id or secrets.token_hex(8)
        while job["status"] < len(statuses):
            status = statuses[job["status"]]
            ids = await self._client.index_page(
                index_prefixes(status, query.get("workflow"))[0], job["cursor"], BULK_BATCH,
                query.get("created_after_ms"), query.get("created_before_ms"),
            )
            if not ids:
                job["status"], job["cursor"] = job["status"] + 1, None
                continue
            matching = await self._matching(ids, status, query.get("queue"))
            job["matched"] += len(matching)
            if not dry_run:
                outcomes = await asyncio.gather(*(self._apply(action, run_id, reason, job_id) for run_id in matching))
                job["done"] += sum(outcomes)
                job["skipped"] += len(outcomes) - sum(outcomes)
            job["cursor"] = ids[-1]
            if not dry_run:
                await store.write_bulk_job(job_id, encode(job))  # resumes after this batch
        if not dry_run:
            await store.write_bulk_job(job_id, encode({**job, "finished": True}))
        return BulkResult(job_id=job_id, dry_run=dry_run, matched=job["matched"], done=job["done"],
                          skipped=job["skipped"], finished=True)

    async def _matching(self, ids: list[str], status: str, queue: str | None) -> list[str]:
        headers = await self._store.read_headers(ids)
        return [run_id for run_id, h in zip(ids, headers, strict=True)
                if h is not None and h.status == status and (queue is None or h.queue == queue)]

    async def _apply(self, action: str, run_id: str, reason: str, job_id: str) -> bool:
        if action == "cancel":
            return await self._client.cancel_run(run_id, reason=reason)
        try:
            await self._requeue(run_id, f"bulk:{job_id}")  # a resumed job never requeues a run twice
        except (InvalidRunStateError, RunNotFoundError):
            return False
        return True


def _bulk_statuses(action: str, query: BulkQuery) -> tuple[str, ...]:
    if not isinstance(query, dict):
        raise ConfigurationError(f"a bulk query is a dict with keys {sorted(_BULK_FIELDS)}, got {query!r}")
    unknown = set(query) - _BULK_FIELDS
    if unknown:
        raise ConfigurationError(f"unknown bulk query keys {sorted(unknown)}; known: {sorted(_BULK_FIELDS)}")
    for name in ("workflow", "queue", "status"):
        value = query.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigurationError(f"bulk query {name} must be a non-empty string, got {value!r}")
    for name in ("created_after_ms", "created_before_ms"):
        value = query.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigurationError(f"bulk query {name} must be epoch milliseconds, got {value!r}")
    allowed = _RETRYABLE if action == "retry" else _CANCELABLE
    status = query.get("status")
    if status is None:
        return allowed
    if status not in allowed:
        verb = "retried" if action == "retry" else "canceled"
        raise ConfigurationError(f"runs that are {status!r} cannot be {verb}; status must be one of {list(allowed)}")
    return (status,)
