"""Browser tests: chartbrief served by uvicorn on a loopback port, the test EHR, the real FHIR server,
and Debian's Chromium driven by Playwright.

`fhir_base` and `loaded_patients` are the integration fixtures (one real FHIR server per session).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.sync_api import Browser, sync_playwright

from service.dev.sandbox import LoadedPatient

CHROMIUM = os.environ.get("CHARTBRIEF_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Where screenshots go: a temporary folder, unless this names one (e.g. docs/ to refresh the docs copy).
SCREENSHOT_DIR_ENV = "CHARTBRIEF_SCREENSHOT_DIR"


class ServedApp:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread, on a port bound up front
    (so the app's settings can name its own URL before it starts)."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, app: Any) -> None:
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", loop="asyncio", http="h11", ws="none"
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=lambda: server.run(sockets=[self.socket]), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("chartbrief did not start (see the uvicorn output above)")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.socket.close()


@pytest.fixture(scope="module")
def browser(loaded_patients: dict[str, LoadedPatient]) -> Iterator[Browser]:  # noqa: F811
    # Playwright's sync API keeps an event loop running in this thread while it is open: the FHIR
    # fixtures (which run a loop of their own to load the data) must come first, and the browser
    # must be closed before the module ends, or every asyncio test after it would fail to start.
    del loaded_patients
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium)", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    chosen = os.environ.get(SCREENSHOT_DIR_ENV)
    folder = Path(chosen) if chosen else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder
