"""``python -m bench``: redflow's scenarios and the baselines, interleaved, median of the repetitions."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import ceiling, server, snapshot
from .baselines_runner import BASELINES, Baseline, DriverParams, drain_n, prepare, run_driver, selected_scenarios
from .redflow_scenarios import SCENARIOS as BASE_SCENARIOS
from .redflow_scenarios import Params, Scenarios
from .report import Results
from .step_history import EXTRA_SCENARIOS as STEP_SCENARIOS
from .timers import EXTRA_SCENARIOS as TIMER_SCENARIOS

EXTRA_SCENARIOS = {**STEP_SCENARIOS, **TIMER_SCENARIOS}
SCENARIOS = (*BASE_SCENARIOS, *EXTRA_SCENARIOS)  # the extra ones are functions of a Scenarios object

QUICK = Params(n=3000, serial_n=1000, batched_n=5000, latency_n=200, latency_budget_s=10.0, idle_s=5.0,
               cleanup_n=20_000)
FULL = Params(n=10000, serial_n=5000, batched_n=20000, latency_n=1000, latency_budget_s=60.0, idle_s=30.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller N: a run of a few minutes")
    p.add_argument("--url", help="use this server (never flushed; keys under unique prefixes)")
    p.add_argument("--redis-server", metavar="PATH", help="server binary to start (default: embedded Valkey)")
    p.add_argument("--only", help="comma-separated scenario and/or system names: "
                   f"{','.join(SCENARIOS)}; redflow,{','.join(b.name for b in BASELINES)}")
    p.add_argument("--no-baselines", action="store_true", help="measure redflow alone")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    p.add_argument("--n", type=int, help="runs per drain (overrides the mode's default)")
    p.add_argument("--serial-n", type=int)
    p.add_argument("--batched-n", type=int)
    p.add_argument("--latency-n", type=int)
    p.add_argument("--idle-s", type=float)
    p.add_argument("--cleanup-n", type=int, help="expired runs the retention-cleanup scenario deletes")
    p.add_argument("--timers-n", type=int, help="delayed runs and sleeping runs of the timers scenario")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="results folder")
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def select(only: str | None, no_baselines: bool) -> tuple[set[str] | None, bool, list[Baseline]]:
    """(redflow scenarios or None for all, run redflow?, baselines) from --only and --no-baselines."""
    names = {x.strip() for x in only.split(",") if x.strip()} if only else set()
    systems = {"redflow", *(b.name for b in BASELINES)}
    unknown = names - systems - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"--only: unknown names {sorted(unknown)}")
    chosen_systems = names & systems
    scenarios = (names & set(SCENARIOS)) or None
    run_ours = not chosen_systems or "redflow" in chosen_systems
    baselines = [] if no_baselines else [b for b in BASELINES if not chosen_systems or b.name in chosen_systems]
    return scenarios, run_ours, baselines


async def run(args: argparse.Namespace) -> Results:
    started = time.monotonic()
    params = QUICK if args.quick else FULL
    for name in ("n", "serial_n", "batched_n", "latency_n", "idle_s", "cleanup_n", "timers_n"):
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    scenarios, run_ours, baselines = select(args.only, args.no_baselines)
    frozen = snapshot.state()
    if frozen:
        sha, dirty = str(frozen["git_sha"]), bool(frozen["dirty"])
    else:  # imported without bench/__main__.py: the code may change during the run
        sha, dirty = snapshot.git_state()
    venvs = prepare(baselines, log=lambda msg: print(msg, flush=True))
    with server.BenchServer(args.url, args.redis_server) as srv:
        redis = server.connect(srv.url)
        version = await server.server_version(redis)
        await redis.close()
        meta: dict[str, Any] = {
            "git_sha": sha, "dirty": dirty, "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "quick": args.quick, "repetitions": args.reps, "params": vars(params),
            "command": "python -m bench " + shlex.join(sys.argv[1:]), "server": srv.describe(),
            "server_version": version, "machine": machine(),
            "src_digest": frozen.get("src_digest", ""), "frozen_src": bool(frozen),
        }
        results = Results(args.reps, meta)
        ours = results.system("redflow", "redflow (this tree, concurrency 100)")
        ours.version, ours.n = f"{sha[:12]}{' (dirty)' if dirty else ''}", params.n
        ours.settings = "worker concurrency 100 in a subprocess, asyncio loop, hiredis"
        for b in baselines:
            info = results.system(b.name, b.label)
            info.n = drain_n(b, params.n)
            venv = venvs[b.venv]
            info.version = venv.version
            if not venv.ok:
                info.errors.append(f"install failed: {venv.error}")
        our_list = [s for s in SCENARIOS if scenarios is None or s in scenarios] if run_ours else []
        dparams = DriverParams(params.n, params.serial_n, params.latency_n, params.latency_budget_s, params.idle_s)
        for rep in range(args.reps):
            print(f"== repetition {rep + 1}/{args.reps}", flush=True)
            if our_list:
                await run_ours_rep(Scenarios(srv.url, params), our_list, results, rep)
            for b in baselines:
                venv = venvs[b.venv]
                chosen = selected_scenarios(b, scenarios)
                if not venv.ok or not chosen:
                    continue
                t = time.monotonic()
                try:
                    metrics, errors, settings = await run_driver(b, venv, srv.url, chosen, dparams, timeout_s=900)
                except Exception as exc:
                    metrics, errors, settings = {}, {"driver": f"{type(exc).__name__}: {exc}"}, ""
                info = results.systems[b.name]
                info.settings = settings or info.settings
                info.errors += [f"rep {rep + 1}, {k}: {v}" for k, v in errors.items()]
                results.add(b.name, rep, metrics)
                print(f"   {b.name}: {len(metrics)} metrics in {time.monotonic() - t:.1f}s"
                      + (f", errors: {errors}" if errors else ""), flush=True)
    results.meta["wall_seconds"] = time.monotonic() - started
    results.meta["git_sha_at_end"] = snapshot.git_state()[0]
    return results


async def run_ours_rep(sc: Scenarios, names: list[str], results: Results, rep: int) -> None:
    for name in names:
        t = time.monotonic()
        try:
            metrics = await (EXTRA_SCENARIOS[name](sc) if name in EXTRA_SCENARIOS else getattr(sc, name)())
        except Exception as exc:
            results.systems["redflow"].errors.append(f"rep {rep + 1}, {name}: {type(exc).__name__}: {exc}")
            print(f"   redflow {name}: FAILED {exc}", flush=True)
            continue
        results.add("redflow", rep, metrics)
        print(f"   redflow {name}: {time.monotonic() - t:.1f}s", flush=True)
    # Throughputs as fractions of this repetition's ceiling, latencies as multiples of its EVALSHA round trip.
    results.add("redflow", rep, ceiling.relative_metrics(ceiling.rep_metrics(results.samples, "redflow", rep)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    paths = results.write(Path(args.out))
    print()
    print(results.own_table())
    print()
    if any(name != "redflow" for name in results.systems):
        print(results.comparison_table())
        print()
    print(results.systems_table())
    print()
    print("wrote " + ", ".join(str(p) for p in paths))
    print(f"wall time {results.meta['wall_seconds']:.1f} s")
    failed = results.systems["redflow"].errors
    return 1 if failed else 0
