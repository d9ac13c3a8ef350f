"""The README's examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "{'sent': True, 'to': 'ada@example.com'}" in out
    assert "step 1: fetch-user" in out and "step 2: send-email" in out
