"""`chartbrief keys generate`: the key pair for SMART Backend Services.

The private key is written to a file only the owner can read; the public key is printed as a
JWKS to register with the EHR (or to serve at a jku URL).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from fhir_adapters.auth.oauth import generate_key
from service.cli.common import EXIT_BAD_INPUT, ChartbriefGroup, fail


@click.group(cls=ChartbriefGroup)
def keys() -> None:
    """SMART Backend Services keys."""


@keys.command("generate")
@click.option("--alg", type=click.Choice(["RS384", "ES384"]), default="RS384", show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("keys/chartbrief-backend.pem"),
    show_default=True,
    help="Where the private key (PKCS#8 PEM) is written, mode 0600.",
)
@click.option("--kid", default=None, help="Key id (default: the key's RFC 7638 thumbprint).")
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def generate(alg: str, out: Path, kid: str | None, force: bool) -> None:
    """Write a new private key and print its public JWKS."""
    if out.exists() and not force:
        fail(f"{out} exists; use --force to replace it (the EHR must then get the new JWKS)", EXIT_BAD_INPUT)
    pem, jwk = generate_key(alg, kid=kid)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(out, 0o600)
    click.echo(json.dumps({"keys": [jwk]}, indent=2))
    click.echo(f"private key: {out} (kid {jwk['kid']}, {alg})", err=True)
