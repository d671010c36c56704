"""The container files: docker/Dockerfile, docker/compose.yaml (+ compose.s3.yaml), .dockerignore,
.ci/container.sh.

The contract checks below read the files and always run (milliseconds). The real checks --
hadolint, Compose validation, building the image with podman and training inside it -- are
what `.ci/container.sh` does; CI runs that script directly. Here they run only on request:

    NBODY_DT_CONTAINER_TESTS=1 pytest tests/test_container.py

(root is needed: the script installs podman/debootstrap with apt-get when missing and runs
rootful podman; a cold first run takes about 10 minutes, a warm one about 2).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
COMPOSE_S3 = ROOT / "docker" / "compose.s3.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
SCRIPT = ROOT / ".ci" / "container.sh"

REAL = os.environ.get("NBODY_DT_CONTAINER_TESTS") == "1"
needs_opt_in = pytest.mark.skipif(not REAL, reason="set NBODY_DT_CONTAINER_TESTS=1 to build and run the image")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _pinned(image: str) -> bool:
    """A tag that is not `latest` (or a digest)."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


# -- Dockerfile ---------------------------------------------------------------------------------

def test_dockerfile_base_image_is_a_pinned_build_argument():
    ins = _instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert _pinned(args["BASE_IMAGE"]), args["BASE_IMAGE"]
    froms = [a.split()[0] for i, a in ins if i == "FROM"]
    assert froms[-1] == "${BASE_IMAGE}"  # the final stage is the configurable base
    assert all(f in ("scratch", "${BASE_IMAGE}") for f in froms), froms


def test_dockerfile_runs_nbody_dt_as_non_root():
    ins = _instructions(DOCKERFILE.read_text())
    users = [a for i, a in ins if i == "USER"]
    assert users, "no USER instruction"
    last = users[-1]
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), last).split(":")[0]
    assert uid not in ("0", "root") and uid.isdigit(), last
    entry = [a for i, a in ins if i == "ENTRYPOINT"][-1]
    assert json.loads(entry) == ["nbody-dt"]
    assert json.loads([a for i, a in ins if i == "CMD"][-1]) == ["--help"]


def test_dockerfile_installs_torch_before_the_project():
    runs = [a for i, a in _instructions(DOCKERFILE.read_text()) if i == "RUN"]
    torch_at = next(n for n, a in enumerate(runs) if "$TORCH_SPEC" in a)
    project_at = next(n for n, a in enumerate(runs) if "pip install" in a and "/app" in a)
    assert torch_at < project_at
    assert "from=torch-wheels" in runs[torch_at]  # the optional local wheel directory


def test_dockerfile_sets_up_ephemeral_prefect():
    env = " ".join(a for i, a in _instructions(DOCKERFILE.read_text()) if i == "ENV")
    for key in ("PREFECT_HOME=", "PREFECT_SERVER_ANALYTICS_ENABLED=false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120"):
        assert key in env


def test_every_hadolint_ignore_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("=", 1)[1].split(",")
            reason = "\n".join(lines[max(0, n - 4):n])
            for rule in rules:
                assert rule.strip() in reason, f"line {n + 1}: no comment explains ignoring {rule}"


def test_dockerignore_keeps_what_pip_install_needs():
    rules = [r.strip() for r in DOCKERIGNORE.read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"  # an allow-list
    for needed in ("!pyproject.toml", "!README.md", "!nbody_dt/", "!prefect.yaml", "!configs/"):
        assert needed in rules, needed


# -- compose ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_s3() -> dict:
    return yaml.safe_load(COMPOSE_S3.read_text())


SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH|TOKEN|KEY|ROOT_USER")


def test_compose_secrets_have_no_defaults():
    """Every secret is a required variable (`${VAR:?message}`): compose stops, naming it, when
    it is missing; none has a default value and none is written into the files."""
    required = set()
    for path in (COMPOSE, COMPOSE_S3):
        for name, op, rest in re.findall(r"\$\{(\w+)(:?[-?]|)([^}]*)\}", path.read_text()):
            if SECRET_NAME.search(name):
                assert op == ":?" and f"set {name}" in rest, f"{path.name}: ${{{name}{op}{rest}}}"
                required.add(name)
    assert {"POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= required


def test_compose_prefect_api_needs_auth(compose):
    services = compose["services"]
    assert "PREFECT_API_AUTH_STRING" in services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    for name in ("prefect-deploy", "prefect-worker"):
        assert "PREFECT_API_AUTH_STRING" in services[name]["environment"], name


def test_compose_extra_pip_packages_are_pinned(compose):
    default = re.search(r"\$\{NBODY_DT_EXTRA_PIP_PACKAGES:-([^}]*)\}", COMPOSE.read_text()).group(1).split()
    names = {spec.split("==")[0] for spec in default}
    assert {"dask-cuda", "bokeh", "dask", "distributed"} <= names
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", spec) for spec in default), default


def test_compose_has_the_stack(compose):
    services = compose["services"]
    for name in ("postgres", "prefect-server", "dask-scheduler", "dask-gpu-worker", "prefect-worker"):
        assert name in services, name
    url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:" in url
    assert services["dask-gpu-worker"]["command"][:2] == ["cuda", "worker"]
    assert services["dask-gpu-worker"]["entrypoint"] == ["dask"]
    worker = services["prefect-worker"]
    assert worker["command"][:3] == ["worker", "start", "--pool"]
    assert "process" in worker["command"]
    assert any(str(v).split(":")[1] == "/runs" for v in worker["volumes"])


def test_compose_gpu_workers_reserve_nvidia_gpus(compose):
    devices = compose["services"]["dask-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_ports_are_loopback_only(compose, compose_s3):
    published = 0
    for name, service in [*compose["services"].items(), *compose_s3["services"].items()]:
        for port in service.get("ports", []):
            published += 1
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    assert published >= 3


def test_compose_images_are_pinned(compose, compose_s3):
    for name, service in [*compose["services"].items(), *compose_s3["services"].items()]:
        image = service.get("image", "")
        if image.startswith("${"):  # our own image, built from docker/Dockerfile by compose.yaml
            assert "build" in service or name in compose_s3["services"], name
            assert image == compose["x-nbody-dt"]["image"], name
            continue
        assert _pinned(image), f"{name}: {image}"


# -- the real thing (opt-in) --------------------------------------------------------------------

def _script(mode: str, tmp_path: Path, timeout: float) -> dict:
    summary = tmp_path / "summary.json"
    env = dict(os.environ, NBODY_DT_CONTAINER_SUMMARY=str(summary), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), mode], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(summary.read_text())


@needs_opt_in
def test_hadolint_and_compose_validation(tmp_path):
    timings = _script("lint", tmp_path, timeout=600)
    assert timings["exit_code"] == 0


@pytest.mark.slow
@needs_opt_in
def test_image_builds_trains_and_the_host_reads_the_run(tmp_path):
    timings = _script("all", tmp_path, timeout=1800)
    assert timings["exit_code"] == 0
    for step in ("build", "run-help", "run-train", "host-report"):
        assert step in timings, step
