"""Baseline virtualenvs: one per system, outside the repository, created with ``python3 -m venv`` + pip.

A venv is reused when its marker file records the same requirement list; otherwise it is rebuilt.
Nothing here imports a baseline: the harness only ever runs their interpreters as subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = ".redflow-bench.json"


@dataclass(frozen=True)
class VenvSpec:
    name: str
    requirements: tuple[str, ...]
    probe: str  # the distribution whose installed version is reported


# Pinned so results stay comparable from run to run; change a pin and the venv is rebuilt.
SPECS: dict[str, VenvSpec] = {
    "redflow019": VenvSpec("redflow019", ("redflow[fast]==0.1.9",), "redflow"),
    "saq": VenvSpec("saq", ("saq[redis,hiredis]==0.26.4", "typing_extensions"), "saq"),
    "arq": VenvSpec("arq", ("arq==0.28.0", "hiredis"), "arq"),
    "celery": VenvSpec("celery", ("celery[redis]==5.7.0", "hiredis"), "celery"),
    # redis-py pinned too: the driver relies on its asyncio client's timeout handling (see bullmq_driver.py)
    "bullmq": VenvSpec("bullmq", ("bullmq==3.4.4", "redis==8.1.0", "hiredis==3.5.0"), "bullmq"),
    "raw": VenvSpec("raw", ("redis[hiredis]>=5",), "redis"),
}


def venv_root() -> Path:
    base = os.environ.get("REDFLOW_BENCH_VENVS")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "redflow-bench" / "venvs"


@dataclass
class Venv:
    spec: VenvSpec
    path: Path
    version: str = ""
    error: str = ""

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def ok(self) -> bool:
        return not self.error


def clean_env() -> dict[str, str]:
    """The environment for a baseline interpreter: no PYTHONPATH, no PYTHONHOME, no active venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _base_python() -> str:
    return shutil.which("python3") or getattr(sys, "_base_executable", sys.executable)


def _run(args: list[str], timeout_s: float) -> None:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout_s, env=clean_env(), cwd=str(venv_root())
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"{' '.join(args[:4])} ... exited {proc.returncode}: " + " | ".join(tail))


def _installed_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    proc = subprocess.run(
        [str(python), "-E", "-s", "-c", code], capture_output=True, text=True, timeout=60,
        env=clean_env(), cwd="/",
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cannot read the version of {dist}: {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip()


def ensure_venv(spec: VenvSpec, log: object = print) -> Venv:
    """Create (or reuse) the venv for ``spec``; failures are recorded in ``Venv.error``, never raised."""
    root = venv_root()
    venv = Venv(spec, root / spec.name)
    marker = venv.path / MARKER
    wanted = {"requirements": list(spec.requirements)}
    try:
        root.mkdir(parents=True, exist_ok=True)
        current = json.loads(marker.read_text()) if marker.exists() else None
        if current is None or current.get("requirements") != wanted["requirements"] or not venv.python.exists():
            if callable(log):
                log(f"installing baseline venv {spec.name}: {' '.join(spec.requirements)} -> {venv.path}")
            shutil.rmtree(venv.path, ignore_errors=True)
            _run([_base_python(), "-m", "venv", str(venv.path)], 300)
            pip = [str(venv.python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            _run([*pip, *spec.requirements], 900)
            marker.write_text(json.dumps(wanted))
        venv.version = _installed_version(venv.python, spec.probe)
    except Exception as exc:  # recorded and reported, the other systems still run
        venv.error = f"{type(exc).__name__}: {exc}"
    return venv


if __name__ == "__main__":  # python -m bench.venvs: prepare every baseline venv ahead of a run
    for s in SPECS.values():
        v = ensure_venv(s)
        print(s.name, v.version or v.error)
