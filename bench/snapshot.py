"""Freeze the code under test: other work may commit to src/ while a run is in progress.

``freeze()`` copies src/redflow to a temporary folder and puts it first on ``sys.path`` (for this process)
and ``PYTHONPATH`` (for the bench worker subprocesses), so every repetition measures the same code. The
git state and a digest of the copied files are recorded with the results.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_state: dict[str, str | bool] = {}


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.stdout.strip()


def git_state() -> tuple[str, bool]:
    """(HEAD, whether tracked files differ from it)."""
    return _git("rev-parse", "HEAD") or "unknown", bool(_git("status", "--porcelain", "--untracked-files=no"))


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def freeze() -> None:
    if "redflow" in sys.modules:
        raise RuntimeError("freeze() must run before redflow is imported")
    sha, dirty = git_state()
    tmp = Path(tempfile.mkdtemp(prefix="rfbench-src-"))
    atexit.register(shutil.rmtree, tmp, True)
    shutil.copytree(REPO / "src" / "redflow", tmp / "redflow", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(tmp))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp), str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    _state.update(git_sha=sha, dirty=dirty, src_digest=digest(tmp / "redflow"), src=str(tmp))


def state() -> dict[str, str | bool]:
    """The frozen code's git state (taken at freeze time) and digest; empty if freeze() was not called."""
    return dict(_state)
