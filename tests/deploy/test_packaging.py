"""Deployment packaging, checked without a Docker engine or a cluster.

- Kubernetes built-in objects: strict schema validation with kubernetes-validate's bundled schemas.
- The KEDA ScaledObject: the JSON Schema kept in deploy/schemas/.
- docker-compose.yml: the compose specification schema vendored in check-jsonschema.
- The Dockerfile: its install steps done for real in a fresh virtualenv (a wheel, no editable install),
  then its ENTRYPOINT run as an unprivileged user against the test server, drained with SIGTERM.
- The values that must agree across the Dockerfile, the compose file, the manifests and the docs.

The validators run without network access (in a new network namespace, where ``unshare`` is
allowed), which proves they need none.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "kubernetes"
KEDA_FILE = K8S_DIR / "keda" / "scaledobject.yaml"
KEDA_SCHEMA = ROOT / "deploy" / "schemas" / "keda-scaledobject.json"
COMPOSE_FILE = ROOT / "docker-compose.yml"
EXAMPLE_APP = ROOT / "examples" / "compose_app"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
VENV_BIN = Path(sys.executable).parent

# The oldest Kubernetes release the manifests are written for; they are also checked against the
# newest release whose schemas the installed kubernetes-validate ships.
MIN_KUBERNETES = "1.30.0"
# After SIGTERM the supervisor gives its worker processes the grace period plus this many seconds
# before it SIGKILLs them (Supervisor._shutdown); the manifests' stop timeouts must cover both.
_slack = re.search(r"grace_period_s \+ (\d+)", (ROOT / "src/redflow/supervisor/tree.py").read_text())
assert _slack, "Supervisor._shutdown changed: update the stop timeouts in the manifests and this test"
SUPERVISOR_KILL_SLACK_S = int(_slack.group(1))
ENTRYPOINT = ["python", "-m", "redflow.supervisor"]
NOBODY = 65534


# --- helpers ----------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it is part of the 'dev' extra")
    return found


@functools.cache
def offline_prefix() -> tuple[str, ...]:
    """A command prefix that cuts the network off (a fresh network namespace), or () where not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for args in ((unshare, "--net"), (unshare, "--map-root-user", "--net")):
        try:
            probe = subprocess.run([*args, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return args
    return ()


def run_offline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*offline_prefix(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def builtin_manifest_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


@functools.cache
def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in builtin_manifest_files():
        for doc in load_yaml(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} is defined twice"
            objects[key] = doc
    return objects


def k8s(kind: str, name: str) -> dict[str, Any]:
    return copy.deepcopy(k8s_objects()[(kind, name)])


def scaled_object() -> dict[str, Any]:
    (doc,) = load_yaml(KEDA_FILE)
    return doc


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name!r} of the Dockerfile"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                values[key] = value
        return values


@functools.cache
def dockerfile_stages(path: Path = ROOT / "Dockerfile") -> tuple[Stage, ...]:
    """The Dockerfile's stages: instructions with their continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    assert not pending, "the Dockerfile ends inside a continued line"
    return tuple(stages)


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def build_stage() -> Stage:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    return stages[0]


def exposed_port() -> int:
    (port,) = final_stage().last("EXPOSE").split()
    return int(port.split("/")[0])


def image_uid() -> int:
    user = final_stage().last("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user!r}: use a numeric uid so runAsNonRoot can check it"
    return int(uid)


def supervisor_env_vars() -> dict[str, str]:
    """Every supervisor option (as --flag) and the environment variable behind it, from its --help text."""
    from redflow.supervisor.config import build_parser

    mapping: dict[str, str] = {}
    for action in build_parser()._actions:
        flags = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
        if not flags:
            continue
        match = re.search(r"env (REDIS_URL|REDFLOW_[A-Z_]+)", action.help or "")
        assert match, f"{flags[0]} names no environment variable in its help"
        mapping[flags[0]] = match.group(1)
    return mapping


def example_workflows() -> dict[str, str]:
    """Workflow name -> queue, for every @workflow(...) in the example app (read, not imported)."""
    tree = ast.parse((EXAMPLE_APP / "workflows.py").read_text())
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "workflow":
                name = deco.args[0]
                assert isinstance(name, ast.Constant)
                queue: Any = "default"
                for kw in deco.keywords:
                    if kw.arg == "queue":
                        queue = kw.value.value if isinstance(kw.value, ast.Constant) else constants[kw.value.id]
                found[name.value] = queue
    assert found, "the example app defines no workflow"
    return found


def seconds(duration: str | int) -> float:
    """A compose duration such as '45s', '1m30s' or a plain number of seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"bad duration {duration!r}"
    return sum(float(a) * units[b] for a, b in parts)


# --- schema validation ---------------------------------------------------------------------------------------


def test_kubernetes_objects_validate_strictly_offline() -> None:
    from kubernetes_validate.utils import all_versions, latest_version

    assert MIN_KUBERNETES in all_versions(), f"kubernetes-validate ships no schemas for {MIN_KUBERNETES}"
    versions = sorted({MIN_KUBERNETES, latest_version()})
    files = builtin_manifest_files()
    args = [arg for v in versions for arg in ("-k", v)]
    result = run_offline(tool("kubernetes-validate"), "--strict", *args, *map(str, files))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # kubernetes-validate only warns (exit 0) about a kind it has no schema for: treat that as an error.
    assert "WARN" not in output, output
    passed = set(re.findall(r"^INFO \S+ passed for resource (\S+) against version (\S+)$", result.stdout, re.M))
    expected = {
        (f"{kind.lower()}/{name}", ".".join(v.split(".")[:2])) for (kind, name) in k8s_objects() for v in versions
    }
    assert passed == expected, output
    assert {kind for kind, _ in k8s_objects()} >= {
        "Namespace", "ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "StatefulSet"
    }


def test_strict_kubernetes_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    deployment = k8s("Deployment", "redflow-worker")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}  # misspelled
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = run_offline(tool("kubernetes-validate"), "--strict", "-k", MIN_KUBERNETES, str(bad))
    assert result.returncode == 1 and "'livenesProbe' was unexpected" in result.stdout, result.stdout


def test_scaledobject_matches_the_keda_schema_kept_in_the_repo() -> None:
    check = tool("check-jsonschema")
    meta = run_offline(check, "--check-metaschema", str(KEDA_SCHEMA))
    assert meta.returncode == 0, meta.stdout + meta.stderr
    result = run_offline(check, "--schemafile", str(KEDA_SCHEMA), str(KEDA_FILE))
    assert result.returncode == 0, result.stdout + result.stderr

    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(KEDA_SCHEMA.read_text()))
    assert not list(validator.iter_errors(scaled_object()))
    wrong_type = scaled_object()
    wrong_type["spec"]["triggers"][0]["metadata"]["listLength"] = 100  # KEDA wants strings
    unknown = scaled_object()
    unknown["spec"]["minReplicas"] = 1  # not a ScaledObject field
    no_list = scaled_object()
    del no_list["spec"]["triggers"][0]["metadata"]["listName"]
    for bad in (wrong_type, unknown, no_list):
        assert list(validator.iter_errors(bad)), bad


def test_compose_file_matches_the_compose_specification_offline(tmp_path: Path) -> None:
    check = tool("check-jsonschema")
    result = run_offline(check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    compose["services"]["worker"]["stop_grace_periodd"] = "45s"  # misspelled
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(compose))
    rejected = run_offline(check, "--builtin-schema", "vendor.compose-spec", str(bad))
    assert rejected.returncode == 1 and "stop_grace_periodd" in rejected.stdout, rejected.stdout


# --- values that must agree ------------------------------------------------------------------------------------


def test_dockerfile_shape() -> None:
    build, final = build_stage(), final_stage()
    assert final.base == build.base, "both stages must start from the same Python image"
    python_image = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert python_image and re.fullmatch(r"python:3\.11-slim(-\w+)?", python_image.group(1))
    assert "pip wheel --wheel-dir /wheels ." in build.last("RUN")
    install = " ".join(final.all("RUN"))
    assert "--no-index --find-links /wheels" in install and "/wheels/redflow-*.whl" in install
    assert "-e " not in install and "[embedded]" not in install
    assert json.loads(final.last("ENTRYPOINT")) == ENTRYPOINT
    assert final.all("CMD") == [], "arguments are the user's: no CMD"
    assert image_uid() != 0
    env = final.env()
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:"), "`python` must be the virtualenv's"
    assert int(env["REDFLOW_HTTP_PORT"]) == exposed_port()
    assert env["PYTHONPATH"] == final.last("WORKDIR")
    assert set(env) & {"REDIS_URL", "REDFLOW_IMPORT"} == set(), "the image must not pick a server or app"
    assert {k for k in env if k.startswith("REDFLOW_")} <= set(supervisor_env_vars().values())
    assert json.loads(final.last("HEALTHCHECK").split("CMD", 1)[1])[0] == "python"


def test_dockerfile_run_steps_pass_shellcheck(tmp_path: Path) -> None:
    """RUN lines run under /bin/sh in the image: check them as POSIX sh scripts."""
    for index, stage in enumerate(dockerfile_stages()):
        for n, args in enumerate(stage.all("RUN")):
            while args.startswith("--"):  # RUN options such as --mount=...
                args = args.split(None, 1)[1]
            script = tmp_path / f"stage{index}-run{n}.sh"
            script.write_text(f"#!/bin/sh\n{args}\n")
            result = subprocess.run([tool("shellcheck"), "--shell=sh", str(script)], capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 0, f"RUN {args}\n{result.stdout}"


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip()]
    rules = [r for r in rules if not r.startswith("#")]
    assert rules[0] == "*", "start from an empty context and admit files one by one"
    admitted = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for args in build_stage().all("COPY"):
        sources = shlex.split(args)[:-1]
        assert not any(s.startswith("--from") for s in sources)
        copied |= {s.rstrip("/") for s in sources}
    assert copied == admitted
    assert all((ROOT / path).exists() for path in copied)
    assert {"**/__pycache__", "**/*.py[cod]"} <= set(rules)


def test_kubernetes_manifests_agree_with_the_image_and_each_other() -> None:
    namespace = k8s("Namespace", "redflow")["metadata"]["name"]
    for (kind, name), obj in k8s_objects().items():
        if kind != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, f"{kind}/{name} is not in {namespace}"
    assert scaled_object()["metadata"]["namespace"] == namespace

    config = k8s("ConfigMap", "redflow-config")["data"]
    known_env = set(supervisor_env_vars().values())
    assert set(config) <= known_env, f"unknown settings: {set(config) - known_env}"
    assert int(config["REDFLOW_HTTP_PORT"]) == exposed_port()
    assert set(config["REDFLOW_IMPORT"].split(",")) == {"workflows"}
    assert (EXAMPLE_APP / "workflows.py").exists()

    deployment = k8s("Deployment", "redflow-worker")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "command" not in container and "args" not in container, "configure through the ConfigMap"
    assert {"configMapRef": {"name": "redflow-config"}} in container["envFrom"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": exposed_port()}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    grace = float(config["REDFLOW_GRACE_PERIOD"])
    assert pod["terminationGracePeriodSeconds"] >= grace + SUPERVISOR_KILL_SLACK_S
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    assert container["resources"]["limits"]["cpu"] and container["resources"]["limits"]["memory"]
    if container["securityContext"].get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "the supervisor's status files need a writable /tmp"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"

    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    pdb = k8s("PodDisruptionBudget", "redflow-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert "minAvailable" not in pdb["spec"], "minAvailable blocks node drains when only one pod runs"
    metrics = k8s("Service", "redflow-metrics")
    assert metrics["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["http"]
    assert metrics["metadata"]["annotations"]["prometheus.io/port"] == str(exposed_port())

    redis_service = k8s("Service", "redis")
    redis_host = f"{redis_service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert config["REDIS_URL"] == f"redis://{redis_host}:6379"
    redis = k8s("StatefulSet", "redis")
    assert redis["spec"]["serviceName"] == "redis"
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    redis_conf = k8s("ConfigMap", "redis-config")["data"]["redis.conf"].splitlines()
    for line in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"):
        assert line in redis_conf
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["mountPath"] == "/data"
    }


def test_keda_scales_the_deployment_on_the_ready_lists_of_the_apps_queues() -> None:
    from redflow.storage.keys import PartitionKeys

    config = k8s("ConfigMap", "redflow-config")["data"]
    spec = scaled_object()["spec"]
    assert spec["scaleTargetRef"]["name"] == "redflow-worker"
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "0 pods would stop timers, cron and recovery"
    keys = PartitionKeys(config["REDFLOW_PREFIX"])
    expected = {keys.ready(queue) for queue in example_workflows().values()}
    triggers = [t for t in spec["triggers"] if t["type"] == "redis"]
    assert {t["metadata"]["listName"] for t in triggers} == expected
    redis_url = config["REDIS_URL"].removeprefix("redis://")
    assert {t["metadata"]["address"] for t in triggers} == {redis_url}


def test_compose_file_settings() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]
    redis = services["redis"]
    assert redis["image"].split(":")[1].startswith("7")
    command = " ".join(redis["command"])
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert setting in command
    volume, target = redis["volumes"][0].split(":")[:2]
    assert target == "/data" and volume in compose["volumes"]

    worker = services["worker"]
    assert worker["build"]["context"] == "." and (ROOT / worker["build"]["dockerfile"]).exists()
    assert "entrypoint" not in worker and "command" not in worker
    env = worker["environment"]
    assert set(env) <= set(supervisor_env_vars().values())
    assert env["REDIS_URL"] == "redis://redis:6379"
    assert int(env["REDFLOW_HTTP_PORT"]) == exposed_port()
    assert worker["ports"] == [f"{exposed_port()}:{exposed_port()}"]
    assert seconds(worker["stop_grace_period"]) >= float(env["REDFLOW_GRACE_PERIOD"]) + SUPERVISOR_KILL_SLACK_S
    mounts = [m.split(":") for m in worker["volumes"]]
    app_mount = next(m for m in mounts if m[1] == final_stage().env()["PYTHONPATH"])
    assert (ROOT / app_mount[0]).resolve() == EXAMPLE_APP and app_mount[2:] == ["ro"]
    for module in env["REDFLOW_IMPORT"].split(","):
        assert (EXAMPLE_APP / f"{module}.py").exists()
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"

    enqueue = services["enqueue"]
    assert enqueue["image"] == worker["image"] and enqueue["profiles"] == ["demo"]
    assert (EXAMPLE_APP / Path(enqueue["entrypoint"][1]).name).exists()

    # examples/compose_app/Dockerfile bakes the same app into an image for Kubernetes.
    app_image = dockerfile_stages(EXAMPLE_APP / "Dockerfile")[-1]
    assert app_image.base == "${BASE_IMAGE}"
    assert f"ARG BASE_IMAGE={worker['image']}" in (EXAMPLE_APP / "Dockerfile").read_text()
    assert app_image.env()["REDFLOW_IMPORT"] == env["REDFLOW_IMPORT"]
    (container,) = k8s("Deployment", "redflow-worker")["spec"]["template"]["spec"]["containers"]
    assert f"docker build -t {container['image']} examples/compose_app" in (EXAMPLE_APP / "Dockerfile").read_text()


def test_operations_doc_covers_every_supervisor_option() -> None:
    doc = OPERATIONS_DOC.read_text()
    for flag, env in supervisor_env_vars().items():
        assert f"`{flag}`" in doc and f"`{env}`" in doc, f"{flag} / {env} missing from docs/operations.md"


# --- the image's install steps, and its ENTRYPOINT as a non-root user ---------------------------------------


NETWORK_FAILURES = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Name or service not known",
    "No matching distribution found",
    "Could not find a version that satisfies the requirement",
    "ProxyError",
    "ConnectTimeoutError",
)


def drop_privileges() -> list[str]:
    """Run as nobody when the tests run as root; as non-root already, run as is."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "nobody", "--"]
    pytest.fail("running as root, and neither setpriv nor runuser is there to drop privileges")


# Usable means: 3.11+, with venv and ensurepip, and the user can reach the binary and its standard
# library itself (an interpreter under an unreadable /root may start, but with another one's stdlib).
INTERPRETER_PROBE = """
import os, sys, venv, ensurepip
exe = os.path.realpath(sys.executable)
ok = sys.version_info >= (3, 11) and os.access(exe, os.X_OK) and os.access(os.__file__, os.R_OK)
sys.exit(0 if ok and exe.startswith(os.path.realpath(sys.base_prefix) + os.sep) else 1)
"""


def runtime_interpreter(unprivileged: list[str]) -> str:
    """A Python 3.11+ the unprivileged user can run (a pyenv Python under /root is not one)."""
    candidates = [
        getattr(sys, "_base_executable", sys.executable),
        shutil.which("python3.11"),
        "/usr/local/bin/python3.11",
        "/usr/bin/python3.11",
        shutil.which("python3"),
    ]
    seen: set[str] = set()
    for candidate in candidates:
        if not candidate or not os.path.exists(candidate) or os.path.realpath(candidate) in seen:
            continue
        seen.add(os.path.realpath(candidate))
        probe = subprocess.run([*unprivileged, candidate, "-c", INTERPRETER_PROBE], capture_output=True, cwd="/",
                               timeout=30)
        if probe.returncode == 0:
            return candidate
    pytest.fail(f"no Python 3.11+ with venv and ensurepip that uid {NOBODY} may run among {candidates}")


def run_step(args: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, **kwargs)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if what == "building the wheels" and any(m in output for m in NETWORK_FAILURES):
            pytest.skip(f"cannot build the wheels offline: pip could not download the build backend or "
                        f"the dependencies from the package index:\n{output[-1500:]}")
        pytest.fail(f"{what} failed ({' '.join(args)}):\n{output[-4000:]}")
    return result


def image_environment(venv: Path, app: Path, base: dict[str, str]) -> dict[str, str]:
    """The final stage's ENV, with its paths moved into the temporary directory."""
    final = final_stage()
    venv_dir, app_dir = final.env()["VIRTUAL_ENV"], final.last("WORKDIR")
    env = dict(base)
    for key, value in final.env().items():
        value = value.replace("$PATH", base.get("PATH", os.defpath))
        value = re.sub(rf"(?<![\w/]){re.escape(venv_dir)}(?=/|:|$)", str(venv), value)
        value = re.sub(rf"(?<![\w/]){re.escape(app_dir)}(?=/|:|$)", str(app), value)
        env[key] = value
    return env


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@dataclass
class Installed:
    """redflow installed the way the image installs it, with the example app next to it."""

    work: Path
    venv: Path
    app: Path
    unprivileged: list[str]
    env: dict[str, str] = field(default_factory=dict)
    supervisor: subprocess.Popen[str] | None = None

    @property
    def log_path(self) -> Path:
        return self.work / "supervisor.log"

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


def install_like_the_image(work: Path) -> Installed:
    """The Dockerfile's steps, in ``work``: COPY the build context, `pip wheel` it, install the wheels
    into a fresh virtualenv (no index, no editable install), then check the unprivileged user can use it."""
    unprivileged = drop_privileges()
    python = runtime_interpreter(unprivileged)
    work.chmod(0o755)
    context, wheels, venv, app = work / "context", work / "wheels", work / "venv", work / "app"
    # Build stage: COPY what it copies (only what .dockerignore admits), then `pip wheel` it.
    for args in build_stage().all("COPY"):
        *sources, dest = shlex.split(args)
        for source in sources:
            target = context / dest / Path(source).name if dest.endswith("/") else context / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target)
    pip_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    pip_env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}
    run_step([python, "-m", "venv", str(venv)], "creating the virtualenv", env=pip_env)
    vpython = str(venv / "bin" / "python")
    run_step([vpython, "-m", "pip", "wheel", "--wheel-dir", str(wheels), str(context)], "building the wheels",
             env=pip_env, cwd=context)
    # Runtime stage: the redflow wheel and its dependencies, from the wheels only.
    (redflow_wheel,) = wheels.glob("redflow-*.whl")
    run_step([vpython, "-m", "pip", "install", "--no-cache-dir", "--no-index", "--find-links", str(wheels),
              str(redflow_wheel)], "installing the wheel", env=pip_env)
    shutil.copytree(EXAMPLE_APP, app, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))

    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("REDFLOW_", "PYTHON", "PIP_")) and k not in ("REDIS_URL", "VIRTUAL_ENV")}
    installed = Installed(work, venv, app, unprivileged, image_environment(venv, app, base_env) | {"HOME": str(app)})
    where = run_step([*unprivileged, "python", "-c", "import redflow; print(redflow.__file__)"],
                     "importing redflow as the unprivileged user", env=installed.env, cwd=app)
    assert Path(where.stdout.strip()).is_relative_to(venv / "lib"), "redflow must come from the wheel"
    cli = subprocess.run([*unprivileged, "redflow", "supervisor", "--import", "no_such_module_xyz"],
                         env=installed.env, cwd=app, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "cannot import workflow module" in cli.stderr, cli.stderr
    return installed


def start_entrypoint(installed: Installed, *args: str) -> subprocess.Popen[str]:
    """The image's ENTRYPOINT with ``args``, as the unprivileged user, stderr to a log file."""
    with open(installed.log_path, "w") as log:
        installed.supervisor = subprocess.Popen(
            [*installed.unprivileged, *json.loads(final_stage().last("ENTRYPOINT")), *args],
            env=installed.env, cwd=installed.app, stdout=subprocess.DEVNULL, stderr=log, text=True,
        )
    return installed.supervisor


def wait_for(installed: Installed, condition: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        supervisor = installed.supervisor
        assert supervisor is None or supervisor.poll() is None, (
            f"the supervisor exited with {supervisor.returncode}:\n{installed.log()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{installed.log()}"
        time.sleep(0.2)


def check_running_tree(installed: Installed, port: int) -> list[psutil.Process]:
    assert installed.supervisor is not None
    processes = [psutil.Process(installed.supervisor.pid), *psutil.Process(installed.supervisor.pid).children()]
    assert len(processes) == 2, processes
    for process in processes:
        assert 0 not in process.uids(), f"{process} runs as root"
        assert any(str(installed.venv) in m.path for m in process.memory_maps()), "not the virtualenv's Python"
    healthcheck = json.loads(final_stage().last("HEALTHCHECK").split("CMD", 1)[1])
    env = installed.env | {"REDFLOW_HTTP_PORT": str(port)}
    assert subprocess.run([*installed.unprivileged, *healthcheck], env=env, cwd=installed.app,
                          timeout=30).returncode == 0, "the image's HEALTHCHECK failed"
    return processes


def clean_up(installed: Installed, remove: bool = True) -> None:
    supervisor = installed.supervisor
    if supervisor is not None and supervisor.poll() is None:
        for child in psutil.Process(supervisor.pid).children(recursive=True):
            child.kill()
        supervisor.kill()
        supervisor.wait()
    if remove:
        shutil.rmtree(installed.work, ignore_errors=True)


def documented_metrics() -> set[str]:
    section = OPERATIONS_DOC.read_text().split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(redflow_[a-z_]+)`", section, re.M))


def served_metrics(port: int) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", http_get(port, "/metrics")[1], re.M))


def runs_counted(port: int, workflow: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(http_get(port, "/metrics")[1])
        for sample in family.samples
        if sample.name == "redflow_runs_total" and sample.labels == {"workflow": workflow, "outcome": "succeeded"}
    )


async def test_operations_doc_lists_exactly_the_metrics_the_supervisor_serves(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """The supervisor of this checkout, running the example app: after one run and one leader sample,
    it serves every metric the guide lists, and nothing else."""
    from redflow import create_client
    from redflow.embedded import free_port

    documented = documented_metrics()
    assert documented, "no metrics table in the Metrics section of docs/operations.md"
    doc = OPERATIONS_DOC.read_text()
    mentioned = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"redflow_[a-z]+(?:_[a-z]+)+", doc)}
    assert mentioned <= documented, f"the guide mentions metrics it does not list: {mentioned - documented}"

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDFLOW_", "PYTHON")) and k != "REDIS_URL"}
    env |= {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.defpath)}", "PYTHONPATH": str(EXAMPLE_APP),
            "PYTHONDONTWRITEBYTECODE": "1"}
    running = Installed(tmp_path, Path(sys.prefix), EXAMPLE_APP, [], env)
    client = create_client(url=redis_url, prefix=prefix)
    try:
        supervisor = await asyncio.to_thread(
            start_entrypoint, running, "--procs", "1", "--import", "workflows", "--url", redis_url, "--prefix",
            prefix, "--http-port", str(port), "--lease-ms", "1500", "--grace-period", "5",
        )
        await asyncio.to_thread(wait_for, running, lambda: http_get(port, "/readyz")[0] == 200, "/readyz", 30)
        (workflow_name, _), *_ = example_workflows().items()
        order = {"order_id": "o-2", "email": "b@example.com", "items": [{"sku": "tea", "qty": 1, "price_cents": 1}]}
        await (await client.run_by_name(workflow_name, order)).result(timeout_ms=30_000)
        await asyncio.to_thread(wait_for, running, lambda: served_metrics(port) >= documented,
                                f"/metrics to serve {sorted(documented)}", 20)
        assert served_metrics(port) == documented
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 30) == 0, running.log()
    finally:
        await client.close()
        await asyncio.to_thread(clean_up, running, False)


@pytest.mark.timeout(300)
async def test_wheel_install_and_entrypoint_as_non_root(redis_url: str, prefix: str) -> None:
    from redflow import RedflowClient, create_client
    from redflow.embedded import free_port

    old_umask = os.umask(0o022)  # what the image's RUN steps leave: files readable by the worker's user
    work = Path(tempfile.mkdtemp(prefix="redflow-image-"))
    installed = Installed(work, work / "venv", work / "app", [])
    client: RedflowClient | None = None
    try:
        installed = await asyncio.to_thread(install_like_the_image, work)
        port = free_port()
        installed.env["REDFLOW_HTTP_PORT"] = str(port)  # as `docker run -e` would
        supervisor = await asyncio.to_thread(
            start_entrypoint, installed, "--procs", "1", "--import", "workflows", "--url", redis_url,
            "--prefix", prefix, "--lease-ms", "1500", "--grace-period", "5",
        )
        await asyncio.to_thread(wait_for, installed, lambda: http_get(port, "/readyz")[0] == 200, "/readyz", 40)
        processes = await asyncio.to_thread(check_running_tree, installed, port)

        (workflow_name, queue), *_ = example_workflows().items()
        client = create_client(url=redis_url, prefix=prefix)
        order = {"order_id": "o-1", "email": "a@example.com", "items": [{"sku": "tea", "qty": 3, "price_cents": 450}]}
        handle = await client.run_by_name(workflow_name, order)  # by name: the worker published its metadata
        result = await handle.result(timeout_ms=30_000)
        assert result == {"order_id": "o-1", "units": 3, "charged_cents": 1350, "receipt_sent": True}
        run = await client.get_run(handle.id)
        assert run is not None and run["queue"] == queue

        await asyncio.to_thread(wait_for, installed, lambda: runs_counted(port, workflow_name) >= 1,
                                "/metrics to count the run", 10)
        assert served_metrics(port) <= documented_metrics()

        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 30) == 0, installed.log()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes[1:])
        assert "stopped" in installed.log()
    finally:
        os.umask(old_umask)
        if client is not None:
            await client.close()
        await asyncio.to_thread(clean_up, installed)
