"""`chartbrief serve`: the web service (SMART launch, review screen, REST API) under uvicorn."""

from __future__ import annotations

import click

from service.cli.common import EXIT_BAD_INPUT, ChartbriefCommand, build_settings, fail


@click.command(cls=ChartbriefCommand)
@click.option(
    "--host",
    envvar="CHARTBRIEF_HOST",
    show_envvar=True,
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (put a TLS-terminating proxy in front for anything but loopback).",
)
@click.option("--port", envvar="CHARTBRIEF_PORT", show_envvar=True, default=8000, show_default=True, type=int)
@click.option(
    "--forwarded-allow-ips",
    envvar="CHARTBRIEF_FORWARDED_ALLOW_IPS",
    show_envvar=True,
    default="127.0.0.1",
    show_default=True,
    help="Proxies whose X-Forwarded-* headers are trusted.",
)
def serve(host: str, port: int, forwarded_allow_ips: str) -> None:
    """Serve chartbrief: SMART launch at /launch, the review screen, the REST API at /api, docs at /docs."""
    import uvicorn  # deferred: only this command needs the server

    from service.api import create_app

    settings = build_settings()
    try:
        app = create_app(settings)
    except ValueError as exc:
        fail(f"invalid setting: {exc}", EXIT_BAD_INPUT)
    click.echo(f"chartbrief: serving on http://{host}:{port} (model loading in the background; see /readyz)")
    # No access log: the callback's query string carries the authorization code and state. The app
    # logs one PHI-free line per request itself.
    uvicorn.run(
        app,
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
        server_header=False,
    )
