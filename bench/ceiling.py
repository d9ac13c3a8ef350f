"""The minimal-lifecycle ceiling: what one Python process can drain through the same server and transport.

A probe written here, sharing none of redflow's engine code (only its connection class, for the transport):

- **enqueue** (not timed): ``N`` ids in a list ``ready``, ``id -> queued`` in a hash ``runs``, the JSON input
  ``{"i": i}`` in a hash ``inputs`` (the drain scenario's input);
- **claim** (one script call per batch of up to ``--batch`` runs, 100 like the bench worker's concurrency):
  ``LPOP ready <batch>``, one ``HSET runs id running ...`` for the batch, one ``HMGET inputs ...``; it
  returns the ids with their inputs;
- **run**: decode the input (msgspec, like redflow), ``await`` an async handler that returns it, encode the
  output;
- **finalize** (one script call per run, pipelined): refuse unless the run is ``running``, then
  ``HSET runs id succeeded`` and ``HSET outputs id <output>``; it returns 1, or 0 for a refusal.

The finalize calls of a batch and the next claim leave in one socket write (the connection pipelines every
command of a loop tick), so the drain costs one round trip per batch. No steps, no indexes, no leases, no
completion messages. The probe counts the finalize replies: every run must be finalized exactly once.

In ``python -m bench`` the ``ceiling`` scenario measures, in the harness process, the p50 round trip of
``EVALSHA`` of ``return 1`` on an idle connection (redflow's pipelined asyncio connection, and a blocking
socket with hand-written RESP), then starts this module as a subprocess (a fresh interpreter, like the
bench worker), which drains ``--rounds`` rounds of ``N`` runs and prints one ``RESULT <json>`` line: the
median round's rate and, per finished run, the server's CPU (INFO cpu), the server time in the commands it
sent (commandstats) and its own CPU (``time.process_time``). After every repetition the harness turns
redflow's throughputs into fractions of ``ceiling_per_s`` and its latencies into multiples of the round
trip (:func:`relative_metrics`).

``python -m bench.ceiling [--url URL] [--n N] [--rounds R]`` runs the probe alone and prints its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from redflow._redis.client import RedisClient, ServerAddress
from redflow._redis.connection import Connection

from . import report, server

CLAIM = b"""
local ids = redis.call('LPOP', KEYS[1], ARGV[1])
if not ids then return {} end
local marks, out = {}, {}
for i, id in ipairs(ids) do
  marks[2 * i - 1] = id
  marks[2 * i] = 'running'
end
redis.call('HSET', KEYS[2], unpack(marks))
local inputs = redis.call('HMGET', KEYS[3], unpack(ids))
for i, id in ipairs(ids) do
  out[2 * i - 1] = id
  out[2 * i] = inputs[i]
end
return out
"""

FINALIZE = b"""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'succeeded')
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

REPO = Path(__file__).resolve().parent.parent
PING_SCRIPT = b"return 1"
RTT_SAMPLES = 1000
RTT_WARMUP = 50

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


async def echo(value: Any) -> Any:
    return value


@dataclass
class Keys:
    ready: bytes
    runs: bytes
    inputs: bytes
    outputs: bytes

    @classmethod
    def under(cls, prefix: str) -> Keys:
        return cls(*(f"{prefix}:{name}".encode() for name in ("ready", "runs", "inputs", "outputs")))

    def all(self) -> tuple[bytes, ...]:
        return self.ready, self.runs, self.inputs, self.outputs


@dataclass
class Round:
    seconds: float
    finalized: int
    refused: int
    commands: Counter[str]  # what the probe sent while draining, by name


class Probe:
    def __init__(self, conn: Connection, prefix: str, batch: int = 100,
                 handler: Callable[[Any], Awaitable[Any]] = echo) -> None:
        self.conn = conn
        self.prefix = prefix
        self.batch = batch
        self.handler = handler
        self.claim_sha = b""
        self.finalize_sha = b""

    async def load(self) -> None:
        self.claim_sha = await self.conn.execute("SCRIPT", "LOAD", CLAIM)
        self.finalize_sha = await self.conn.execute("SCRIPT", "LOAD", FINALIZE)

    async def enqueue(self, keys: Keys, n: int, chunk: int = 1000) -> list[bytes]:
        """N queued runs (not timed): ids in ``ready``, status and input in their hashes."""
        ids = [os.urandom(13).hex().encode() for _ in range(n)]
        sends = []
        for start in range(0, n, chunk):
            part = ids[start:start + chunk]
            sends.append(self.conn.send(("HSET", keys.runs, *(x for i in part for x in (i, b"queued")))))
            sends.append(self.conn.send(("HSET", keys.inputs,
                                         *(x for k, i in enumerate(part, start) for x in (i, _encode({"i": k}))))))
            sends.append(self.conn.send(("RPUSH", keys.ready, *part)))
        await asyncio.gather(*sends)
        return ids

    async def drain(self, keys: Keys) -> Round:
        """Claim, run and finalize until ``ready`` is empty; the finalizes of a batch and the next claim
        share one write, so every batch costs one round trip."""
        send, handler, fin_sha = self.conn.send, self.handler, self.finalize_sha
        claim = (b"EVALSHA", self.claim_sha, 3, keys.ready, keys.runs, keys.inputs, self.batch)
        runs, outputs = keys.runs, keys.outputs
        finalized = refused = claims = 0
        t0 = time.perf_counter()
        reply = await send(claim)
        claims += 1
        while reply:
            finals = []
            for i in range(0, len(reply), 2):
                output = await handler(_decode(reply[i + 1]))
                finals.append(send((b"EVALSHA", fin_sha, 2, runs, outputs, reply[i], _encode(output))))
            reply = await send(claim)  # replies come in order: every finalize above has its reply now
            claims += 1
            for fut in finals:
                if fut.result() == 1:
                    finalized += 1
                else:
                    refused += 1
        seconds = time.perf_counter() - t0
        return Round(seconds, finalized, refused, Counter({"EVALSHA": claims + finalized + refused}))

    async def finalize_again(self, keys: Keys, run_id: bytes) -> int:
        """A second finalize of a run (the probe never sends one; for the test): 0 when refused."""
        return int(await self.conn.execute("EVALSHA", self.finalize_sha, 2, keys.runs, keys.outputs, run_id, b"{}"))


async def measure_round(probe: Probe, redis: RedisClient, n: int, round_no: int) -> dict[str, float]:
    """One round: enqueue N runs, drain them (timed), check them, delete the keys."""
    keys = Keys.under(f"{probe.prefix}:r{round_no}")
    try:
        await probe.enqueue(keys, n)
        cpu0, stats0 = await server.server_cpu_s(redis), await server.command_stats(redis)
        own0 = time.process_time()
        result = await probe.drain(keys)
        own1 = time.process_time()
        cpu1, stats1 = await server.server_cpu_s(redis), await server.command_stats(redis)
        if result.finalized != n or result.refused:
            raise RuntimeError(f"ceiling probe finalized {result.finalized} of {n} runs, {result.refused} refused")
    finally:
        await redis.execute("UNLINK", *keys.all())
    cmd_us, nested_us = server.command_usec(stats0, stats1, result.commands, {"INFO": 2})
    return {
        "ceiling_per_s": n / result.seconds,
        "ceiling_seconds": result.seconds,
        "ceiling_server_cpu_us_per_run": (cpu1 - cpu0) * 1e6 / n,
        "ceiling_server_cmd_us_per_run": cmd_us / n,
        "ceiling_server_nested_us_per_run": nested_us / n,
        "ceiling_worker_cpu_us_per_run": (own1 - own0) * 1e6 / n,
    }


async def run_probe(url: str, prefix: str, n: int, rounds: int, batch: int) -> dict[str, float]:
    """``rounds`` rounds of N runs in this process; the median round (by rate) with its CPU figures."""
    redis = server.connect(url)
    try:
        probe = Probe(await redis.open_connection(), prefix, batch)
        await probe.load()
        measured = [await measure_round(probe, redis, n, i) for i in range(rounds)]
        probe.conn.close()
    finally:
        await redis.close()
    measured.sort(key=lambda m: m["ceiling_per_s"])
    out = dict(measured[(len(measured) - 1) // 2])  # the median round (the lower middle for an even count)
    out["ceiling_rounds"] = float(rounds)
    return out


# --- one EVALSHA round trip, on an idle connection -------------------------------------------------
async def evalsha_rtt(url: str, samples: int = RTT_SAMPLES) -> dict[str, float]:
    """p50 of ``EVALSHA`` of ``return 1``: through redflow's pipelined asyncio connection (one command in
    flight) and through a blocking socket with hand-written RESP, both from this process."""
    redis = server.connect(url)
    try:
        conn = await redis.open_connection()
        sha = await conn.execute("SCRIPT", "LOAD", PING_SCRIPT)
        times = []
        for i in range(RTT_WARMUP + samples):
            t = time.perf_counter()
            await conn.execute("EVALSHA", sha, 0)
            if i >= RTT_WARMUP:
                times.append(time.perf_counter() - t)
        conn.close()
        socket_times = _socket_rtt(redis.address, sha, samples)
    finally:
        await redis.close()
    return {"evalsha_rtt_p50_ms": statistics.median(times) * 1000,
            "evalsha_socket_p50_ms": statistics.median(socket_times) * 1000}


def _socket_rtt(address: ServerAddress, sha: bytes, samples: int) -> list[float]:
    if address.unix_path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address.unix_path)
    else:
        sock = socket.create_connection((address.host, address.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if address.password is not None:
            auth = [b"AUTH", *([address.username.encode()] if address.username else []), address.password.encode()]
            sock.sendall(_resp(auth))
            if not sock.recv(1024).startswith(b"+OK"):
                raise RuntimeError("AUTH failed on the raw socket")
        if address.db:
            sock.sendall(_resp([b"SELECT", str(address.db).encode()]))
            sock.recv(1024)
        request = _resp([b"EVALSHA", sha, b"0"])
        times = []
        for i in range(RTT_WARMUP + samples):
            t = time.perf_counter()
            sock.sendall(request)
            reply = sock.recv(64)
            while not reply.endswith(b"\r\n"):
                reply += sock.recv(64)
            if i >= RTT_WARMUP:
                times.append(time.perf_counter() - t)
        return times
    finally:
        sock.close()


def _resp(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


# --- the scenario in python -m bench ------------------------------------------------------------------
async def scenario(url: str, n: int, rounds: int, batch: int) -> dict[str, float]:
    """The round trip here, then the probe in a subprocess (``python -m bench.ceiling --child``)."""
    metrics = await evalsha_rtt(url)
    argv = [sys.executable, "-m", "bench.ceiling", "--child", "--url", url, "--prefix", server.new_prefix("ceiling"),
            "--n", str(n), "--rounds", str(rounds), "--batch", str(batch)]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60 + rounds * n / 1000)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"ceiling probe failed (exit {proc.returncode}): {err.decode(errors='replace')[-800:]}")
    metrics.update(json.loads(lines[-1][len("RESULT "):]))
    return metrics


# --- throughputs as fractions of the ceiling, latencies as multiples of the round trip ------------------
LATENCIES = ("latency_p50_ms", "latency_p99_ms")  # the latency scenario's enqueue->result


def _throughputs(metrics: dict[str, float]) -> list[str]:
    """redflow's throughputs: every ``runs/s`` metric, and the drains the tracing scenario names itself."""
    return [m for m in metrics if not m.startswith("ceiling") and (
        report.METRICS.get(m, ("",))[0] == "runs/s" or (m.startswith("drain") and m.endswith("_per_s")))]


def relative_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """From one repetition's metrics: each throughput / ``ceiling_per_s`` (``<metric>_vs_ceiling``), each
    enqueue->result latency / the EVALSHA round trip (``<metric>_vs_rtt``, ``<metric>_vs_socket_rtt``)."""
    out: dict[str, float] = {}
    ceiling = metrics.get("ceiling_per_s")
    if ceiling:
        for m in _throughputs(metrics):
            out[f"{m}_vs_ceiling"] = metrics[m] / ceiling
            _describe(m, "_vs_ceiling", "x ceiling", "higher", "/ ceiling_per_s")
    for rtt, suffix in (("evalsha_rtt_p50_ms", "_vs_rtt"), ("evalsha_socket_p50_ms", "_vs_socket_rtt")):
        if metrics.get(rtt):
            for m in LATENCIES:
                if m in metrics:
                    out[m + suffix] = metrics[m] / metrics[rtt]
                    _describe(m, suffix, "x RTT", "lower", f"/ {rtt}")
    return out


def _describe(metric: str, suffix: str, unit: str, better: str, what: str) -> None:
    base = report.METRICS.get(metric, ("", "", metric))[2]
    report.METRICS.setdefault(metric + suffix, (unit, better, f"{base} {what}"))


def rep_metrics(samples: dict[tuple[str, str], dict[int, float]], system: str, rep: int) -> dict[str, float]:
    return {metric: by_rep[rep] for (sys_, metric), by_rep in samples.items() if sys_ == system and rep in by_rep}


# --- python -m bench.ceiling ------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="use this server (never flushed); default: start an embedded Valkey")
    p.add_argument("--prefix", default=None)
    p.add_argument("--n", type=int, default=3000, help="runs per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=100, help="runs per claim")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # python -m bench's subprocess
    return p.parse_args(argv)


async def _standalone(args: argparse.Namespace) -> None:
    with server.BenchServer(args.url) as srv:
        metrics = await scenario(srv.url, args.n, args.rounds, args.batch)
    for name, value in metrics.items():
        unit, _, what = report.METRICS.get(name, ("", "", name))
        print(f"{what:<70} {report.fmt(value):>10} {unit}")


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child:
        result = asyncio.run(run_probe(args.url, args.prefix or server.new_prefix("ceiling"), args.n, args.rounds,
                                       args.batch))
        print("RESULT " + json.dumps(result), flush=True)
    else:
        asyncio.run(_standalone(args))


if __name__ == "__main__":
    main()
