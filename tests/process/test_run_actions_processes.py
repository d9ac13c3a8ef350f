"""Operator actions against real processes: an operator's bulk retry SIGKILLed in the middle of a batch
and resumed with its job id; retried runs whose workers are SIGKILLed (taken back by the leader, failed
as crashed, their on_failure hook run once per failure).

Tests marked ``xfail(strict=True)`` reproduce a bug; their reason names it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from redflow import RedflowClient
from redflow.encoding import decode
from redflow.errors import InvalidRunStateError

from ..conftest import wait_until
from .actions_apps import BULK_QUERY
from .actions_apps import registry as app_registry
from .conftest import ROOT, counter

pytestmark = pytest.mark.timeout(120)

Popen = subprocess.Popen[str]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "REDIS_URL"}


@pytest.fixture
def procs() -> Iterator[list[Popen]]:
    started: list[Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def spawn(redis_url: str, prefix: str, procs: list[Popen]) -> Callable[..., Popen]:
    def start(queues: str = "doomed", lease_ms: int = 1000) -> Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.process.actions_apps", "worker", redis_url, prefix, queues, str(lease_ms)],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"worker did not start: {line!r}"
        return proc

    return start


@pytest.fixture
def bulk(redis_url: str, prefix: str, procs: list[Popen]) -> Callable[..., Popen]:
    def start(job_id: str, batch: int, kill_after: int) -> Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.process.actions_apps", "bulk", redis_url, prefix, job_id, str(batch),
             str(kill_after)],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        return proc

    return start


@pytest.fixture
def apps_client(client: RedflowClient) -> RedflowClient:
    client.registry = app_registry
    return client


async def _status(client: RedflowClient, run_id: str) -> str | None:
    state = await client.get_run(run_id)
    return None if state is None else state["status"]


async def _statuses(client: RedflowClient, ids: list[str]) -> list[str | None]:
    return [await _status(client, i) for i in ids]


async def _attempts(client: RedflowClient, run_id: str) -> list[tuple[int, str]]:
    return [(a["attempt"], a["status"]) for a in await client.get_run_attempts(run_id)]


async def _all_failed(client: RedflowClient, ids: list[str]) -> bool:
    return set(await _statuses(client, ids)) == {"failed"}


async def _failed_runs(client: RedflowClient, make_worker: Any, n: int) -> tuple[list[str], Any]:
    """n failed runs of act-proc-fail, and the in-process worker that failed them (still running)."""
    ids = [(await client.run_by_name("act-proc-fail", i)).id for i in range(n)]
    worker = await make_worker(registry=app_registry, queues=["default"], concurrency=20)
    await wait_until(lambda: _all_failed(client, ids), timeout_s=30, what="every run fails")
    return ids, worker


async def _killed(proc: Popen) -> None:
    await wait_until(lambda: proc.poll() is not None, timeout_s=30, what="the bulk process dies")
    assert proc.returncode == -signal.SIGKILL, proc.returncode


# --- bulk retry killed mid-batch ----------------------------------------------------------------------------


async def test_bulk_retry_sigkilled_mid_batch_then_resumed_retries_every_run_once(
    apps_client: RedflowClient, make_worker: Any, bulk: Callable[..., Popen]
) -> None:
    client = apps_client
    ids, worker = await _failed_runs(client, make_worker, 50)
    await worker.stop()  # no worker runs while the bulk job runs: retried runs stay queued

    proc = bulk("killed-job", 10, 15)  # dies when the 15th retry (5th of the second batch) answers
    await _killed(proc)
    saved = decode(await client.store.read_bulk_job("killed-job") or b"{}")
    assert saved["done"] == 10 and not saved.get("finished")  # only the first batch was saved
    queued = [i for i, s in zip(ids, await _statuses(client, ids), strict=True) if s == "queued"]
    assert 15 <= len(queued) <= 20, len(queued)

    resumed = await client.retry_runs(BULK_QUERY, job_id="killed-job")  # type: ignore[arg-type]
    assert resumed["finished"]
    assert set(await _statuses(client, ids)) == {"queued"}
    for run_id in ids:
        state = await client.get_run(run_id)
        assert state is not None and state["max_attempts"] == 2, state  # one fresh budget, not two
    await make_worker(registry=app_registry, queues=["default"], concurrency=20)
    await wait_until(lambda: _all_failed(client, ids), timeout_s=30, what="every retried run fails again")
    for run_id in ids:
        assert await _attempts(client, run_id) == [(1, "failed"), (2, "failed")], run_id


async def test_bulk_retry_resumed_after_sigkill_does_not_retry_twice_runs_that_failed_again(
    apps_client: RedflowClient, make_worker: Any, bulk: Callable[..., Popen]
) -> None:
    client = apps_client
    ids, _ = await _failed_runs(client, make_worker, 40)  # the worker keeps running: retried runs fail at once
    proc = bulk("killed-job", 10, 15)
    await _killed(proc)
    await wait_until(lambda: _all_failed(client, ids), timeout_s=30, what="the retried runs fail again")
    once = [i for i in ids if await _attempts(client, i) == [(1, "failed"), (2, "failed")]]
    assert len(once) >= 15

    resumed = await client.retry_runs(BULK_QUERY, job_id="killed-job")  # type: ignore[arg-type]
    assert resumed["finished"]
    await wait_until(lambda: _all_failed(client, ids), timeout_s=30, what="every run failed again")
    twice = [i for i in ids if len(await _attempts(client, i)) > 2]
    assert twice == [], f"{len(twice)} runs were retried twice by one bulk job"


# --- retried runs whose workers die --------------------------------------------------------------------------


async def test_a_retried_run_whose_worker_is_sigkilled_resumes_on_the_same_attempt(
    apps_client: RedflowClient, make_worker: Any, spawn: Callable[..., Popen]
) -> None:
    client = apps_client
    # Leadership is held elsewhere until the dead worker has been looked at.
    await client.redis.execute("SET", client.keys.leader, "elsewhere:1", "PX", 60_000)
    await make_worker(registry=app_registry, queues=[], lease_ms=1000)  # leader duties only
    first = spawn()
    handle = await client.run_by_name("act-proc-kill-on-retry", None)
    await wait_until(lambda: _is(client, handle.id, "failed"), timeout_s=20, what="the first attempt fails")
    assert first.poll() is None

    await client.retry_run(handle.id)
    await wait_until(lambda: first.poll() is not None, timeout_s=20, what="the retried attempt kills its worker")
    lost = await wait_until(lambda: _reason(client, handle.id, "worker_lost"), timeout_s=10, what="worker_lost")
    assert lost["details"]["attempt"] == 2
    with pytest.raises(InvalidRunStateError, match="is running"):
        await client.retry_run(handle.id)
    await client.redis.execute("DEL", client.keys.leader)  # the in-process worker leads and takes it back
    await wait_until(lambda: _is(client, handle.id, "queued"), timeout_s=20, what="the leader requeues it")
    with pytest.raises(InvalidRunStateError, match="is queued"):
        await client.retry_run(handle.id)

    second = spawn()
    result = await handle.result(timeout_ms=30_000)
    assert result == {"attempt": 2, "pid": second.pid}
    counts = {s: await counter(client, f"{s}:{handle.id}") for s in ("a", "b", "c", "killpoint")}
    assert counts == {"a": 1, "b": 2, "c": 1, "killpoint": 2}  # no recorded step ran twice
    assert await _attempts(client, handle.id) == [(1, "failed"), (2, "succeeded")]
    state = await client.get_run(handle.id)
    assert state is not None and state["attempt"] == 2 and state["max_attempts"] == 4  # 1 used + a fresh 3


async def test_a_crashed_run_retried_gets_a_fresh_lapse_budget_and_one_hook_per_failure(
    apps_client: RedflowClient, make_worker: Any, spawn: Callable[..., Popen]
) -> None:
    client = apps_client
    await make_worker(registry=app_registry, queues=[], lease_ms=1000, max_recoveries=2)  # the reaper
    handle = await client.run_by_name("act-proc-kill-always", None)

    async def lapse(expect_crash: bool) -> None:
        proc = spawn()
        await wait_until(lambda: proc.poll() is not None, timeout_s=20, what="the run kills its worker")
        if expect_crash:
            await wait_until(lambda: _hook_pending(client, handle.id), timeout_s=20, what="it fails as crashed")
        else:
            await wait_until(lambda: _is(client, handle.id, "queued"), timeout_s=20, what="the leader requeues it")

    async def run_hook() -> Popen:
        proc = spawn()  # only the hook is due: this worker survives it
        await wait_until(lambda: _reason(client, handle.id, "ended"), timeout_s=20, what="the hook ran")
        return proc

    await lapse(expect_crash=False)
    await lapse(expect_crash=True)  # the 2nd consecutive lapse of attempt 1
    with pytest.raises(InvalidRunStateError, match="on_failure hook has not finished"):
        await client.retry_run(handle.id)
    survivor = await run_hook()
    assert await counter(client, f"hook:{handle.id}") == 1
    assert await counter(client, f"hook:{handle.id}:crashed") == 1

    await client.retry_run(handle.id)  # the hook's worker claims it and dies: the first lapse after the retry
    await wait_until(lambda: survivor.poll() is not None, timeout_s=20, what="the retried run kills its worker")
    # a fresh lapse budget: had the lapse count of attempt 1 been kept, this lapse would be a crash
    await wait_until(lambda: _is(client, handle.id, "queued"), timeout_s=20, what="the leader requeues it")
    await lapse(expect_crash=True)
    await run_hook()
    assert await counter(client, f"kill:{handle.id}") == 4
    assert await counter(client, f"hook:{handle.id}") == 2  # once per failure
    attempts = await client.get_run_attempts(handle.id)
    assert [(a["attempt"], a["status"], (a["error"] or {}).get("kind")) for a in attempts] == [
        (1, "failed", "crashed"), (2, "failed", "crashed")]


async def _is(client: RedflowClient, run_id: str, status: str) -> bool:
    return await _status(client, run_id) == status


async def _reason(client: RedflowClient, run_id: str, reason: str) -> Any:
    explained = await client.explain_run(run_id)
    return explained if explained["reason"] == reason else None


async def _hook_pending(client: RedflowClient, run_id: str) -> bool:
    return bool(await _reason(client, run_id, "hook_pending"))
