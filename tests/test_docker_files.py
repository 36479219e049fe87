"""Specifications of the container files that can be checked without a Docker engine: pinned images,
the entry point and command, no model baked in, a non-root user, and compose wiring."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
# The CLI's subcommands; kept in step with service.cli.main.
SUBCOMMANDS = set(cli.commands)
MODEL_SUFFIXES = (".gguf", ".bin", ".safetensors", ".pt", ".onnx")


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        values = [v for k, v in self.instructions if k == keyword]
        return values[-1] if values else None

    def all(self, keyword: str) -> list[str]:
        return [v for k, v in self.instructions if k == keyword]


def logical_lines(text: str) -> list[str]:
    """Dockerfile lines with comments dropped and backslash continuations joined."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def parse_dockerfile(path: Path) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            image = substitute(rest.split()[0], global_args)
            stages.append(Stage(base=image))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name] = default.strip('"')
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), value
    return parsed


def is_pinned(image: str) -> bool:
    """`name:tag` or `name:tag@sha256:...` with a versioned tag (not `latest`, has a digit)."""
    name, _, digest = image.partition("@")
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return False
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.split(":", 1)[1]
    return bool(tag) and "latest" not in tag and any(c.isdigit() for c in tag)


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("python:3.11.14-slim-bookworm@sha256:" + "a" * 64, True),
        ("hapiproject/hapi:v8.4.0", True),
        ("localhost:5000/chartbrief:0.1.0", True),
        ("postgres", False),
        ("postgres:latest", False),
        ("hapiproject/hapi:latest", False),
        ("localhost:5000/chartbrief", False),
        ("python:slim", False),
        ("python:3.11@sha256:short", False),
    ],
)
def test_is_pinned_accepts_only_versioned_tags(image: str, pinned: bool) -> None:
    assert is_pinned(image) is pinned


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


# -- Dockerfiles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_is_pinned(path: Path) -> None:
    stages = parse_dockerfile(path)
    assert stages, f"{path.name} has no FROM"
    for stage in stages:
        assert "$" not in stage.base, f"{path.name}: FROM {stage.base} uses an ARG without a default"
        assert is_pinned(stage.base), f"{path.name}: FROM {stage.base} is not pinned"


def test_cpu_base_image_is_pinned_by_digest_too() -> None:
    for stage in parse_dockerfile(DOCKER / "Dockerfile"):
        assert "@sha256:" in stage.base


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_chartbrief_and_command_is_a_subcommand(path: Path) -> None:
    final = parse_dockerfile(path)[-1]
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and cmd is not None
    assert exec_form(entrypoint) == ["chartbrief"]
    assert exec_form(cmd)[0] in SUBCOMMANDS


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_as_a_non_root_user(path: Path) -> None:
    user = parse_dockerfile(path)[-1].last("USER")
    assert user is not None, f"{path.name}: the final stage sets no USER"
    name = user.split(":")[0]
    assert name not in {"root", "0"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_model_file_is_copied_into_the_image(path: Path) -> None:
    for stage in parse_dockerfile(path):
        for keyword in ("COPY", "ADD"):
            for value in stage.all(keyword):
                words = [w for w in shlex.split(value) if not w.startswith("--")]
                for source in words[:-1]:
                    assert not source.lower().endswith(MODEL_SUFFIXES), f"{path.name}: {keyword} {value}"
                    assert "model" not in source.lower(), f"{path.name}: {keyword} {value}"
                assert not value.lower().startswith("http"), f"{path.name}: downloads {value}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_model_is_read_from_the_models_volume(path: Path) -> None:
    final = parse_dockerfile(path)[-1]
    env = " ".join(final.all("ENV"))
    assert "CHARTBRIEF_LLM__MODEL_PATH=/models/" in env
    assert any("/models" in v for v in final.all("VOLUME"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_source_exists_in_the_repository(path: Path) -> None:
    for stage in parse_dockerfile(path):
        for value in stage.all("COPY"):
            if "--from=" in value:
                continue
            words = [w for w in shlex.split(value) if not w.startswith("--")]
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"


@pytest.mark.parametrize(
    ("path", "required"),
    [(DOCKER / "Dockerfile", "GGML_NATIVE=OFF"), (DOCKER / "Dockerfile.cuda", "GGML_CUDA=on")],
    ids=["cpu", "cuda"],
)
def test_llama_cpp_is_built_with_the_cmake_args_build_argument(path: Path, required: str) -> None:
    build = parse_dockerfile(path)[0]
    args = dict(a.partition("=")[::2] for a in build.all("ARG"))
    assert required in args.get("CMAKE_ARGS", ""), "CMAKE_ARGS default"
    installs = [r for r in build.all("RUN") if "llama-cpp-python" in r]
    assert installs and all('CMAKE_ARGS="${CMAKE_ARGS}"' in r for r in installs)


def test_cuda_image_offloads_layers_to_the_gpu() -> None:
    env = " ".join(parse_dockerfile(DOCKER / "Dockerfile.cuda")[-1].all("ENV"))
    assert re.search(r"CHARTBRIEF_LLM__N_GPU_LAYERS=-?\d+", env)


# -- compose ---------------------------------------------------------------------------------------------


def test_every_compose_image_is_pinned() -> None:
    services = compose()["services"]
    assert {"chartbrief", "hapi", "postgres"} <= set(services)
    for name, service in services.items():
        image = service.get("image")
        assert image, f"service {name} has no image"
        assert is_pinned(image), f"service {name}: image {image} is not pinned"


def test_compose_builds_chartbrief_from_the_cpu_dockerfile() -> None:
    build = compose()["services"]["chartbrief"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()


def test_compose_wires_chartbrief_to_hapi_and_postgres() -> None:
    services = compose()["services"]
    env = services["chartbrief"]["environment"]
    assert env["CHARTBRIEF_FHIR__BASE_URL"] == "http://hapi:8080/fhir"
    assert env["CHARTBRIEF_DB__URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["CHARTBRIEF_DB__URL"]
    assert env["CHARTBRIEF_LLM__MODEL_PATH"].startswith("/models/")
    assert services["chartbrief"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["hapi"]["image"].startswith("hapiproject/hapi:")


def test_compose_mounts_the_model_read_only_and_bakes_no_secret() -> None:
    services = compose()["services"]
    mounts = services["chartbrief"]["volumes"]
    models = [m for m in mounts if isinstance(m, dict) and m.get("target") == "/models"]
    assert models and models[0]["read_only"] is True
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${POSTGRES_PASSWORD"), "the database password must come from the environment"


def test_compose_command_is_a_subcommand() -> None:
    command = compose()["services"]["chartbrief"].get("command")
    if command is not None:
        assert command[0] in SUBCOMMANDS
