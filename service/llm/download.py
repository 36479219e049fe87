"""`chartbrief models pull`: download a GGUF into the model cache, resumable, checked by sha256.

The file grows as `<file>.part`; a second pull asks for the rest with an HTTP Range request (a server
that ignores Range answers 200 and the download restarts cleanly from zero). Once complete the file is
hashed: a catalogue sha256 that does not match deletes it and fails; without a known sha256 the hash
obtained is recorded as unverified.

This module is called only by the operator's command; a summary never downloads anything.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import structlog

from service.llm.base import EngineError
from service.llm.catalogue import CatalogueEntry, LocalModel, register

log = structlog.get_logger(__name__)

Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)
_CHUNK = 1024 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def pull(
    entry: CatalogueEntry,
    directory: Path,
    *,
    url: str | None = None,
    progress: Progress | None = None,
    timeout_seconds: float = 60.0,
) -> LocalModel:
    """Download `entry` into `directory` (resuming a `.part`), check it, and register it."""
    source = url or entry.url
    if source is None:
        raise EngineError(f"model {entry.name} has no download location; give one with --url")
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / entry.file
    part = directory / f"{entry.file}.part"
    digest = hashlib.sha256()
    have = part.stat().st_size if part.exists() else 0
    total: int | None
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with httpx.stream(
            "GET", source, headers=headers, follow_redirects=True, timeout=timeout_seconds
        ) as response:
            if response.status_code == 416 and have:
                total = have  # the .part is already whole
            elif response.status_code == 206 and have:
                match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != have:
                    raise EngineError(f"{source}: the server answered a different range; delete {part}")
                total = int(match.group(2)) if match.group(2) != "*" else None
            elif response.status_code == 200:
                have = 0  # Range ignored (or a fresh start): start over
                length = response.headers.get("content-length")
                total = int(length) if length else None
            else:
                raise EngineError(f"{source}: the server answered HTTP {response.status_code}")
            if have:
                with part.open("rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        digest.update(chunk)
            with part.open("ab" if have else "wb") as out:
                if response.status_code != 416:
                    for chunk in response.iter_bytes():  # as received: a cut keeps what came
                        out.write(chunk)
                        digest.update(chunk)
                        have += len(chunk)
                        if progress is not None:
                            progress(have, total)
    except httpx.HTTPError as exc:
        raise EngineError(
            f"{source}: the download stopped after {part.stat().st_size if part.exists() else 0} bytes "
            f"({type(exc).__name__}); run the same command again to resume"
        ) from exc
    if total is not None and have != total:
        raise EngineError(f"{source}: got {have} of {total} bytes; run the same command again to resume")
    sha = digest.hexdigest()
    if entry.sha256 is not None and sha != entry.sha256:
        part.unlink(missing_ok=True)
        raise EngineError(
            f"model {entry.name}: sha256 {sha} is not the catalogue's {entry.sha256}; the file was deleted"
        )
    os.replace(part, final)
    log.info("model_pulled", model=entry.name, size=have, verified=entry.sha256 is not None)
    return register(directory, entry.name, final, source=source, expected_sha256=entry.sha256)
