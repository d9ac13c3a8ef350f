"""The README's quickstart and the examples the docs link run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "{'sent': True, 'to': 'ada@example.com'}" in out
    assert "step 1: fetch-user" in out and "step 2: send-email" in out


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("durable_sleep.py", "nap -> {'slept_300ms': True, 'attempt': 1}"),
        ("events.py", "callback resumed the waiting run: True"),
        ("child_workflows.py", "total: 14 | failed child raised in parent: yes"),
        ("cron.py", "the cron trigger fired 2 runs"),
        ("cancellation.py", "child result(): CanceledError: parent run <parent id> canceled"),
        ("admission.py", "third sms: rate_limited | retryAfterMs > 0: True"),
        ("validation.py", "runs written by the rejected call: 0"),
        ("streams.py", "live, resumed reader: stream their progress"),
        ("run_actions.py", "replay from 'charge': charged 990 cents for o-1 | load-order ran 1 time"),
        ("human_input.py", "'approved': True, 'by': 'ana', 'attempt': 1} | calls: {'prepare': 1, 'approve': 2}"),
    ],
)
def test_example_runs_and_prints(example: str, expected: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert expected in out, out
