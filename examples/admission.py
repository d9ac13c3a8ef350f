"""Admission control: max_concurrency, a mutex per key, and a rate limit.

    python examples/admission.py

See docs/admission.md. One worker with 10 slots runs all three workflows.
"""

from __future__ import annotations

import asyncio

from redflow import (
    RunFailedError,
    StartWorkerOptions,
    WorkflowHandlerContext,
    WorkflowRateLimitOptions,
    create_client,
    set_default_client,
    start_worker,
    workflow,
)
from redflow.embedded import EmbeddedServer

running: dict[str, int] = {"report": 0, "api": 0, "web": 0}
peak: dict[str, int] = {"report": 0, "api": 0, "web": 0}
beside: list[bool] = []  # per deploy: a web deploy started while an api deploy was running
hooks: asyncio.Queue[str] = asyncio.Queue()  # error kinds seen by on_failure


async def busy(label: str) -> None:
    running[label] += 1
    peak[label] = max(peak[label], running[label])
    await asyncio.sleep(0.1)
    running[label] -= 1


@workflow("build-report", max_concurrency=2)  # at most 2 running, across all workers
async def build_report(ctx: WorkflowHandlerContext[int]) -> int:
    await busy("report")
    return ctx.input


@workflow("deploy", mutex=lambda i: i["service"])  # one running deploy per service
async def deploy(ctx: WorkflowHandlerContext[dict[str, str]]) -> str:
    beside.append(ctx.input["service"] == "web" and running["api"] > 0)
    await busy(ctx.input["service"])
    return ctx.input["service"]


@workflow("send-sms", on_failure=lambda ctx: hooks.put_nowait(ctx.error.kind),
          rate_limit=WorkflowRateLimitOptions(key=lambda i: i["user"], limit=2, period="1m"))
async def send_sms(ctx: WorkflowHandlerContext[dict[str, str]]) -> str:
    return f"sent {ctx.input['text']}"


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="admission", url=url, concurrency=10))
    try:
        reports = [await build_report.run(n) for n in range(6)]
        print("reports:", [await h.result(timeout_ms=10_000) for h in reports], "| peak running:", peak["report"])
        deploys = [await deploy.run({"service": s}) for s in ("api", "api", "api", "web")]
        print("deployed:", [await h.result(timeout_ms=10_000) for h in deploys], "| peak api deploys:", peak["api"])
        print("web ran beside an api deploy:", any(beside))
        for text in ("one", "two", "three"):
            try:
                print(" ", await (await send_sms.run({"user": "ada", "text": text})).result(timeout_ms=10_000))
            except RunFailedError as exc:
                print("  third sms:", exc.error["kind"], "| retryAfterMs > 0:", exc.error["retryAfterMs"] > 0)
        print("on_failure got:", await asyncio.wait_for(hooks.get(), 5), "| more calls:", hooks.qsize())
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
