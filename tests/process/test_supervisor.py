"""The supervisor as users run it: python -m redflow.supervisor, in subprocesses, against the test server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from redflow import RedflowClient
from redflow.embedded import free_port
from redflow.storage.index import index_prefixes

from ..conftest import wait_until
from .conftest import ROOT, counter
from .supervised import Start, _children, _fetch_text, _workers


async def test_procs_2_runs_work_in_both_processes(client: RedflowClient, start_supervisor: Start) -> None:
    sup = start_supervisor("--procs", "2", "--concurrency", "4")
    workers = await _workers(sup, 2)
    handles = [await client.run_by_name("sup-pid", {"sleep": 0.05}) for _ in range(60)]
    results = await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles))
    assert {r["pid"] for r in results} == {w.pid for w in workers}  # both processes did work
    for h in handles:
        assert await counter(client, f"body:{h.id}") == 1  # the import-time client works in every worker
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0


async def test_sigkilled_worker_is_restarted_and_its_runs_complete(
    client: RedflowClient, start_supervisor: Start
) -> None:
    sup = start_supervisor("--procs", "1", "--concurrency", "10")
    (worker,) = await _workers(sup, 1)
    handles = [await client.run_by_name("sup-pid", {"sleep": 1.0}) for _ in range(5)]
    await wait_until(lambda: _running(client, handles), timeout_s=20, what="runs in flight")
    worker.kill()
    results = await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles))
    (replacement,) = await _workers(sup, 1)
    assert replacement.pid != worker.pid
    assert {r["pid"] for r in results} == {replacement.pid}
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0


async def test_sigterm_under_load_drains_and_exits_zero(client: RedflowClient, start_supervisor: Start) -> None:
    sup = start_supervisor("--procs", "2", "--concurrency", "5", "--grace-period", "10")
    await _workers(sup, 2)
    handles = [await client.run_by_name("sup-pid", {"sleep": 0.3}) for _ in range(40)]
    await wait_until(lambda: _running(client, handles), timeout_s=20, what="runs in flight")
    started = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=20) == 0
    assert time.monotonic() - started < 10 + 5
    # Nothing was lost: whatever did not finish was handed back and completes on a new supervisor.
    start_supervisor("--procs", "1", "--concurrency", "10")
    results = await asyncio.gather(*(h.result(timeout_ms=30_000) for h in handles))
    assert len(results) == 40
    for h in handles:
        assert await counter(client, f"body:{h.id}") == 1


async def test_sigkilled_supervisor_leaves_no_worker_behind(start_supervisor: Start) -> None:
    sup = start_supervisor("--procs", "2")
    workers = await _workers(sup, 2)
    sup.kill()
    sup.wait()

    async def gone() -> bool:
        return not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)

    await wait_until(gone, timeout_s=15, what="workers to exit")


async def test_memory_budget_recycles_a_worker_without_losing_runs(
    client: RedflowClient, start_supervisor: Start
) -> None:
    sup = start_supervisor("--procs", "1", "--concurrency", "2", "--max-memory-mb", "60", "--grace-period", "5")
    (first,) = await _workers(sup, 1)
    handles = [await client.run_by_name("sup-hog", None) for _ in range(4)]
    assert await asyncio.gather(*(h.result(timeout_ms=40_000) for h in handles)) == [64 * 2**20] * 4
    await wait_until(lambda: first.pid not in [p.pid for p in _children(sup.pid)], timeout_s=20, what="recycle")
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0


async def test_http_health_readiness_and_metrics(client: RedflowClient, start_supervisor: Start) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    sup = start_supervisor("--procs", "2", "--http-port", str(port))
    await _workers(sup, 2)
    body = await wait_until(lambda: _get(port, "/readyz"), timeout_s=20, what="ready")
    assert body["ready"] is True and len(body["workers"]) == 2
    assert _get(port, "/healthz") == {"ok": True}
    handles = [await client.run_by_name("sup-pid", {"sleep": 0}) for _ in range(10)]
    await asyncio.gather(*(h.result(timeout_ms=20_000) for h in handles))

    async def scraped() -> dict | None:
        text = await asyncio.to_thread(_fetch_text, port, "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        # Every family the leader samples, not only the first of them (they land one round trip apart).
        sampled = ("redflow_queue_backlog", "redflow_queue_oldest_ready_age_seconds")
        return families if all(f in families and families[f].samples for f in sampled) else None

    families = await wait_until(scraped, timeout_s=20, what="leader's backlog sample")
    expected = {
        "redflow_runs", "redflow_run_duration_seconds", "redflow_step_duration_seconds", "redflow_queue_backlog",
        "redflow_queue_oldest_ready_age_seconds", "redflow_inflight_runs", "redflow_leader",
        "redflow_worker_restarts", "redflow_event_loop_lag_seconds", "redflow_redis_roundtrip_seconds",
        "redflow_worker_processes",
    }
    assert expected <= set(families), sorted(expected - set(families))
    runs = {(s.labels["workflow"], s.labels["outcome"]): s.value for s in families["redflow_runs"].samples
            if s.name == "redflow_runs_total"}
    assert runs[("sup-pid", "started")] == 10 and runs[("sup-pid", "succeeded")] == 10
    assert sum(s.value for s in families["redflow_leader"].samples) == 1
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0


async def test_two_supervisors_elect_one_leader_and_cron_survives_its_death(
    client: RedflowClient, start_supervisor: Start
) -> None:
    a = start_supervisor("--procs", "1", cron=True)
    b = start_supervisor("--procs", "1", cron=True)
    (wa,), (wb,) = await _workers(a, 1), await _workers(b, 1)
    leader_value = await wait_until(lambda: client.redis.execute("GET", client.keys.leader), what="a leader")
    await wait_until(lambda: _cron_runs(client, 2), timeout_s=20, what="cron firing")
    leader_pid = int(leader_value.decode().split(":")[1])
    assert leader_pid in (wa.pid, wb.pid)
    psutil.Process(leader_pid).kill()
    before = len(await _cron_runs(client, 0) or [])

    async def new_leader() -> bool:
        value = await client.redis.execute("GET", client.keys.leader)
        return value is not None and value != leader_value

    await wait_until(new_leader, timeout_s=20, what="takeover")
    await wait_until(lambda: _cron_runs(client, before + 3), timeout_s=20, what="cron after takeover")
    from redflow.ids import run_id_time_ms

    slots = [run_id_time_ms(r) for r in await _cron_runs(client, 0) or []]
    assert len(slots) == len(set(slots)), "a slot fired twice"


async def _cron_runs(client: RedflowClient, n: int) -> list[str] | None:
    ids = await client.store.index.merged_page(index_prefixes(None, "sup-tick"), None, 100_000, False)
    return ids if len(ids) >= n else None


def test_bad_options_and_failing_import_exit_nonzero_before_forking() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "redflow.supervisor", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=30, env={k: v for k, v in os.environ.items() if k != "REDIS_URL"})

    r = run("--import", "no_such_module_xyz")
    assert r.returncode == 2 and "cannot import workflow module 'no_such_module_xyz'" in r.stderr
    r = run("--import", "json", "--procs", "0")
    assert r.returncode == 2 and "--procs must be >= 1" in r.stderr
    r = run("--procs", "2")
    assert r.returncode == 2 and "--import" in r.stderr
    r = run("--import", "json", "--log-format", "xml")
    assert r.returncode == 2 and "--log-format" in r.stderr


async def _running(client: RedflowClient, handles: list) -> bool:
    states = [await client.get_run(h.id) for h in handles]
    return any(s and s["status"] == "running" for s in states)


def _get(port: int, path: str) -> dict | None:
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2).read())
    except Exception:
        return None


async def test_embedded_server_killed_and_restarted_keeps_a_scheduled_run(tmp_path, prefix: str) -> None:
    import re
    from datetime import datetime, timedelta

    from redflow import create_client

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDFLOW_TEST_REDIS_URL")}
    env.update(SUP_TEST_URL="redis://127.0.0.1:1", SUP_TEST_PREFIX=prefix)  # the import-time client stays unused
    sup = subprocess.Popen(  # noqa: ASYNC220 (started once, before any await)
        [sys.executable, "-m", "redflow.supervisor", "--import", "tests.process.sup_apps", "--prefix", prefix,
         "--procs", "1", "--data-dir", str(tmp_path / "data"), "--lease-ms", "1500"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert sup.stderr is not None
        url = None
        for line in sup.stderr:
            found = re.search(r"started embedded Valkey at (redis://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url is not None
        client = create_client(url=url, prefix=prefix)
        try:
            await wait_until(lambda: client.get_workflow_meta("sup-plain"), timeout_s=20, what="worker registered")
            handle = await client.run_by_name("sup-plain", {}, run_at=datetime.now() + timedelta(seconds=4))
            await asyncio.sleep(2)  # appendfsync everysec: let the enqueue reach the AOF on disk
            server = _embedded_servers(sup.pid)[0]
            server.kill()

            async def restarted() -> bool:
                kids = _embedded_servers(sup.pid)
                return bool(kids) and kids[0].pid != server.pid

            await wait_until(restarted, timeout_s=20, what="embedded server restarted")
            result = await wait_until(lambda: _result_or_none(client, handle.id), timeout_s=30, what="run done")
            assert "pid" in result
        finally:
            await client.close()
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
    finally:
        if sup.poll() is None:
            for child in _children(sup.pid):
                child.kill()
            sup.kill()
            sup.wait()
        if sup.stderr is not None:
            sup.stderr.close()


async def _result_or_none(client: RedflowClient, run_id: str) -> dict | None:
    try:
        state = await client.get_run(run_id)
    except Exception:
        return None  # the server is still coming back
    return state["output"] if state and state["status"] == "succeeded" else None


async def test_run_budget_recycles_a_worker_without_losing_runs(
    client: RedflowClient, start_supervisor: Start
) -> None:
    sup = start_supervisor("--procs", "1", "--concurrency", "2", "--max-runs-per-proc", "5", "--grace-period", "5")
    (first,) = await _workers(sup, 1)
    handles = [await client.run_by_name("sup-pid", {"sleep": 0.01}) for _ in range(12)]
    results = await asyncio.gather(*(h.result(timeout_ms=40_000) for h in handles))
    pids = {r["pid"] for r in results}
    assert first.pid in pids and len(pids) >= 2  # the first process was replaced after its budget
    for h in handles:
        assert await counter(client, f"body:{h.id}") == 1
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0


def _embedded_servers(pid: int) -> list[psutil.Process]:
    """The supervisor's embedded server processes; a child that exits while they are listed (a
    worker restarting, the killed server being reaped) is left out instead of failing the read."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if "valkey" in child.name():
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found
