"""Developer scripts: shellcheck-clean, and their dry runs print what they would do."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "redis-container.sh"


def test_redis_container_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(__import__("sys").executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_redis_container_dry_run_prints_the_docker_command() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--port", "7001", "--name", "rf"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("docker run --detach --name rf --publish 127.0.0.1:7001:6379")
    assert "--appendonly yes --appendfsync everysec --maxmemory-policy noeviction" in out
    assert "REDIS_URL=redis://127.0.0.1:7001" in out
    bad = subprocess.run(["bash", str(SCRIPT), "--port", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--port must be a number" in bad.stderr
