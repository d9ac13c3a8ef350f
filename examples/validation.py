"""Input validation: a pydantic model as a workflow's input_schema.

    python examples/validation.py      # needs pydantic: pip install -e '.[pydantic,embedded]'

See docs/validation.md. Valid input reaches the handler as a model instance; invalid input raises
InputValidationError before anything is written; a client without the definition cannot check the
input, so the worker does, and the run fails with kind "validation" without retries.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel

from redflow import (
    InputValidationError,
    RunFailedError,
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRegistry,
    create_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer


class Signup(BaseModel):
    email: str
    plan: Literal["free", "pro"] = "free"
    seats: int = 1


@workflow("create-account", input_schema=Signup)
async def create_account(ctx: WorkflowHandlerContext[Signup]) -> str:
    signup = ctx.input  # a Signup instance, not a dict
    return f"{signup.email} on {signup.plan} with {signup.seats} seat(s)"


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="validation", url=url))
    outsider = create_client(url=url)  # a service that does not import the workflow's code
    outsider.registry = WorkflowRegistry()
    try:
        handle = await create_account.run({"email": "ada@example.com", "seats": "3"})
        print("valid ->", await handle.result(timeout_ms=10_000))
        print("stored input:", (await client.get_run(handle.id) or {})["input"])

        runs_before = len(await client.list_runs())
        try:
            await create_account.run({"plan": "gold", "seats": "many"})
        except InputValidationError as exc:
            print("rejected:", sorted(issue["path"] for issue in exc.issues))
        print("runs written by the rejected call:", len(await client.list_runs()) - runs_before)

        remote = await outsider.run_by_name("create-account", {"email": 42})
        try:
            await remote.result(timeout_ms=10_000)
        except RunFailedError as exc:
            state = await client.get_run(remote.id) or {}
            print("by name, checked by the worker:", exc.error["kind"], "| attempts:", state["attempt"])
        meta = await client.get_workflow_meta("create-account") or {}
        print("published schema fields:", sorted(meta["input_json_schema"]["properties"]))
    finally:
        await outsider.close()
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
