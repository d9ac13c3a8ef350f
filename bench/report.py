"""Collected samples -> medians, spreads, ratios; written as JSON and Markdown."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# metric -> (unit, which way is better, description)
METRICS: dict[str, tuple[str, str, str]] = {
    "enqueue_serial_per_s": ("runs/s", "higher", "serial enqueue (await each)"),
    "enqueue_batched_per_s": ("runs/s", "higher", "batched enqueue (gather chunks)"),
    "enqueue_many_per_s": ("runs/s", "higher", "batched enqueue path (enqueue_many, 1 command per 1000 runs)"),
    "enqueue_client_cmds_per_run": ("cmds", "lower", "client commands per enqueue"),
    "ceiling_per_s": ("runs/s", "higher", "minimal-lifecycle ceiling (bench/ceiling.py), drain"),
    "ceiling_seconds": ("s", "lower", "ceiling drain time (median round)"),
    "ceiling_rounds": ("rounds", "higher", "ceiling rounds per repetition"),
    "evalsha_rtt_p50_ms": ("ms", "lower", "EVALSHA round trip p50, idle asyncio connection (redflow's)"),
    "evalsha_socket_p50_ms": ("ms", "lower", "EVALSHA round trip p50, idle blocking socket"),
    "ceiling_server_cpu_us_per_run": ("µs", "lower", "ceiling: server CPU per run (INFO cpu)"),
    "ceiling_server_cmd_us_per_run": ("µs", "lower", "ceiling: server time in commands per run (commandstats)"),
    "ceiling_server_nested_us_per_run": ("µs", "lower", "ceiling: of which in commands run by scripts"),
    "ceiling_worker_cpu_us_per_run": ("µs", "lower", "ceiling: probe process CPU per run"),
    "drain_per_s": ("runs/s", "higher", "drain, echo workflow"),
    "drain_3step_per_s": ("runs/s", "higher", "drain, 3-step workflow"),
    "drain_seconds": ("s", "lower", "drain time, echo"),
    "drain_3step_seconds": ("s", "lower", "drain time, 3-step"),
    "latency_p50_ms": ("ms", "lower", "enqueue->result p50, light load"),
    "latency_p99_ms": ("ms", "lower", "enqueue->result p99, light load"),
    "latency_mean_ms": ("ms", "lower", "enqueue->result mean"),
    "latency_samples": ("samples", "higher", "latency samples taken"),
    "latency_missed_wakeups": ("waits", "lower", "result waits that missed their wake-up (2 s stall)"),
    "server_cpu_us_per_run": ("µs", "lower", "echo drain: server CPU per run (INFO cpu)"),
    "server_cmd_us_per_run": ("µs", "lower", "echo drain: server time in commands per run (commandstats)"),
    "server_nested_us_per_run": ("µs", "lower", "echo drain: of which in commands run by scripts"),
    "worker_cpu_us_per_run": ("µs", "lower", "echo drain: worker process CPU per run"),
    "server_3step_cpu_us_per_run": ("µs", "lower", "3-step drain: server CPU per run (INFO cpu)"),
    "server_3step_cmd_us_per_run": ("µs", "lower", "3-step drain: server time in commands per run"),
    "server_3step_nested_us_per_run": ("µs", "lower", "3-step drain: of which in commands run by scripts"),
    "worker_3step_cpu_us_per_run": ("µs", "lower", "3-step drain: worker process CPU per run"),
    "server_cmds_per_run": ("cmds", "lower", "server commands per finished run (commandstats)"),
    "server_3step_cmds_per_run": ("cmds", "lower", "server commands per finished 3-step run"),
    "enqueue_server_cmds_per_run": ("cmds", "lower", "server commands per enqueue (commandstats)"),
    "worker_cmds_per_run": ("cmds", "lower", "worker round-trip commands per run (own counters)"),
    "worker_3step_cmds_per_run": ("cmds", "lower", "worker commands per 3-step run"),
    "worker_writes_per_run": ("writes", "lower", "worker socket writes per run"),
    "worker_3step_writes_per_run": ("writes", "lower", "worker socket writes per 3-step run"),
    "bytes_per_run": ("bytes", "lower", "memory per finished run"),
    "idle_cmds_per_s": ("cmds/s", "lower", "idle worker load"),
    "sleep_lateness_p50_ms": ("ms", "lower", "durable sleep wake-up lateness p50 (50 sleeps)"),
    "sleep_lateness_max_ms": ("ms", "lower", "durable sleep wake-up lateness max"),
    "cancel_latency_p50_ms": ("ms", "lower", "cancel of a running run, cancel_run() to CanceledError, p50"),
    "fanout_10_ms": ("ms", "lower", "one event to 10 subscribers, emit to all 10 finished, median"),
    "cleanup_runs_per_s": ("runs/s", "higher", "retention cleanup of expired runs"),
    "supervisor_procs1_drain_per_s": ("runs/s", "higher", "drain via the supervisor, --procs 1 (info)"),
    "supervisor_procs2_drain_per_s": ("runs/s", "higher", "drain via the supervisor, --procs 2 (info)"),
    "evalsha_serial_per_s": ("ops/s", "higher", "EVALSHA, raw socket, 1 in flight"),
    "evalsha_16_per_s": ("ops/s", "higher", "EVALSHA, raw socket, 16 in flight"),
    "evalsha_p50_ms": ("ms", "lower", "EVALSHA round trip p50, raw socket"),
    "redispy_evalsha_serial_per_s": ("ops/s", "higher", "EVALSHA, redis-py asyncio, 1 in flight"),
    "redispy_evalsha_16_per_s": ("ops/s", "higher", "EVALSHA, redis-py asyncio, 16 in flight"),
}

# (redflow metric, baseline metric): compared against every system that has the baseline metric
SAME_METRIC = (
    "drain_per_s", "drain_3step_per_s", "enqueue_serial_per_s", "latency_p50_ms", "latency_p99_ms",
    "server_cmds_per_run", "bytes_per_run", "idle_cmds_per_s",
)
CEILING = (
    ("enqueue_serial_per_s", "evalsha_serial_per_s"),
    ("drain_per_s", "evalsha_16_per_s"),
    ("latency_p50_ms", "evalsha_p50_ms"),
)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.2g}"


@dataclass
class SystemInfo:
    name: str
    label: str
    version: str = ""
    settings: str = ""
    n: int = 0
    errors: list[str] = field(default_factory=list)


class Results:
    def __init__(self, reps: int, meta: dict[str, Any]) -> None:
        self.reps = reps
        self.meta = meta
        self.systems: dict[str, SystemInfo] = {}
        self.samples: dict[tuple[str, str], dict[int, float]] = {}

    def system(self, name: str, label: str) -> SystemInfo:
        return self.systems.setdefault(name, SystemInfo(name, label))

    def add(self, system: str, rep: int, metrics: dict[str, float]) -> None:
        for metric, value in metrics.items():
            self.samples.setdefault((system, metric), {})[rep] = float(value)

    def median(self, system: str, metric: str) -> float | None:
        values = list(self.samples.get((system, metric), {}).values())
        return statistics.median(values) if values else None

    def series(self) -> list[dict[str, Any]]:
        out = []
        for (system, metric), by_rep in self.samples.items():
            values = [by_rep[r] for r in sorted(by_rep)]
            unit, better, what = METRICS.get(metric, ("", "", metric))
            out.append({
                "system": system, "metric": metric, "what": what, "unit": unit, "better": better,
                "n": self.systems[system].n, "repetitions": len(values), "samples": values,
                "median": statistics.median(values), "min": min(values), "max": max(values),
                "git_sha": self.meta["git_sha"], "dirty": self.meta["dirty"],
            })
        return out

    def ratios(self) -> list[dict[str, Any]]:
        out = []
        for name in self.systems:
            if name == "redflow":
                continue
            pairs = [(m, m) for m in SAME_METRIC] + list(CEILING)
            for ours, theirs in pairs:
                a = self.samples.get(("redflow", ours), {})
                b = self.samples.get((name, theirs), {})
                if not a or not b:
                    continue
                ma, mb = statistics.median(a.values()), statistics.median(b.values())
                paired = [a[r] / b[r] for r in a if b.get(r)]
                unit, better, _ = METRICS[ours]
                out.append({
                    "metric": ours, "baseline": name, "baseline_metric": theirs, "unit": unit, "better": better,
                    "redflow_median": ma, "baseline_median": mb,
                    "baseline_min": min(b.values()), "baseline_max": max(b.values()),
                    "ratio": ma / mb if mb else None,
                    "paired_min": min(paired) if paired else None, "paired_max": max(paired) if paired else None,
                    "git_sha": self.meta["git_sha"], "dirty": self.meta["dirty"], "repetitions": len(a),
                })
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "systems": {k: vars(v) for k, v in self.systems.items()},
            "results": self.series(),
            "ratios": self.ratios(),
        }

    # --- Markdown ------------------------------------------------------------------------------------
    def own_table(self) -> str:
        rows = ["| metric | unit | median | min | max | N | reps |", "|---|---|---:|---:|---:|---:|---:|"]
        for s in sorted((x for x in self.series() if x["system"] == "redflow"), key=lambda x: _order(x["metric"])):
            rows.append(
                f"| {s['what']} | {s['unit']} | {fmt(s['median'])} | {fmt(s['min'])} | {fmt(s['max'])} "
                f"| {s['n']} | {s['repetitions']} |"
            )
        return "\n".join(rows)

    def comparison_table(self) -> str:
        rows = [
            "| metric | baseline | baseline median [min–max] | redflow median | redflow / baseline "
            "[per-rep range] | better |",
            "|---|---|---:|---:|---:|---|",
        ]
        for r in sorted(self.ratios(), key=lambda x: (_order(x["metric"]), x["baseline"])):
            label = self.systems[r["baseline"]].label
            what = METRICS[r["metric"]][2]
            if r["metric"] != r["baseline_metric"]:
                what += f" vs {r['baseline_metric']}"
            spread = f" [{fmt(r['paired_min'])}–{fmt(r['paired_max'])}]" if r["paired_min"] is not None else ""
            rows.append(
                f"| {what} ({r['unit']}) | {label} | {fmt(r['baseline_median'])} "
                f"[{fmt(r['baseline_min'])}–{fmt(r['baseline_max'])}] | {fmt(r['redflow_median'])} "
                f"| **{fmt(r['ratio'])}×**{spread} | {r['better']} |"
            )
        return "\n".join(rows)

    def systems_table(self) -> str:
        rows = ["| system | version | settings | N (drain) | problems |", "|---|---|---|---:|---|"]
        for s in self.systems.values():
            problems = "; ".join(dict.fromkeys(s.errors)) or "-"
            rows.append(f"| {s.label} | {s.version or '-'} | {s.settings or '-'} | {s.n} | {problems} |")
        return "\n".join(rows)

    def baseline_table(self) -> str:
        rows = ["| system | metric | median | min | max |", "|---|---|---:|---:|---:|"]
        for s in sorted(self.series(), key=lambda x: (x["system"], _order(x["metric"]))):
            if s["system"] != "redflow":
                label = self.systems[s["system"]].label
                rows.append(f"| {label} | {s['what']} ({s['unit']}) | {fmt(s['median'])} | {fmt(s['min'])} "
                            f"| {fmt(s['max'])} |")
        return "\n".join(rows)

    def markdown(self) -> str:
        m = self.meta
        lines = [
            "# redflow benchmark results",
            "",
            f"- git {m['git_sha'][:12]}{' (dirty)' if m['dirty'] else ''}, {m['timestamp']}, "
            f"mode {'quick' if m['quick'] else 'full'}, {m['repetitions']} repetitions (interleaved), "
            f"wall time {m.get('wall_seconds', 0):.0f} s",
            f"- machine: {m['machine']['nproc']} cores, {m['machine']['cpu']}, Python {m['machine']['python']}, "
            f"{m['server_version']} ({m['server']})",
            f"- command: `{m['command']}`",
            f"- code under test: src/redflow copied at start (digest {m.get('src_digest') or '-'})"
            + (f"; HEAD moved to {m['git_sha_at_end'][:12]} during the run"
               if m.get("git_sha_at_end", m["git_sha"]) != m["git_sha"] else ""),
            "",
            "## redflow",
            "",
            self.own_table(),
            "",
            "## redflow / baseline",
            "",
            "Ratio of medians; the range is the min–max of the per-repetition ratios (each repetition runs every",
            "system back to back). For `higher` metrics a ratio above 1 favours redflow, for `lower` below 1.",
            "",
            self.comparison_table(),
            "",
            "## Systems",
            "",
            self.systems_table(),
            "",
            "## Baseline measurements",
            "",
            self.baseline_table(),
            "",
        ]
        return "\n".join(lines)

    def write(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.to_json(), indent=2, sort_keys=False)
        stamp = self.meta["timestamp"].replace(":", "").replace("-", "")
        paths = [out_dir / "latest.json", out_dir / f"{stamp}.json", out_dir / "latest.md"]
        paths[0].write_text(data + "\n")
        paths[1].write_text(data + "\n")
        paths[2].write_text(self.markdown())
        return paths


# Derived metrics (bench/ceiling.py: <metric>_vs_ceiling, <metric>_vs_rtt) are listed right after their metric.
DERIVED_SUFFIXES = ("_vs_ceiling", "_vs_rtt", "_vs_socket_rtt")


def _order(metric: str) -> float:
    keys = list(METRICS)
    for k, suffix in enumerate(DERIVED_SUFFIXES):
        base = metric.removesuffix(suffix)
        if base != metric and base in keys:
            return keys.index(base) + (k + 1) / 10
    return keys.index(metric) if metric in keys else len(keys)
