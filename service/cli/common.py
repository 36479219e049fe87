"""What every command shares: building settings once, running a coroutine, and turning chartbrief's
errors into one clear line and an exit code (`ChartbriefCommand`, through `service.errors`).

Exit codes: 0 ok, 1 unexpected, 2 bad input (unknown patient, bad setting or file),
3 the FHIR server or the database could not be reached or failed, 4 the model or prompt could not
be used; the table of which error means which is `service.errors.FAULTS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

import click
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from fhir_adapters.errors import ChartbriefError
from service.config import Settings
from service.errors import EXIT_BAD_INPUT, EXIT_MODEL, EXIT_SERVER, cli_message, fault_of
from service.logging import configure_logging

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_MODEL",
    "EXIT_SERVER",
    "ChartbriefCommand",
    "ChartbriefGroup",
    "build_settings",
    "fail",
    "run",
]


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"chartbrief: {message}", err=True)
    sys.exit(code)


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with command-line values (already env-aware) on top.

    `overrides` are named like the variables without the prefix (`fhir__base_url`); pydantic-settings
    merges them over the environment and the .env file, section by section, as init arguments."""
    layered: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, name = dotted.partition("__")
        if name:
            layered.setdefault(section, {})[name] = value
        else:
            layered[section] = value
    try:
        settings = Settings(**layered)
    except ValidationError as exc:
        problems = "; ".join(
            f"CHARTBRIEF_{'__'.join(str(p).upper() for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        fail(f"invalid setting: {problems}", EXIT_BAD_INPUT)
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    return settings


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """The CLI's one translation: a chartbrief error (or a database failure) becomes one line on
    stderr and its exit code."""
    try:
        yield
    except (ChartbriefError, SQLAlchemyError) as exc:
        fail(cli_message(exc), fault_of(exc).exit_code)


class ChartbriefCommand(click.Command):
    """A command whose chartbrief errors (and database failures) end as one line on stderr and the
    exit code `service.errors` gives them; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        with translated_errors():
            return super().invoke(ctx)


class ChartbriefGroup(click.Group):
    """A group whose commands and subgroups are `ChartbriefCommand`s and `ChartbriefGroup`s."""

    command_class = ChartbriefCommand

    def invoke(self, ctx: click.Context) -> Any:
        with translated_errors():
            return super().invoke(ctx)


ChartbriefGroup.group_class = ChartbriefGroup


def run(coro_fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async command body (its errors are translated by the command around it)."""

    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(coro_fn(*args, **kwargs))

    return wrapper


def setting_option(flag: str, setting: str, *, help: str, required: bool = False) -> Callable[[F], F]:
    """A command-line option that overrides one setting, with the setting's environment variable as
    its twin (`db__url` -> `CHARTBRIEF_DB__URL`); the value goes to `build_settings(setting=value)`."""
    return click.option(
        flag,
        envvar=f"CHARTBRIEF_{setting.upper()}",
        show_envvar=True,
        required=required,
        default=None,
        help=help,
    )


# The options several commands share, declared once here.
fhir_base_option = setting_option(
    "--fhir-base",
    "fhir__base_url",
    required=True,
    help="FHIR R4 base URL (the EHR, HAPI's sandbox, or a local server).",
)
optional_fhir_base_option = setting_option(
    "--fhir-base", "fhir__base_url", help="FHIR R4 base URL (optional here: see the command's help)."
)
db_url_option = setting_option(
    "--db-url", "db__url", help="chartbrief's database (SQLAlchemy URL): summaries, runs, audit, keys."
)
model_path_option = setting_option(
    "--model-path", "llm__model_path", help="GGUF model file (default: the bundled SmolLM2-135M-Instruct)."
)


def json_option(what: str = "the result") -> Callable[[F], F]:
    """`--json` (as `as_json`): print `what` as one JSON object instead of text."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as one JSON object.")
