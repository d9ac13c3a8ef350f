"""Start a few ``process-order`` runs against a running deployment and print their results.

    docker compose --profile demo run --rm enqueue            # inside the compose project
    REDIS_URL=redis://127.0.0.1:6379 python examples/compose_app/enqueue.py 5

It starts runs by name, so it needs no import of the workflow module: a worker has published the
workflow's queue and retry settings when it started.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from redflow import create_client


async def main(count: int) -> int:
    client = create_client()  # REDIS_URL and REDFLOW_PREFIX from the environment
    try:
        handles = []
        for n in range(count):
            order_id = f"order-{uuid.uuid4().hex[:8]}"
            order = {
                "order_id": order_id,
                "email": f"customer{n}@example.com",
                "items": [{"sku": "tea", "qty": n + 1, "price_cents": 450}],
            }
            handles.append(await client.run_by_name("process-order", order, idempotency_key=order_id))
        for handle in handles:
            print(handle.id, await handle.result(timeout_ms=60_000), flush=True)
    finally:
        await client.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
