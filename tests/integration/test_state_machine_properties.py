"""Property test of the run state machine: random interleavings of store transitions, checked by a model.

Several simulated workers (no worker processes) drive ``Store`` directly, so every interleaving is
fully controlled: enqueue (some runs started by a running parent that then waits on them), claim,
step records (a step already in the claimed history is never run again), sleeps and event waits,
resume by time (due times in the past, promoted by claim), finish succeeded / failed (with and without
an on_failure hook, then hook_done), retry, release, cancel at any moment, lease lapses followed by a
reap from the leader, and writes with retired fencing tokens. A model of what each worker holds
predicts the reply of every call; the server state is checked against it after every operation, and
once more after the example is driven to completion. Each example runs on its own key prefix.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import redis.asyncio as redis_py
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from redflow import create_client
from redflow.ids import new_run_id
from redflow.storage.codes import Code
from redflow.storage.keys import event_member_prefix
from redflow.storage.records import ClaimedRun, RunHeader, StepRecord, decode_header, decode_wait, encode_step

WORKERS = ("w0", "w1", "w2")
LEADER = "boss"
QUEUE = "default"
WORKFLOW = "prop"
LEASE_MS = 600_000  # never lapses by itself during a test: lapses are made with ZADD workers 0 <wid>
RETENTION_MS = 3_600_000
MAX_LAPSES = 3
TERMINAL = ("succeeded", "failed", "canceled")
ERROR = b'{"name":"Boom","message":"boom","kind":"error"}'

# Operation names, repeated to weight them; each operation gets two selector integers.
OPS = (
    ["enqueue"] * 3 + ["spawn"] * 2 + ["wait_child"] * 2 + ["claim"] * 6 + ["step"] * 4 + ["sleep"] * 2
    + ["event_wait"] + ["finish"] * 4 + ["hook_done"] * 2 + ["retry"] * 2 + ["release"] * 2 + ["cancel"] * 3
    + ["lapse"] * 2 + ["kill"] * 3 + ["heartbeat"] + ["reap"] * 2 + ["stale"] * 2 + ["misuse"]
)
# Shrinking a 60-operation program can take minutes, past the test's timeout: it is off unless asked for
# (REDFLOW_PROPERTY_SHRINK=1). A failure prints the whole program (one note per operation) either way.
PHASES = tuple(Phase) if os.environ.get("REDFLOW_PROPERTY_SHRINK") else (Phase.explicit, Phase.generate)
PROGRAMS = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 11), st.integers(0, 11)), min_size=20, max_size=60)
# Hand-written programs run first, so the rarer paths are exercised whatever is generated.
CRASH_AND_HOOKS = [  # three lapses in one attempt: crashed, hook handed out, its holder dies, handed out again
    ("enqueue", 0, 0), ("claim", 0, 0), ("step", 0, 0), ("kill", 0, 0), ("kill", 1, 0), ("kill", 2, 0),
    ("claim", 0, 0), ("kill", 0, 0), ("claim", 1, 0), ("stale", 0, 0), ("hook_done", 1, 0), ("stale", 1, 1),
]
CANCEL_AND_CHILD = [  # a parent waits for its child; the child is canceled while running; so is the parent
    ("enqueue", 0, 0), ("claim", 0, 0), ("spawn", 0, 0), ("claim", 1, 0), ("cancel", 0, 1), ("step", 1, 1),
    ("finish", 1, 0), ("claim", 0, 0), ("cancel", 0, 0), ("retry", 0, 0), ("stale", 2, 0), ("stale", 3, 1),
]


@dataclass
class RunModel:
    id: str
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)  # step names recorded with OK (each once)
    child_waits: dict[str, str] = field(default_factory=dict)  # wait step name -> child id
    cancel_requested: bool = False  # cancel replied 'requested': the run must end canceled
    terminal: tuple[str, int | None] | None = None  # first terminal (status, finished_at) seen
    hook_allowed: int = 0  # hook claims the run may still be handed out
    hook_done: int = 0  # hook_done calls that returned OK


@dataclass
class Holding:
    run: str
    token: bytes
    kind: str  # 'run' | 'hook' (claimed for on_failure) | 'hookpending' (own failure, hook not done)
    attempt: int
    known: list[str]  # step names in the claimed history, then those this holding recorded


@dataclass
class WorkerModel:
    id: str
    state: str = "none"  # none (no entry) | alive | lapsed
    holdings: dict[str, Holding] = field(default_factory=dict)


class InvariantError(AssertionError):
    pass


def expect(condition: Any, message: str) -> None:
    if not condition:
        raise InvariantError(message)


class Sim:
    def __init__(self, client: Any, pubsub: Any, stats: Counter[str]) -> None:
        self.client = client
        self.store = client.store
        self.redis = client.redis
        self.keys = client.keys
        self.pubsub = pubsub
        self.stats = stats
        self.runs: dict[str, RunModel] = {}
        self.order: list[str] = []
        self.workers = {w: WorkerModel(w) for w in WORKERS}
        self.issued: list[tuple[str, bytes]] = []
        self.headers: dict[str, RunHeader] = {}
        self.done: dict[str, list[str]] = {}
        self.leader = ""
        self.dues = 0  # due times handed out so far (see past_due)

    # --- helpers ---------------------------------------------------------------------------------
    def count(self, what: str) -> None:
        self.stats[what] += 1

    def holdings(self, kinds: tuple[str, ...]) -> list[tuple[WorkerModel, Holding]]:
        return [(w, h) for w in self.workers.values() for h in w.holdings.values() if h.kind in kinds]

    def pick(self, a: int, b: int, kinds: tuple[str, ...]) -> tuple[WorkerModel, Holding] | None:
        """A holding of worker a (else of any worker) whose kind is one of ``kinds``."""
        own = [(w, h) for w, h in self.holdings(kinds) if w.id == WORKERS[a % len(WORKERS)]]
        pool = own or self.holdings(kinds)
        return pool[b % len(pool)] if pool else None

    async def pick_or_claim(self, a: int, b: int, kinds: tuple[str, ...]) -> tuple[WorkerModel, Holding] | None:
        """Like pick; when nothing fits, worker a claims first (keeps programs dense)."""
        picked = self.pick(a, b, kinds)
        alive = [i for i, w in enumerate(WORKERS) if self.workers[w].state == "alive"]
        if picked is None and alive:
            claimer = a if a % len(WORKERS) in alive else alive[a % len(alive)]
            await self.op_claim(claimer, b)
            await self.check()
            picked = self.pick(claimer, b, kinds)
        if picked is None:
            self.count("skip")
        return picked

    def holder_of(self, run_id: str) -> tuple[WorkerModel, Holding] | None:
        for w in self.workers.values():
            if run_id in w.holdings:
                return w, w.holdings[run_id]
        return None

    def drop(self, w: WorkerModel, h: Holding) -> None:
        del w.holdings[h.run]

    def past_due(self) -> int:
        """A due time in the past, later than every earlier one: runs due at once are promoted in the
        order they were scheduled (two runs due at the same server millisecond would go by run id)."""
        self.dues += 1
        return self.dues

    async def header(self, run_id: str) -> RunHeader:
        h = await self.store.read_header(run_id)
        assert h is not None
        return h

    # --- operations --------------------------------------------------------------------------------
    async def op_enqueue(self, parent: str | None = None) -> str | None:
        # Ids sort in creation order (a fixed clock): with the sorted SRANDMEMBER below, replays are exact.
        run_id = new_run_id(self.keys.partition, now_ms=1_700_000_000_000 + len(self.order))
        code, got, status = await self.store.enqueue(run_id, WORKFLOW, QUEUE, b'{"n":1}', 3, 0, None, 0, parent)
        if parent is not None and self.runs[parent].cancel_requested:
            expect(code is Code.CANCELED, f"a child of cancel-requested {parent} was created: {code!r}")
            return None
        expect((code, got, status) == (Code.CREATED, run_id, "queued"), f"enqueue: {(code, got, status)}")
        self.runs[run_id] = RunModel(run_id, parent=parent)
        self.order.append(run_id)
        if parent is not None:
            self.runs[parent].children.append(run_id)
        self.count("enqueue" if parent is None else "enqueue_child")
        return run_id

    async def op_spawn(self, a: int, b: int) -> None:
        picked = self.pick(a, b, ("run",))
        if picked is None:
            await self.op_enqueue()
            return
        w, h = picked
        child = await self.op_enqueue(parent=h.run)
        if child is None:  # the parent's cancellation was requested: its handler ends as canceled
            self.count("enqueue_child_refused")
            await self.finish_canceled(w, h)
        elif b % 2 == 0:  # the usual shape: start the child, then wait for it
            await self.check()
            await self.wait_on_child(w, h, child)

    async def op_wait_child(self, a: int, b: int) -> None:
        picked = self.pick(a, b, ("run",))
        if picked is None or not self.runs[picked[1].run].children:
            await self.op_spawn(a, b)
            return
        w, h = picked
        run = self.runs[h.run]
        await self.wait_on_child(w, h, run.children[b % len(run.children)])

    async def wait_on_child(self, w: WorkerModel, h: Holding, child: str) -> None:
        run = self.runs[h.run]
        name = f"child:{child}"
        if name in h.known:  # the handler replays a recorded wait: nothing to write
            self.count("wait_child_replayed")
            return
        child_status = self.headers[child].status
        code, resolution, _ = await self.store.suspend(
            h.run, h.token, w.id, QUEUE, name, len(h.known) + 1, "child", child_id=child
        )
        run.child_waits[name] = child
        if run.cancel_requested:
            expect(code is Code.CANCELED, f"suspend of cancel-requested {h.run}: {code!r}")
            await self.finish_canceled(w, h)
            return
        if child_status in TERMINAL:
            expect((code, resolution) == (Code.RESOLVED, child_status), f"wait on ended child: {code!r} {resolution}")
            h.known.append(name)
            self.count("wait_child_resolved_at_once")
            return
        expect(code is Code.OK, f"suspend on child: {code!r}")
        self.drop(w, h)
        self.count("wait_child")

    async def op_claim(self, a: int, b: int, max_runs: int | None = None) -> list[ClaimedRun]:
        w = self.workers[WORKERS[a % len(WORKERS)]]
        code, _, claimed = await self.store.claim(w.id, [QUEUE], max_runs or 1 + b % 2, 10)
        if w.state != "alive":
            expect(code is Code.STALE_WORKER and not claimed, f"claim by {w.state} worker {w.id}: {code!r}")
            self.count("claim_refused")
            return []
        expect(code is Code.OK, f"claim: {code!r}")
        for c in claimed:
            self.check_claimed(w, c)
        self.count("claim")
        self.stats["claimed_" + "_".join(sorted({c.kind for c in claimed}) or ["nothing"])] += 1
        return claimed

    def check_claimed(self, w: WorkerModel, c: ClaimedRun) -> None:
        run = self.runs[c.id]
        expect(self.holder_of(c.id) is None, f"{c.id} handed to {w.id} while {self.holder_of(c.id)} holds it")
        names = [s.name for s in c.steps]
        expect(len(names) == len(set(names)), f"{c.id}: a step was recorded twice: {names}")
        missing = [n for n in run.recorded if n not in names]
        expect(not missing, f"{c.id} claimed ({c.kind}) without recorded steps {missing}: history {names}")
        for s in c.steps:
            expect(s.state != "wait", f"{c.id} claimed with an unresolved wait {s.name}")
            if s.name in run.child_waits:
                child = self.runs[run.child_waits[s.name]]
                expect(child.terminal is not None and s.resolution == child.terminal[0],
                       f"{c.id}: child wait {s.name} resolved as {s.resolution}, child is {child.terminal}")
        if c.kind == "run":
            expect(c.header.status == "running", f"{c.id} claimed as run in status {c.header.status}")
            expect(run.terminal is None, f"terminal run {c.id} ({run.terminal}) claimed to run again")
            expect(not run.cancel_requested, f"cancel-requested run {c.id} claimed to run again")
        elif c.kind == "hook":
            expect(c.header.status == "failed" and c.header.hook_pending, f"hook claim of {c.id}: {c.header}")
            expect(run.hook_done == 0, f"{c.id} handed out for its hook after hook_done")
            expect(run.hook_allowed > 0, f"{c.id} handed out for its hook again without a lapse or release")
            expect(not run.cancel_requested, f"canceled run {c.id} handed out as hook")
            run.hook_allowed -= 1
        else:
            raise InvariantError(f"unexpected claim kind {c.kind!r} for {c.id}")
        w.holdings[c.id] = Holding(c.id, c.token, c.kind, c.header.attempt, names)
        self.issued.append((c.id, c.token))

    async def op_step(self, a: int, b: int) -> None:
        picked = await self.pick_or_claim(a, b, ("run",))
        if picked is None:
            return
        w, h = picked
        name = f"s{b % 6}"
        if name in h.known:  # recorded already (by this or an earlier attempt): the handler skips it
            self.count("step_replayed")
            return
        line = encode_step(StepRecord(name=name, position=len(h.known) + 1, attempt=h.attempt,
                                      output=msgspec.Raw(b"1")))
        code = await self.store.record_step(h.run, h.token, line)
        expect(code is Code.OK, f"record_step of {h.run} by {w.id}: {code!r}")
        h.known.append(name)
        run = self.runs[h.run]
        expect(name not in run.recorded, f"model bug: {name} recorded twice for {h.run}")
        run.recorded.append(name)
        self.count("step")

    async def op_suspend(self, a: int, b: int, kind: str) -> None:
        picked = await self.pick_or_claim(a, b, ("run",))
        if picked is None:
            return
        w, h = picked
        name = f"{kind}{len(h.known) + 1}"
        kwargs: dict[str, Any] = {}
        if kind == "sleep":
            kwargs = {"due_ms": self.past_due()}
        else:
            prefix = event_member_prefix("ev", f"k{b % 2}")
            kwargs = {"waiter_member": prefix + h.run, "buffer_prefix": prefix}
            if b % 3 == 0:  # a deadline already passed: resumed by time (resolution 'timeout')
                kwargs["due_ms"] = self.past_due()
        code, _, _ = await self.store.suspend(h.run, h.token, w.id, QUEUE, name, len(h.known) + 1, kind, **kwargs)
        if self.runs[h.run].cancel_requested:
            expect(code is Code.CANCELED, f"suspend of cancel-requested {h.run}: {code!r}")
            await self.finish_canceled(w, h)
            return
        expect(code is Code.OK, f"suspend ({kind}) of {h.run}: {code!r}")
        self.drop(w, h)
        self.count(kind if kind == "sleep" else "event_wait" + ("_timeout" if "due_ms" in kwargs else ""))

    async def finish_canceled(self, w: WorkerModel, h: Holding) -> None:
        code, status = await self.store.finish(h.run, h.token, w.id, "canceled", ERROR, False, RETENTION_MS, QUEUE)
        expect((code, status) == (Code.OK, "canceled"), f"finish as canceled of {h.run}: {(code, status)}")
        self.drop(w, h)
        self.count("finish_canceled")

    async def op_finish(self, a: int, b: int, mode: int | None = None) -> None:
        picked = await self.pick_or_claim(a, b, ("run",))
        if picked is None:
            return
        await self.finish_holding(*picked, b % 3 if mode is None else mode)

    async def finish_holding(self, w: WorkerModel, h: Holding, mode: int) -> None:
        status, hook = ("succeeded", False) if mode == 0 else ("failed", mode == 2)
        code, final = await self.store.finish(
            h.run, h.token, w.id, status, b"42" if mode == 0 else ERROR, hook, RETENTION_MS, QUEUE
        )
        run = self.runs[h.run]
        want = "canceled" if run.cancel_requested else status
        expect((code, final) == (Code.OK, want), f"finish {status} of {h.run}: {(code, final)}, expected {want}")
        if final == "failed" and hook:
            h.kind = "hookpending"  # this worker runs on_failure now, under the same token
            self.count("finish_failed_hook")
        else:
            self.drop(w, h)
            self.count(f"finish_{final}")

    async def op_hook_done(self, a: int, b: int) -> None:
        picked = self.pick(a, b, ("hook", "hookpending"))
        if picked is None:
            self.count("skip")
            return
        w, h = picked
        code = await self.store.hook_done(h.run, h.token, w.id)
        expect(code is Code.OK, f"hook_done of {h.run} by {w.id}: {code!r}")
        run = self.runs[h.run]
        run.hook_done += 1
        run.hook_allowed = 0
        expect(run.hook_done == 1, f"on_failure of {h.run} completed {run.hook_done} times")
        self.drop(w, h)
        self.count("hook_done")

    async def op_retry(self, a: int, b: int) -> None:
        picked = await self.pick_or_claim(a, b, ("run",))
        if picked is None:
            return
        w, h = picked
        # Due at once: a delay that puts it in the past and after every earlier retry (see past_due).
        code = await self.store.retry(h.run, h.token, w.id, QUEUE, -(10**12) + self.past_due(), ERROR)
        if self.runs[h.run].cancel_requested:
            expect(code is Code.CANCELED, f"retry of cancel-requested {h.run}: {code!r}")
            await self.finish_canceled(w, h)
            return
        expect(code is Code.OK, f"retry of {h.run}: {code!r}")
        self.drop(w, h)
        self.count("retry")

    async def op_release(self, a: int, b: int) -> None:
        kinds = ("hook", "hookpending") if b % 2 else ("run",)
        picked = self.pick(a, b, kinds) or await self.pick_or_claim(a, b, ("run", "hook", "hookpending"))
        if picked is None:
            return
        w, h = picked
        code = await self.store.release(h.run, h.token, w.id, QUEUE, RETENTION_MS)
        expect(code is Code.OK, f"release of {h.run} ({h.kind}): {code!r}")
        run = self.runs[h.run]
        if h.kind != "run":
            run.hook_allowed += 1  # handed back for its hook
        self.drop(w, h)
        header = await self.header(h.run)
        if h.kind != "run":
            expect(header.status == "failed" and header.hook_pending, f"released hook of {h.run}: {header}")
        elif run.cancel_requested:
            expect(header.status == "canceled", f"released cancel-requested {h.run} is {header.status}")
        else:
            expect(header.status == "queued", f"released {h.run} is {header.status}")
        self.count(f"release_{h.kind}")

    async def op_cancel(self, b: int, run_id: str | None = None) -> None:
        if not self.order:
            self.count("skip")
            return
        run_id = run_id or self.order[b % len(self.order)]
        run = self.runs[run_id]
        status = self.headers[run_id].status
        code, detail = await self.store.cancel(run_id, "", RETENTION_MS)
        if status in TERMINAL:
            expect((code, detail) == (Code.TERMINAL, status), f"cancel of {status} {run_id}: {(code, detail)}")
            self.count("cancel_terminal")
        elif self.holder_of(run_id) is not None:
            expect((code, detail) == (Code.OK, "requested"), f"cancel of held {run_id}: {(code, detail)}")
            run.cancel_requested = True
            self.count("cancel_requested")
        else:
            expect((code, detail) == (Code.OK, "canceled"), f"cancel of {status} {run_id}: {(code, detail)}")
            self.count("cancel_at_once")

    async def op_lapse(self, a: int) -> None:
        alive = [w for w in self.workers.values() if w.state == "alive"]
        busy = [w for w in alive if w.holdings]
        if not alive:
            self.count("skip")
            return
        w = (busy or alive)[a % len(busy or alive)]
        await self.redis.execute("ZADD", self.keys.workers, 0, w.id)
        w.state = "lapsed"
        self.count("lapse")

    async def op_kill(self, a: int, b: int) -> None:
        """The worker holding a run dies (its lease lapses) and the leader reaps it at once."""
        picked = await self.pick_or_claim(a, b, ("run", "hook", "hookpending"))
        if picked is None:
            return
        w = picked[0]
        if w.state == "alive":
            await self.redis.execute("ZADD", self.keys.workers, 0, w.id)
            w.state = "lapsed"
        await self.check()
        await self.op_reap(WORKERS.index(w.id), any_worker=True)
        await self.check()
        await self.op_heartbeat(WORKERS.index(w.id))
        self.count("kill")

    async def op_heartbeat(self, a: int) -> None:
        w = self.workers[WORKERS[a % len(WORKERS)]]
        beat = await self.store.heartbeat(w.id, LEASE_MS, LEASE_MS, False)
        want = {"none": 0, "alive": 1, "lapsed": 2}[w.state]
        expect(beat.state == want, f"heartbeat of {w.state} worker {w.id}: state {beat.state}")
        w.state = "alive"
        self.count("heartbeat")

    async def op_reap(self, a: int, any_worker: bool = False) -> None:
        lapsed = [w for w in self.workers.values() if w.state == "lapsed"]
        w = lapsed[a % len(lapsed)] if lapsed and not any_worker else self.workers[WORKERS[a % len(WORKERS)]]
        beat = await self.store.heartbeat(LEADER, LEASE_MS, LEASE_MS, True)
        expect(beat.leader.startswith(LEADER + ":"), f"leader: {beat.leader!r}")
        expect(not self.leader or beat.leader == self.leader, f"leadership changed: {beat.leader}")
        self.leader = beat.leader
        held = list(w.holdings.values())
        code, taken, crashed, left = await self.store.reap(self.leader, w.id, MAX_LAPSES, RETENTION_MS, 100)
        if w.state == "alive":
            expect(code is Code.ALIVE, f"reap of live worker {w.id}: {code!r}")
            self.count("reap_alive")
            return
        expect((code, taken, left) == (Code.OK, len(held), 0), f"reap of {w.id}: {(code, taken, crashed, left)}")
        expect(await self.redis.execute("ZSCORE", self.keys.workers, w.id) is None, f"{w.id} still registered")
        w.holdings.clear()
        w.state = "none"
        seen_crashed = 0
        for h in held:
            run = self.runs[h.run]
            header = await self.header(h.run)
            expect(header.owner is None, f"reaped {h.run} still owned by {header.owner}")
            if h.kind == "run":
                if run.cancel_requested:
                    expect(header.status == "canceled", f"reaped cancel-requested {h.run} is {header.status}")
                elif header.status == "failed":
                    expect(header.hook_pending and (header.lapses or 0) >= MAX_LAPSES, f"crashed {h.run}: {header}")
                    run.hook_allowed += 1  # the crash queued its on_failure
                    seen_crashed += 1
                else:
                    expect(header.status == "queued", f"reaped {h.run} is {header.status}")
            else:
                expect(header.status == "failed", f"reaped hook of {h.run}: {header.status}")
                if header.hook_pending:
                    run.hook_allowed += 1  # queued for its hook again
                else:
                    self.count("reap_hook_gave_up")
        expect(crashed == seen_crashed, f"reap reported {crashed} crashed, saw {seen_crashed}")
        self.stats["reap_crashed"] += crashed
        self.count("reap" if held else "reap_empty")

    async def op_stale(self, a: int, b: int) -> None:
        current = {(w_h.run, w_h.token) for _, w_h in self.holdings(("run", "hook", "hookpending"))}
        retired = [t for t in self.issued if t not in current]
        if not retired:
            self.count("skip")
            return
        run_id, token = retired[b % len(retired)]
        wid = WORKERS[a % len(WORKERS)]
        which = a % 6
        if which == 0:
            line = encode_step(StepRecord(name="stale", position=99, attempt=1))
            code = await self.store.record_step(run_id, token, line)
        elif which == 1:
            code, _ = await self.store.finish(run_id, token, wid, "succeeded", b"0", False, RETENTION_MS, QUEUE)
        elif which == 2:
            code = await self.store.retry(run_id, token, wid, QUEUE, 0, ERROR)
        elif which == 3:
            code = await self.store.release(run_id, token, wid, QUEUE, RETENTION_MS)
        elif which == 4:
            code, _, _ = await self.store.suspend(run_id, token, wid, QUEUE, "stale", 99, "sleep", delay_ms=0)
        else:
            code = await self.store.hook_done(run_id, token, wid)
        expect(code is Code.STALE, f"write #{which} with retired token {token!r} of {run_id}: {code!r}")
        self.count("stale_write")

    async def op_misuse(self, a: int, b: int) -> None:
        """Transitions of a terminal run (failed, hook pending) by its current holder: all refused."""
        picked = self.pick(a, b, ("hook", "hookpending"))
        if picked is None:
            self.count("skip")
            return
        w, h = picked
        which = b % 3
        if which == 0:
            code, _ = await self.store.finish(h.run, h.token, w.id, "succeeded", b"0", False, RETENTION_MS, QUEUE)
        elif which == 1:
            code = await self.store.retry(h.run, h.token, w.id, QUEUE, 0, ERROR)
        else:
            code, _, _ = await self.store.suspend(h.run, h.token, w.id, QUEUE, "late", 99, "sleep", delay_ms=0)
        expect(code is Code.WRONG_STATUS, f"transition #{which} of failed {h.run}: {code!r}")
        self.count("terminal_write_refused")

    async def apply(self, op: str, a: int, b: int) -> None:
        if op == "enqueue":
            await self.op_enqueue()
        elif op == "spawn":
            await self.op_spawn(a, b)
        elif op == "wait_child":
            await self.op_wait_child(a, b)
        elif op == "claim":
            await self.op_claim(a, b)
        elif op == "step":
            await self.op_step(a, b)
        elif op == "sleep":
            await self.op_suspend(a, b, "sleep")
        elif op == "event_wait":
            await self.op_suspend(a, b, "event")
        elif op == "finish":
            await self.op_finish(a, b)
        elif op == "hook_done":
            await self.op_hook_done(a, b)
        elif op == "retry":
            await self.op_retry(a, b)
        elif op == "release":
            await self.op_release(a, b)
        elif op == "cancel":
            await self.op_cancel(b)
        elif op == "lapse":
            await self.op_lapse(a)
        elif op == "kill":
            await self.op_kill(a, b)
        elif op == "heartbeat":
            await self.op_heartbeat(a)
        elif op == "reap":
            await self.op_reap(a, any_worker=b % 4 == 0)
        elif op == "stale":
            await self.op_stale(a, b)
        elif op == "misuse":
            await self.op_misuse(a, b)
        else:
            raise AssertionError(op)

    # --- invariants -----------------------------------------------------------------------------------
    async def drain_done(self, wait_s: float = 0.0) -> bool:
        """Read published done messages; True when the fence message was seen."""
        fence = False
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
            if msg is None:
                return fence
            channel = msg["channel"].decode()
            run_id = channel.rsplit(":", 1)[1]
            if run_id == "~fence":
                return True
            status = msg["data"].split(b"\n", 1)[0].decode()
            self.done.setdefault(run_id, []).append(status)
            expect(len(self.done[run_id]) == 1, f"{run_id} published its end {self.done[run_id]}")

    async def check(self) -> None:
        k = self.keys
        raw_runs, raw_leases, raw_waits = await asyncio.gather(
            self.redis.execute("HGETALL", k.runs),
            self.redis.execute("HGETALL", k.leases),
            self.redis.execute("HGETALL", k.waits),
        )
        headers = {raw_runs[i].decode(): decode_header(raw_runs[i + 1]) for i in range(0, len(raw_runs), 2)}
        leases = {raw_leases[i].decode(): raw_leases[i + 1] for i in range(0, len(raw_leases), 2)}
        waits = {raw_waits[i].decode(): decode_wait(raw_waits[i + 1]) for i in range(0, len(raw_waits), 2)}
        self.headers = headers
        expect(set(headers) == set(self.runs), "runs on the server differ from the model")
        for run_id, h in headers.items():
            run = self.runs[run_id]
            if run.terminal is not None:
                expect((h.status, h.finished_at_ms) == run.terminal,
                       f"terminal run {run_id} {run.terminal} changed to {(h.status, h.finished_at_ms)}")
            elif h.status in TERMINAL:
                run.terminal = (h.status, h.finished_at_ms)
                expect(h.finished_at_ms is not None, f"{run_id} ended without finished_at")
                if run.cancel_requested:
                    expect(h.status == "canceled", f"cancel-requested run {run_id} ended {h.status}")
            if h.status == "running":
                holder = self.holder_of(run_id)
                expect(holder is not None and holder[1].kind == "run", f"running {run_id} held by {holder}")
            if h.status in TERMINAL and run_id in leases:
                expect(h.status == "failed" and h.hook_pending, f"{h.status} {run_id} keeps a lease")
            if run_id in waits:
                expect(h.status == "scheduled", f"{run_id} has a wait in status {h.status}")
        # Every lease is exactly a holding of the model, and the other way round.
        held = {h.run: (w.id, h.token) for w in self.workers.values() for h in w.holdings.values()}
        expect({r: t for r, (_, t) in held.items()} == leases, f"leases {leases} differ from holdings {held}")
        for run_id, h in headers.items():
            expect(h.owner == (held[run_id][0] if run_id in held else None),
                   f"{run_id} owner {h.owner}, model {held.get(run_id)}")
        owned = await asyncio.gather(*(self.redis.execute("SMEMBERS", k.owned(w)) for w in WORKERS))
        for w, members in zip(WORKERS, owned, strict=True):
            ids = {m.decode() for m in members}
            expect(ids == set(self.workers[w].holdings), f"owned:{w} = {ids}, model {set(self.workers[w].holdings)}")
        # A parent never stays waiting for a child that ended.
        for run_id, wait in waits.items():
            if wait.kind == "child":
                child = headers.get(wait.child_id or "")
                expect(child is not None and child.status not in TERMINAL,
                       f"{run_id} still waits for child {wait.child_id} ({child and child.status})")
        await self.drain_done()

    # --- the end --------------------------------------------------------------------------------------
    async def settle(self, w: WorkerModel, h: Holding) -> None:
        if h.kind == "run":
            await self.finish_holding(w, h, 0)
        else:
            code = await self.store.hook_done(h.run, h.token, w.id)
            expect(code is Code.OK, f"hook_done of {h.run}: {code!r}")
            run = self.runs[h.run]
            run.hook_done += 1
            run.hook_allowed = 0
            expect(run.hook_done == 1, f"on_failure of {h.run} completed {run.hook_done} times")
            self.drop(w, h)
            self.count("hook_done")

    async def drive_to_completion(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        for i, w in enumerate(WORKERS):
            if self.workers[w].state == "lapsed":
                await self.op_reap(i, any_worker=True)
                await self.check()
        for i, w in enumerate(WORKERS):
            if self.workers[w].state != "alive":
                await self.op_heartbeat(i)
        while True:
            for w in self.workers.values():
                for h in list(w.holdings.values()):
                    await self.settle(w, h)
                    await self.check()
            claimed = await self.op_claim(0, 0, max_runs=10)
            await self.check()
            if claimed:
                continue
            pending = [r for r, h in self.headers.items() if h.status not in TERMINAL or h.hook_pending]
            if not pending:
                return
            # Runs that wait for an event that never comes are canceled; everything else moves on.
            waits = await self.redis.execute("HGETALL", self.keys.waits)
            forever = [waits[i].decode() for i in range(0, len(waits), 2)
                       if decode_wait(waits[i + 1]).kind == "event" and decode_wait(waits[i + 1]).wait_until_ms is None]
            for run_id in forever:
                await self.op_cancel(0, run_id)
                await self.check()
            if forever:
                continue
            states = {r: (h.status, h.hook_pending, h.owner) for r, h in self.headers.items() if r in pending}
            expect(loop.time() < deadline, f"runs never completed: {states}")
            await asyncio.sleep(0.01)  # a due time still ahead by a millisecond: poll until the deadline

    async def final_checks(self) -> None:
        k = self.keys
        for run_id, h in self.headers.items():
            run = self.runs[run_id]
            expect(h.status in TERMINAL and not h.hook_pending, f"{run_id} left {h.status} (hook {h.hook_pending})")
            expect(h.owner is None, f"{run_id} still owned by {h.owner}")
            if run.cancel_requested:
                expect(h.status == "canceled", f"cancel-requested {run_id} ended {h.status}")
            steps = [s.name for s in await self.store.read_steps(run_id)]
            expect(len(steps) == len(set(steps)), f"{run_id}: a step recorded twice: {steps}")
            expect(all(n in steps for n in run.recorded), f"{run_id} lost steps: {run.recorded} vs {steps}")
        expect(await self.redis.execute("HLEN", k.leases) == 0, "leases remain after every run ended")
        for w in (*WORKERS, LEADER):
            expect(await self.redis.execute("SCARD", k.owned(w)) == 0, f"owned:{w} is not empty")
        # Exactly one done message per run: a fence published last arrives after every earlier one.
        await self.redis.execute("PUBLISH", f"{k.base}:done:~fence", "fence")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await self.drain_done(wait_s=0.1):
            expect(loop.time() < deadline, "the fence message never arrived")
        for run_id, h in self.headers.items():
            expect(self.done.get(run_id) == [h.status], f"{run_id} ({h.status}) published {self.done.get(run_id)}")
        self.stats["runs"] += len(self.runs)
        for h in self.headers.values():
            self.stats["ended_" + h.status] += 1


async def _delete_prefix(client: Any, prefix: str) -> None:
    """Delete the keys of ``prefix`` on every master. One key per command: with several partitions,
    a master holds keys of several slots (the simulation's runs are p0's; its siblings' and the
    prefix's markers live on the other partitions' masters)."""
    for node in await client.redis.masters():
        cursor = b"0"
        while True:
            cursor, keys = await node.execute("SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000)
            for key in keys:
                await node.execute("UNLINK", key)
            if cursor in (b"0", 0, "0"):
                break


async def run_example(url: str, program: list[tuple[str, int, int]], stats: Counter[str]) -> None:
    prefix = f"rft:{uuid.uuid4().hex[:12]}"
    client = create_client(url=url, prefix=prefix)
    # On a cluster, the node holding the prefix's slot: its scripts' messages reach its own
    # subscribers at once (other nodes hear them later, over the cluster bus).
    node = await client.redis.node_for(client.keys.base)
    plain = redis_py.from_url(f"redis://{node.address.host}:{node.address.port}/{node.address.db}")
    pubsub = plain.pubsub()
    ok = False
    real_execute = client.redis.execute

    async def execute(*args: Any) -> Any:
        # store.reap takes a dead worker's runs from SRANDMEMBER: sorted, the order they are requeued
        # in (and so which is claimed next) is the same on every run of an example.
        reply = await real_execute(*args)
        return sorted(reply) if args[0] == "SRANDMEMBER" else reply

    client.redis.execute = execute  # type: ignore[method-assign]
    try:
        await client.store.ensure_ready()
        await pubsub.psubscribe(f"{client.keys.base}:done:*")
        note(f"key prefix {prefix} (kept when the example fails)")
        sim = Sim(client, pubsub, stats)
        for i in range(len(WORKERS)):
            await sim.op_heartbeat(i)
        await sim.check()
        for i, (op, a, b) in enumerate(program):
            note(f"#{i} {op}({a}, {b})")
            await sim.apply(op, a, b)
            await sim.check()
        await sim.drive_to_completion()
        await sim.final_checks()
        ok = True
    finally:
        await pubsub.aclose()
        if ok:  # keep the data of a failing example for a look; never flush the server
            await _delete_prefix(client, prefix)
        await plain.aclose()
        await client.close()


@pytest.mark.timeout(120)
def test_random_interleavings_keep_the_run_state_machine_invariants(redis_url: str, capsys: Any) -> None:
    stats: Counter[str] = Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False, phases=PHASES,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(program=PROGRAMS)
    @example(program=CRASH_AND_HOOKS)
    @example(program=CANCEL_AND_CHILD)
    def one_program(program: list[tuple[str, int, int]]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(run_example(redis_url, program, stats))
        finally:
            loop.close()

    one_program()
    with capsys.disabled():
        print("\nstate machine operations: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    for needed in ("claim", "step", "finish_succeeded", "finish_failed_hook", "hook_done", "retry", "reap",
                   "stale_write", "cancel_requested", "wait_child", "sleep", "reap_crashed", "claimed_hook",
                   "finish_canceled", "release_run", "event_wait"):
        assert stats[needed] > 0, f"no {needed} was exercised: {stats}"
