"""The one error tree: drawn truthfully, complete, and translated in one place by the CLI and the API."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError

import fhir_adapters
import service
from fhir_adapters.errors import ChartbriefError, FhirNotFound, FhirServerError
from fhir_adapters.write.review import ReviewNotFound
from service import errors
from service.api.app import TEMPLATES_DIR, _install_error_handlers
from service.cli.common import ChartbriefCommand, ChartbriefGroup
from service.cli.main import cli
from service.errors import UNEXPECTED, fault_of
from service.llm.base import EngineError
from service.prompts import PromptError

# Exceptions that are control flow inside one module, never raised out of it.
PRIVATE = {
    "service.llm.remote._ServerFailed": "one pool member failed; the pool fails over or raises EngineError",
    "service.batch.queue.RetryLater": "tells the job queue to retry; never leaves the worker",
}


def _modules() -> Iterator[str]:
    for package in (service, fhir_adapters):
        root = Path(package.__file__).parent
        for info in pkgutil.walk_packages([str(root)], prefix=f"{package.__name__}."):
            if ".migrations." not in info.name:
                yield info.name


def _exception_classes() -> Iterator[type[BaseException]]:
    for name in _modules():
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == name:
                yield value


def test_the_drawing_in_the_docstring_is_the_tree_of_classes() -> None:
    list(_exception_classes())  # every module imported: the tree is whole
    drawing = errors.draw_tree()
    assert drawing in (errors.__doc__ or ""), "redraw service/errors.py's tree with draw_tree()"
    assert "FhirAuthError" in drawing and "PromptError" in drawing and "BatchError" in drawing


def test_every_error_chartbrief_defines_is_a_branch_of_the_one_tree() -> None:
    strays = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in _exception_classes()
        if not issubclass(cls, ChartbriefError) and f"{cls.__module__}.{cls.__qualname__}" not in PRIVATE
    ]
    assert strays == []


def test_each_branch_has_its_exit_code_and_status() -> None:
    assert (fault_of(PromptError("x")).exit_code, fault_of(EngineError("x")).exit_code) == (4, 4)
    assert (fault_of(FhirServerError("x")).exit_code, fault_of(FhirNotFound("x")).exit_code) == (3, 2)
    assert fault_of(ReviewNotFound("gone")).http_status == 404
    assert fault_of(OperationalError("select", {}, Exception("down"))).exit_code == 3
    assert fault_of(KeyError("x")) is UNEXPECTED


def _commands(group: click.Group) -> Iterator[click.Command]:
    for command in group.commands.values():
        yield command
        if isinstance(command, click.Group):
            yield from _commands(command)


def test_every_command_translates_through_the_one_table() -> None:
    assert isinstance(cli, ChartbriefGroup)
    untranslated = [
        c.name for c in _commands(cli) if not isinstance(c, ChartbriefCommand | ChartbriefGroup)
    ]
    assert untranslated == []


def _cli_raising(exc: BaseException) -> click.Group:
    @click.group(cls=ChartbriefGroup)
    def top() -> None:
        pass

    @top.command()
    def boom() -> None:
        raise exc

    return top


@pytest.mark.parametrize(
    ("exc", "code", "says"),
    [
        (PromptError("prompts/summary/v9.yaml: no such file"), 4, "prompts/summary/v9.yaml: no such file"),
        (FhirNotFound("GET Patient/x: 404", status=404, url="http://ehr/Patient/x"), 2, "FhirNotFound"),
        (OperationalError("select", {}, Exception("secret-host down")), 3, "the database"),
    ],
)
def test_the_cli_prints_one_line_and_the_exit_code(exc: BaseException, code: int, says: str) -> None:
    result = CliRunner().invoke(_cli_raising(exc), ["boom"])
    assert result.exit_code == code
    (line,) = result.output.strip().splitlines()
    assert line.startswith("chartbrief: ") and says in line
    assert "secret-host" not in line  # a driver's text is not repeated


def test_the_cli_lets_a_bug_keep_its_traceback() -> None:
    result = CliRunner().invoke(_cli_raising(KeyError("x")), ["boom"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def _app_raising(exc: BaseException) -> FastAPI:
    app = FastAPI()
    _install_error_handlers(app, Jinja2Templates(directory=str(TEMPLATES_DIR)))

    @app.get("/api/boom")
    async def boom() -> None:
        raise exc

    return app


async def _get(app: FastAPI) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://chartbrief.test") as client:
        return await client.get("/api/boom")


async def test_the_api_answers_each_branch_with_its_status_and_issue() -> None:
    response = await _get(_app_raising(ReviewNotFound("DocumentReference/d-1 is not in the chart")))
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-found"


async def test_the_api_never_repeats_the_servers_diagnostics() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "no patient named Smith"}]}
    response = await _get(_app_raising(FhirServerError("GET Patient: 500", status=500, outcome=outcome)))
    assert response.status_code == 502
    assert "Smith" not in response.text and "FhirServerError" in response.text


async def test_a_smart_failure_asks_the_client_to_authenticate_again() -> None:
    from fhir_adapters.auth.oauth import SmartError

    response = await _get(_app_raising(SmartError("the refresh token expired")))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
