"""Run streams: a workflow writes tokens as it works; a client reads them live.

    python examples/streams.py

See docs/streams.md. A live reader prints the first tokens, stops, and a second reader resumes from
the last cursor it saw; once the run has ended, get_run_stream returns every value at once.
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

WORDS = "durable workflows can stream their progress".split()


@workflow("write-answer", stream=True)
async def write_answer(ctx: WorkflowHandlerContext[None]) -> str:
    stream = ctx.stream
    assert stream is not None  # set for workflows defined with stream=True

    async def generate() -> str:  # inside a step: a replay of the handler does not stream it again
        for word in WORDS:
            await stream.write({"token": word})
            await asyncio.sleep(0.05)
        return " ".join(WORDS)

    return str(await ctx.step.run("generate", generate))


async def main(url: str) -> None:
    client = create_client(url=url)
    set_default_client(client)
    worker = await start_worker(StartWorkerOptions(app="streams", url=url))
    try:
        handle = await write_answer.run()
        reader = await client.read_stream(handle.id, block_ms=1_000)
        assert reader is not None  # None only when the run does not exist
        first: list[str] = []
        cursor = None
        async for chunk in reader:
            first.append(chunk.record["value"]["token"])
            cursor = chunk.cursor_id
            if len(first) == 3:
                break
        await reader.aclose()  # a live reader holds a connection of its own until closed
        print("live, first reader:", " ".join(first))

        resumed = await client.read_stream(handle.id, resumable=cursor, block_ms=1_000)
        assert resumed is not None
        rest = [chunk.record["value"]["token"] async for chunk in resumed]  # ends when the run ends
        print("live, resumed reader:", " ".join(rest))
        print("result:", await handle.result(timeout_ms=10_000))
        records = await client.get_run_stream(handle.id)
        print("whole stream:", len(records), "values, attempts", sorted({r["attempt"] for r in records}))
    finally:
        await worker.stop()
        await client.close()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        asyncio.run(main(server.url))
