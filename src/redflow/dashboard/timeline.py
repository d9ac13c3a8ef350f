"""The run page's timeline: the wait before the first attempt, each attempt, and the steps and waits
of each attempt, as bars on one time axis from the run's creation to its end (or now)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..types import TERMINAL_STATUSES

if TYPE_CHECKING:
    from ..types import AttemptTrace, RunState, StepState

MIN_WIDTH_PCT = 0.6


@dataclass(slots=True)
class Bar:
    label: str
    kind: str  # queue | attempt | step | sleep | event | child | input | emit
    status: str
    start_ms: int
    end_ms: int | None  # None: still going
    depth: int = 0
    note: str = ""
    child_run_id: str | None = None
    left_pct: float = 0.0
    width_pct: float = 0.0

    @property
    def duration_ms(self) -> int | None:
        return None if self.end_ms is None else max(0, self.end_ms - self.start_ms)


def _step_bar(step: StepState) -> Bar:
    kind = step.get("kind") or "step"
    wait = step.get("wait")
    notes = []
    if kind == "sleep" and step.get("wait_until_at"):
        notes.append("until " + _hhmmss(step.get("wait_until_at")))
    if wait is not None and wait.get("kind") == "event":
        notes.append(f"event {wait.get('event')}" + (f" key {wait.get('correlation_key')}"
                                                     if wait.get("correlation_key") else ""))
        if step.get("status") == "running" and step.get("wait_until_at"):
            notes.append("times out " + _hhmmss(step.get("wait_until_at")))
    if wait is not None and wait.get("kind") == "input":
        kind = "input"
        notes.append(str(wait.get("message") or "waiting for input"))
    if wait is not None and wait.get("resolved_by"):
        notes.append(f"resolved by {wait.get('resolved_by')}")
    open_wait = step.get("status") == "running"
    end = None if open_wait else (step.get("finished_at") or step.get("started_at") or 0)
    return Bar(label=step.get("name") or "(input)", kind=kind, status=str(step.get("status", "")),
               start_ms=int(step.get("started_at") or 0), end_ms=end, depth=1, note="; ".join(notes),
               child_run_id=step.get("child_run_id"))


def _hhmmss(ms: Any) -> str:
    from .format import local_time

    return local_time(ms)[11:]


def attempt_start(started_at: Any, steps: list[StepState], fallback: int) -> int:
    """When an attempt began: its claim time, or its first step when it resumed after a durable wait
    (an attempt's ``started_at`` is its latest claim)."""
    times = [int(s["started_at"]) for s in steps if s.get("started_at")]
    if started_at:
        times.append(int(started_at))
    return min(times) if times else fallback


def build(run: RunState, steps: list[StepState], attempts: list[AttemptTrace], now_ms: int) -> list[Bar]:
    created = int(run.get("created_at") or 0)
    terminal = run.get("status") in TERMINAL_STATUSES
    ended = {a["attempt"] for a in attempts}
    current = int(run.get("attempt") or 0)
    current_steps = [s for s in steps if s.get("attempt") == current and current not in ended]
    spans: list[tuple[Bar, list[Bar]]] = []
    for a in attempts:
        start = attempt_start(a["started_at"], a["steps"], created)
        spans.append((Bar(f"attempt {a['attempt']}", "attempt", a["status"], start,
                          max(start, int(a["finished_at"] or start))), [_step_bar(s) for s in a["steps"]]))
    if current and current not in ended and run.get("started_at"):
        status = str(run.get("status", ""))
        start = attempt_start(run.get("started_at"), current_steps, created)
        spans.append((Bar(f"attempt {current}", "attempt", status, start,
                          None if not terminal else int(run.get("finished_at") or now_ms),
                          note="in progress" if status == "running" else ""), [_step_bar(s) for s in current_steps]))
    bars: list[Bar] = []
    if spans and spans[0][0].start_ms > created:
        bars.append(Bar("waiting to start", "queue", "waited", created, spans[0][0].start_ms))
    elif not spans and not terminal:
        bars.append(Bar("waiting to start", "queue", str(run.get("status", "")), created, None))
    previous_end: int | None = None
    for attempt, step_bars in spans:
        if previous_end is not None and attempt.start_ms > previous_end:
            bars.append(Bar("until the next attempt", "queue", "waited", previous_end, attempt.start_ms))
        bars.append(attempt)
        bars.extend(step_bars)
        previous_end = attempt.end_ms
    end = int(run.get("finished_at") or 0) if terminal else now_ms
    end = max([end, created + 1, *(b.end_ms or b.start_ms for b in bars)])
    span = end - created
    for bar in bars:
        stop = bar.end_ms if bar.end_ms is not None else end
        bar.left_pct = round(max(0.0, (bar.start_ms - created) / span * 100), 2)
        width = max(MIN_WIDTH_PCT, (stop - bar.start_ms) / span * 100)
        bar.width_pct = round(min(width, 100 - bar.left_pct), 2) if bar.left_pct < 100 else MIN_WIDTH_PCT
    return bars
