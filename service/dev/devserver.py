"""Start and stop a throwaway local FHIR R4 server (sekmet-fhir) for tests, the demo and developers.

`LocalFhirServer` writes a settings file into a temporary folder (data there too, simulator
off, bound to 127.0.0.1 on a free port), runs `sekmet serve` from its own virtualenv
(`.venv-fhir`, installed by `make test` / `make demo`), waits until `GET {base}/metadata`
answers, and on stop terminates it (then kills it if it lingers) and removes the folder.
`synthea_files()` lists the Synthea bundles shipped as test fixtures (the demo loads them too).

What it must not do: bind anything but the loopback address, download anything, or leave a
server running after `stop()` / the `with` block.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx
import yaml

from fhir_adapters.errors import ChartbriefError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SEKMET = REPO_ROOT / ".venv-fhir" / "bin" / "sekmet"
SYNTHEA_DIR = REPO_ROOT / "tests" / "fixtures" / "synthea"
HOST = "127.0.0.1"
LOG_TAIL_CHARS = 4000
# Client timeout for loading: a 1,000-entry transaction can take well over the default 30 s on HAPI.
LOAD_TIMEOUT_SECONDS = 300.0


class LocalFhirServerError(ChartbriefError, RuntimeError):
    """The local FHIR server is not installed, did not start, or did not answer in time."""


def synthea_files(folder: Path = SYNTHEA_DIR) -> list[Path]:
    """Every Synthea bundle shipped as a fixture (.json and .json.gz), in name order."""
    return sorted(p for p in folder.iterdir() if p.name.endswith((".json", ".json.gz")))


def free_port(host: str = HOST) -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def sekmet_settings(data_dir: Path, port: int, host: str = HOST) -> dict[str, Any]:
    """sekmet's settings for a quiet, private test server.

    - simulator off: it would otherwise answer orders and claims with resources of its own;
    - inbound validation strict (its default), so what chartbrief writes is checked;
    - no auth (its default), like HAPI's public sandbox;
    - log_inbound off: it would copy every request and response body into its database,
      which only slows loading;
    - its signing key path inside the temp folder, so nothing is read from the working directory.
    """
    return {
        "base_url": f"http://{host}:{port}/fhir",
        "host": host,
        "port": port,
        "data_dir": str(data_dir),
        "simulator": {"enabled": False},
        "validation": {"inbound": "strict"},
        "server_auth": {"types": ["none"]},
        "log_inbound": False,
        "own_private_key_path": str(data_dir / "keys" / "sekmet_private.pem"),
    }


class LocalFhirServer:
    """A sekmet FHIR R4 server process on 127.0.0.1, for as long as the `with` block lasts."""

    def __init__(
        self,
        *,
        executable: Path = DEFAULT_SEKMET,
        port: int | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.executable = executable
        # Top-level sekmet settings replaced as given (e.g. {"server_auth": {...}} to require SMART tokens).
        self.overrides = dict(overrides or {})
        self.port = port
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None or self._process is None:
            raise LocalFhirServerError("the local FHIR server is not running")
        return f"http://{HOST}:{self.port}/fhir"

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "server.log" if self._workdir else None

    def start(self) -> str:
        """Start the server and return its FHIR base URL once `/metadata` answers."""
        if self._process is not None:
            return self.base_url
        if not os.access(self.executable, os.X_OK):
            raise LocalFhirServerError(
                f"the local FHIR server is not installed ({self.executable} is missing): "
                "run `make test` (or `make setup`), which installs sekmet-fhir into .venv-fhir"
            )
        self.port = self.port or free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="chartbrief-fhir-"))
        data_dir = self._workdir / "data"
        config = self._workdir / "settings.yaml"
        config.write_text(yaml.safe_dump(sekmet_settings(data_dir, self.port) | self.overrides))
        self._log_file = (self._workdir / "server.log").open("wb")
        command = [
            str(self.executable),
            "serve",
            "--config",
            str(config),
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]
        # cwd is the temp folder: whatever sekmet writes next to itself lands there too.
        self._process = subprocess.Popen(  # noqa: S603 - fixed executable, arguments built here
            command,
            cwd=self._workdir,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_until_ready()
        except LocalFhirServerError as exc:
            tail = self.log_tail()
            self.stop()
            raise LocalFhirServerError(
                f"the local FHIR server ({self.executable}) did not start on {HOST}:{self.port}: {exc}. "
                f"Its log ends with:\n{tail}"
            ) from None
        except BaseException:
            self.stop()  # interrupted while waiting: never leave the process behind
            raise
        return self.base_url

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        metadata = f"http://{HOST}:{self.port}/fhir/metadata"
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise LocalFhirServerError(f"it exited with status {self._process.returncode}")
                try:
                    if http.get(metadata).status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(0.2)
        raise LocalFhirServerError(f"/metadata did not answer within {self.startup_timeout:.0f}s")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the server's own log (its stdout and stderr), for failure messages."""
        if self._log_file is not None:
            self._log_file.flush()
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        text = path.read_bytes()[-chars:].decode("utf-8", errors="replace")
        return text or "(empty log)"

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit in time) and remove its temp folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=self.stop_timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
