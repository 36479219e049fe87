"""`chartbrief eval run`: summarize patients without writing back and report what the summaries are worth.

Parses the options, opens the record source (a folder of bundle files, or a FHIR server) and the
engines, calls `service.eval.run.evaluate` once, and writes report.json and report.html through
`service.eval.report`. Bad input is one line naming the file or option, exit code 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import click
import structlog
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fhir_adapters.auth import StaticToken
from fhir_adapters.bundle_source import BundleFolder
from fhir_adapters.client import FhirClient
from fhir_adapters.models import ModelIdentity
from service.cli.common import (
    EXIT_BAD_INPUT,
    ChartbriefCommand,
    build_settings,
    fail,
    json_option,
    model_path_option,
    optional_fhir_base_option,
    run,
)
from service.config import LlmSettings, Settings
from service.eval import run as evalrun
from service.fhir import fhir_client
from service.llm import create_engine
from service.llm.base import Engine, Generation, GenerationRequest
from service.logging import configure_logging

log = structlog.get_logger(__name__)

# --compare KEY=VALUE: the settings a second configuration may change, and where each goes.
COMPARE_KEYS: dict[str, str] = {
    "model_path": "llm__model_path",
    "prompt_version": "prompt",
    "prompt": "prompt",
    "n_ctx": "llm__n_ctx",
    "n_threads": "llm__n_threads",
    "seed": "llm__seed",
    "temperature": "llm__temperature",
    "top_p": "llm__top_p",
    "max_tokens": "llm__max_tokens",
}


def prompt_spec(current: str, version: str) -> str:
    """`task/vN` with another version of the same task.

    >>> prompt_spec("summary/v1", "v2"), prompt_spec("summary/v1", "other/v3")
    ('summary/v2', 'other/v3')
    """
    if "/" in version:
        return version
    return f"{current.partition('/')[0]}/{version}"


def compare_overrides(items: Sequence[str], base_prompt: str) -> dict[str, Any]:
    """`--compare` values as `build_settings` overrides (raises `EvalInputError` naming the item).

    >>> compare_overrides(["model_path=/m/b.gguf", "prompt_version=v2"], "summary/v1")
    {'llm__model_path': '/m/b.gguf', 'prompt': 'summary/v2'}
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value.strip():
            raise evalrun.EvalInputError(f"--compare {item!r}: expected KEY=VALUE")
        if key not in COMPARE_KEYS:
            raise evalrun.EvalInputError(
                f"--compare {item!r}: unknown key {key!r}; one of {', '.join(sorted(COMPARE_KEYS))}"
            )
        target = COMPARE_KEYS[key]
        overrides[target] = prompt_spec(base_prompt, value.strip()) if target == "prompt" else value.strip()
    return overrides


@click.command(cls=ChartbriefCommand, name="run")
@click.option(
    "--bundles",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of FHIR Bundles (.json, .json.gz; searched recursively), one record source.",
)
@optional_fhir_base_option
@click.option(
    "--patients",
    "patients_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="File of patient ids, one a line (# comments); default: every patient of the source.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=True), help="Report folder.")
@model_path_option
@click.option("--prompt-version", default=None, help="Prompt version of the summary task, e.g. v1.")
@click.option(
    "--compare",
    multiple=True,
    metavar="KEY=VALUE",
    help="Run the same patients again with this setting changed (model_path, prompt_version, seed, "
    "temperature, n_ctx, ...); repeat for several.",
)
@json_option("the overall figures")
@click.pass_context
@run
async def run_eval(
    ctx: click.Context,
    bundles: Path | None,
    fhir_base: str | None,
    patients_file: Path | None,
    out: Path,
    model_path: str | None,
    prompt_version: str | None,
    compare: tuple[str, ...],
    as_json: bool,
) -> None:
    """Summarize patients from --bundles files or a --fhir-base server; write report.json + report.html."""
    if (
        bundles is not None
        and ctx.get_parameter_source("fhir_base") == click.core.ParameterSource.ENVIRONMENT
    ):
        fhir_base = None  # an explicit --bundles wins over a server configured in the environment
    if (bundles is None) == (fhir_base is None):
        fail("give exactly one of --bundles DIR and --fhir-base URL", EXIT_BAD_INPUT)
    configurations = _configurations(fhir_base, model_path, prompt_version, compare)
    wanted = _read_patients(patients_file)
    obj = ctx.obj or {}
    factory = _engine_factory(obj.get("engine"), obj.get("engine_factory"))
    async with _open_source(configurations[0].settings, bundles, wanted, patients_file) as (source, client):
        with _progress(configurations[0].settings, len(source.patient_ids())) as on_progress:
            runs = await evalrun.evaluate(source, configurations, factory, client, on_progress=on_progress)
    # deferred: the report draws its plots with matplotlib, whose import (~0.7 s) every other
    # command would otherwise pay at start, the nightly batch's nothing-changed run among them
    from service.eval.report import build_report, machine, write_report

    report = build_report(runs, source=source.description, machine=machine())
    json_path, html_path = write_report(report, out)
    log.info("eval.report", patients=len(runs[0].patients), configurations=len(runs))
    if as_json:
        click.echo(json.dumps(_summary_json(report, json_path, html_path), indent=2))
    else:
        click.echo(render_text(report, json_path, html_path))


def _configurations(
    fhir_base: str | None, model_path: str | None, prompt_version: str | None, compare: Sequence[str]
) -> list[evalrun.Configuration]:
    first = build_settings(fhir__base_url=fhir_base, llm__model_path=model_path)
    if prompt_version:
        first = build_settings(
            fhir__base_url=fhir_base,
            llm__model_path=model_path,
            prompt=prompt_spec(first.prompt, prompt_version),
        )
    configurations = [evalrun.Configuration("A", first)]
    if compare:
        overrides = compare_overrides(compare, first.prompt)
        second = build_settings(
            **{
                "fhir__base_url": fhir_base,
                "llm__model_path": model_path,
                "prompt": first.prompt,
                **overrides,
            }
        )
        configurations.append(evalrun.Configuration("B", second))
    return configurations


@asynccontextmanager
async def _open_source(
    settings: Settings, bundles: Path | None, wanted: list[str] | None, patients_file: Path | None
) -> AsyncIterator[tuple[evalrun.RecordSource, FhirClient]]:
    """The record source and the client the pipeline names as the summaries' server."""
    listed_in = f"--patients {patients_file}"
    if bundles is not None:
        folder = BundleFolder.scan(bundles)
        ids = evalrun.select_patients(folder.patient_ids(), wanted, listed_in, f"the bundles under {bundles}")
        async with FhirClient(evalrun.BUNDLE_BASE_URL) as placeholder:
            yield evalrun.BundleRecords(folder, tuple(ids)), placeholder
        return
    auth = StaticToken(settings.fhir.bearer_token) if settings.fhir.bearer_token else None
    async with fhir_client(settings.fhir, auth=auth) as client:
        if wanted is None:
            ids = await _all_patients(client)
        else:
            await evalrun.check_patients_exist(client, wanted, listed_in)
            ids = wanted
        yield evalrun.ServerRecords(client, tuple(ids)), client


def _read_patients(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise evalrun.EvalInputError(f"--patients {path}: cannot be read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise evalrun.EvalInputError(f"--patients {path}: not UTF-8 text") from exc
    return evalrun.read_patient_list(text, str(path))


def _engine_factory(engine: Engine | None, factory: evalrun.EngineFactory | None) -> evalrun.EngineFactory:
    """The engines to run: an embedding program's (tests hand one over through ctx.obj), else llama.cpp."""
    if factory is not None:
        return factory
    if engine is not None:
        return _Borrowed(engine)
    return create_engine


class _Borrowed:
    """Always the caller's engine, which the caller closes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __call__(self, settings: LlmSettings) -> Engine:  # noqa: ARG002 - one engine for every setting
        return _Unclosed(self._engine)


class _Unclosed:
    """An engine that the eval may close without closing the caller's."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def identity(self) -> ModelIdentity:
        return self._engine.identity

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx

    def count_tokens(self, text: str) -> int:
        return self._engine.count_tokens(text)

    async def generate(self, request: GenerationRequest) -> Generation:
        return await self._engine.generate(request)

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        return self._engine.stream(request)

    async def aclose(self) -> None:
        return None


async def _all_patients(client: FhirClient) -> list[str]:
    found = await client.search_all("Patient", {})
    ids = [str(p["id"]) for p in found if isinstance(p, dict) and p.get("id")]
    if not ids:
        raise evalrun.EvalInputError(f"--fhir-base {client.base_url}: the server holds no Patient")
    return ids


@contextmanager
def _progress(settings: Settings, patients: int) -> Iterator[evalrun.ProgressCallback | None]:
    """A progress bar on a terminal; elsewhere the per-patient log lines say how far it got.

    Under the bar only warnings are logged: info lines written around it would tear it.
    """
    if not sys.stderr.isatty():
        yield None
        return
    configure_logging(fmt=settings.log_format, level="WARNING")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, transient=False) as bar:
            tasks: dict[str, TaskID] = {}

            def advance(event: evalrun.Progress) -> None:
                if event.configuration not in tasks:
                    tasks[event.configuration] = bar.add_task(
                        f"configuration {event.configuration}", total=patients
                    )
                bar.update(tasks[event.configuration], completed=event.done)

            yield advance
    finally:
        configure_logging(fmt=settings.log_format, level=settings.log_level)


def _summary_json(report: dict[str, Any], json_path: Path, html_path: Path) -> dict[str, Any]:
    return {
        "report": str(json_path),
        "html": str(html_path),
        "configuration": report["configuration"],
        "overall": report["overall"],
        "by_sex": report["by_sex"],
        "by_age_band": report["by_age_band"],
        "compare": None
        if report["compare"] is None
        else {
            "configuration": report["compare"]["configuration"],
            "overall": report["compare"]["overall"],
            "by_sex": report["compare"]["by_sex"],
            "by_age_band": report["compare"]["by_age_band"],
        },
    }


def render_text(report: dict[str, Any], json_path: Path, html_path: Path) -> str:
    """The figures in a few lines, one per configuration and group."""
    lines = []
    for part in report["runs"]:
        c = part["configuration"]
        lines.append(
            f"{c['name']}: {c['model']['file']} sha256:{c['model_sha256'][:12]}... "
            f"prompt {c['prompt_id']}/{c['prompt_version']} sha256:{c['prompt_sha256'][:12]}..."
        )
        groups = [("overall", part["overall"])]
        groups += [(f"sex {k}", v) for k, v in part["by_sex"].items()]
        groups += [(f"age {k}", v) for k, v in part["by_age_band"].items()]
        for name, g in groups:
            lines.append(
                f"  {name:<14} patients {g['patients']:>3}  kept {g['claims_kept']:>4}  "
                f"dropped {g['claims_dropped']:>4} (contradicted {g['claims_contradicted']})  "
                f"adds info {g['adds_information']:>3}  coverage {g['coverage']:.3f}  "
                f"conflicts {g['conflicts']}  {g['seconds_per_patient']:.2f}s/patient"
            )
    lines.append(f"wrote {json_path} and {html_path}")
    return "\n".join(lines)


__all__ = ["compare_overrides", "prompt_spec", "render_text", "run_eval"]
