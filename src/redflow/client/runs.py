"""Reading one run: its state, steps, attempts and stream; answering its input wait: a part of
RedflowClient."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..encoding import decode, encode_payload
from ..errors import ConfigurationError
from ..storage.codes import Code
from ..storage.records import StepRecord
from ..streams import RunStreamReader, RunStreamRecord, check_read_args, stream_record
from ..types import TERMINAL_STATUSES, AttemptTrace, RunState, StepState
from ..validation import check_run_id, json_schema_issues, validation_error
from .handle import RunHandle
from .states import run_state, step_state, wait_info

if TYPE_CHECKING:
    from .facade import RedflowClient


class Runs:
    """get_run, get_run_steps, get_run_attempts, get_run_stream, read_stream and resume_run;
    RedflowClient forwards its methods of those names here."""

    def __init__(self, client: RedflowClient) -> None:
        self._client = client
        self.store = client.store
        self.keys = client.keys
        self.redis = client.redis

    async def get_run(self, run_id: str) -> RunState | None:
        check_run_id(run_id)
        await self.store.ensure_ready()
        found = await self.store.read_run(run_id)
        if found is None:
            return None
        header, inp, out, err = found
        state = run_state(run_id, header, inp, out, err)
        state["stream_enabled"] = await self._streams(header.workflow)
        return state

    async def _streams(self, workflow: str) -> bool:
        """Whether the workflow streams: from its local definition, else its registered metadata."""
        definition = self._client.registry_or_default().get(workflow)
        if definition is not None:
            return bool(definition.options.stream)
        meta = await self._client._workflow_meta(workflow)
        return bool(meta and meta.get("stream_enabled"))

    async def get_run_steps(self, run_id: str) -> list[StepState]:
        """The run's steps in handler order, each in its latest recorded state."""
        await self.store.ensure_ready()
        history, pending = await asyncio.gather(self.store.read_steps(run_id), self.store.read_wait(run_id))
        latest: dict[str, StepRecord] = {}
        waits: dict[str, StepRecord] = {}  # the latest event or input wait of each step
        for record in history:
            if record.name:  # not the handler's own input waits
                latest[record.name] = record
                if record.kind in ("event", "input"):
                    waits[record.name] = record
        states = []
        for r in sorted(latest.values(), key=lambda r: r.position):
            state = step_state(r, pending if pending is not None and pending.name == r.name else None)
            wait = waits.get(r.name)
            if "wait" not in state and wait is not None and wait.position == r.position:
                # A step that raised wait_for_input and then completed: its wait is part of its story.
                info = wait_info(wait, None)
                if info is not None:
                    state["wait"] = info
            states.append(state)
        return states

    async def get_run_attempts(self, run_id: str) -> list[AttemptTrace]:
        """One trace per attempt that ended (failed and retried, or final), with its steps."""
        await self.store.ensure_ready()
        header = await self.store.read_header(run_id)
        if header is None:
            return []
        history, ended = await asyncio.gather(
            self.store.read_steps(run_id), self.store.read_attempts(run_id, header.attempt)
        )
        attempts: dict[int, AttemptTrace] = {}
        for r in ended:
            attempts[r.attempt] = AttemptTrace(
                attempt=r.attempt, status=r.status, started_at=r.started_at_ms, finished_at=r.finished_at_ms,
                output=decode(r.payload) if r.status == "succeeded" else None,
                error=decode(r.payload) if r.status != "succeeded" else None, steps=[],
            )
        if header.status == "succeeded" and header.attempt not in attempts:
            # A succeeded attempt has no attempt record: the run record describes it.
            out = await self.store.read_output(run_id)
            attempts[header.attempt] = AttemptTrace(
                attempt=header.attempt, status="succeeded", started_at=header.attempt_started_at_ms or 0,
                finished_at=header.finished_at_ms or 0, output=None if out is None else decode(out), error=None,
                steps=[],
            )
        for step in history:
            if step.name and step.attempt in attempts:
                attempts[step.attempt]["steps"].append(step_state(step))
        return [attempts[a] for a in sorted(attempts)]

    async def get_run_stream(self, run_id: str, *, limit: int | None = None) -> list[RunStreamRecord]:
        """The values a run streamed so far (oldest first)."""
        await self.store.ensure_ready()
        count = None if limit is None else check_read_args(limit, None)[0]
        entries = await self.store.stream_range(run_id, count)
        return [r for _, fields in entries if (r := stream_record(fields)) is not None]

    async def read_stream(
        self,
        run_id: str,
        *,
        drain: bool = False,
        block_ms: int | None = None,
        limit: int | None = None,
        resumable: str | bool | None = None,
    ) -> RunStreamReader | None:
        """A live reader of the run's stream; None when the run does not exist. ``resumable`` is a
        chunk's cursor_id to start after it; True, False or None start at the beginning (every chunk
        carries its cursor_id either way). With ``drain`` it stops once caught up instead of waiting."""
        lim, block = check_read_args(limit, block_ms)
        if isinstance(resumable, bool):
            resumable = None
        elif resumable is not None and not isinstance(resumable, str):
            raise ConfigurationError(f"resumable must be a cursor_id string or a bool, got {resumable!r}")
        await self.store.ensure_ready()
        if await self.store.read_header(run_id) is None:
            return None
        return RunStreamReader(self.store, run_id, drain=drain, block_ms=block, limit=lim, after=resumable or "0-0")

    async def resume_run(self, run_id: str, input: Any = None, *, form: Any = None) -> RunHandle | None:
        """Answer a run waiting in wait_for_input: ``form`` is validated against the wait's schema;
        ``input``, when not None, replaces the run's input. Returns the handle, or None when the run
        is not waiting for input (a run already queued or running returns its handle)."""
        await self.store.ensure_ready()
        header = await self.store.read_header(run_id)
        if header is None or header.status in TERMINAL_STATUSES:
            return None
        if header.status in ("queued", "running"):
            return RunHandle(self._client, run_id)
        wait = await self.store.read_wait(run_id)
        if wait is None or wait.kind != "input":
            return None
        schema = decode(wait.info).get("schema") if wait.info else None
        if schema:
            issues = json_schema_issues(schema, form)
            if issues:
                raise validation_error(f"form for run {run_id}", issues)
        form_json = encode_payload(form, f"form for run {run_id}", self._client.max_payload_bytes)
        new_input = None if input is None else encode_payload(
            input, f"input of run {run_id}", self._client.max_payload_bytes
        )
        code, _ = await self.store.resume_input(run_id, header.queue, form_json, new_input)
        return RunHandle(self._client, run_id) if code is Code.OK else None
