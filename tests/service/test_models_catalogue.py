"""`chartbrief models`: the catalogue, the registry, the active model, and pulls from a local server."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from service.cli.main import cli
from service.config import LlmSettings
from service.llm.base import EngineError
from service.llm.catalogue import CatalogueEntry, load_catalogue, parse_catalogue, read_registry
from service.llm.download import pull
from service.llm.model_files import default_model_path, resolve_model_path

BODY = b"GGUF" + bytes(range(256)) * 400  # a small "model": the GGUF magic, then 102400 bytes


class _Server:
    """A local HTTP server for one file, honouring Range; `drop_after` cuts the first answer short."""

    def __init__(self, body: bytes, *, ranges: bool = True, drop_after: int | None = None) -> None:
        self.body, self.ranges, self.drop_after = body, ranges, drop_after
        self.range_headers: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                asked = self.headers.get("Range")
                outer.range_headers.append(asked)
                start = int(asked.split("=")[1].rstrip("-")) if asked and outer.ranges else 0
                payload = outer.body[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(outer.body) - 1}/{len(outer.body)}"
                    )
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if outer.drop_after is not None:
                    self.wfile.write(payload[: outer.drop_after])
                    outer.drop_after = None
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.gguf"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server(BODY)
    yield s
    s.stop()


def _entry(sha256: str | None) -> CatalogueEntry:
    return CatalogueEntry(
        name="tiny", parameters="1K", quantization="Q4_1", licence="MIT", file="tiny.Q4_1.gguf", sha256=sha256
    )


def test_the_shipped_catalogue_is_valid_and_the_default_model_hash_is_the_installed_files() -> None:
    entries = {e.name: e for e in load_catalogue()}
    smol = entries["smollm2-135m-instruct"]
    assert smol.sha256 is not None
    assert hashlib.sha256(default_model_path().read_bytes()).hexdigest() == smol.sha256
    assert entries["llama-3.1-8b-instruct"].sha256 is None  # not known: never typed from memory


def test_a_bad_catalogue_entry_is_refused_naming_the_entry_and_the_field() -> None:
    bad = {"models": [{"name": "x", "parameters": "1B", "quantization": "Q4", "licence": "MIT",
                       "file": "x.gguf", "sha256": "not-hex"}]}  # fmt: skip
    with pytest.raises(EngineError, match=r"entry x: sha256"):
        parse_catalogue(bad)


def test_pull_verifies_by_sha256_and_registers(server: _Server, tmp_path: Path) -> None:
    model = pull(_entry(hashlib.sha256(BODY).hexdigest()), tmp_path, url=server.url)
    assert model.verified and (tmp_path / "tiny.Q4_1.gguf").read_bytes() == BODY
    assert read_registry(tmp_path).find("tiny") == model


def test_a_hash_mismatch_deletes_the_file_and_fails(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="was deleted"):
        pull(_entry("0" * 64), tmp_path, url=server.url)
    assert list(tmp_path.iterdir()) == []


def test_without_a_known_hash_the_hash_got_is_recorded_unverified(server: _Server, tmp_path: Path) -> None:
    model = pull(_entry(None), tmp_path, url=server.url)
    assert not model.verified and model.sha256 == hashlib.sha256(BODY).hexdigest()


def test_an_interrupted_pull_resumes_from_the_part_file(tmp_path: Path) -> None:
    s = _Server(BODY, drop_after=30_000)
    try:
        with pytest.raises(EngineError, match="resume"):
            pull(_entry(hashlib.sha256(BODY).hexdigest()), tmp_path, url=s.url)
        assert (tmp_path / "tiny.Q4_1.gguf.part").stat().st_size == 30_000
        model = pull(_entry(hashlib.sha256(BODY).hexdigest()), tmp_path, url=s.url)
    finally:
        s.stop()
    assert s.range_headers == [None, "bytes=30000-"]
    assert model.verified and (tmp_path / "tiny.Q4_1.gguf").read_bytes() == BODY


def test_a_server_ignoring_range_restarts_cleanly(tmp_path: Path) -> None:
    s = _Server(BODY, ranges=False)
    (tmp_path / "tiny.Q4_1.gguf.part").write_bytes(b"GGUFjunk")
    try:
        model = pull(_entry(hashlib.sha256(BODY).hexdigest()), tmp_path, url=s.url)
    finally:
        s.stop()
    assert model.verified and (tmp_path / "tiny.Q4_1.gguf").read_bytes() == BODY


def test_add_list_use_and_the_engine_opens_the_active_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARTBRIEF_LLM__MODELS_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_bytes(b"hello")
    refused = runner.invoke(cli, ["models", "add", str(not_gguf)])
    assert refused.exit_code != 0 and "not a GGUF" in refused.output
    local = tmp_path / "mine.Q8_0.gguf"
    local.write_bytes(BODY)
    added = runner.invoke(cli, ["models", "add", str(local), "--name", "mine"])
    assert added.exit_code == 0, added.output
    assert hashlib.sha256(BODY).hexdigest() in added.output
    rows = {
        r["name"]: r for r in json.loads(runner.invoke(cli, ["models", "list", "--json"]).output)["models"]
    }
    assert rows["mine"]["present"] and not rows["mine"]["active"]
    assert rows["smollm2-135m-instruct"]["active"] and not rows["llama-3.1-8b-instruct"]["present"]
    assert runner.invoke(cli, ["models", "use", "mine"]).exit_code == 0
    rows = {
        r["name"]: r for r in json.loads(runner.invoke(cli, ["models", "list", "--json"]).output)["models"]
    }
    assert rows["mine"]["active"] and not rows["smollm2-135m-instruct"]["active"]
    cache = tmp_path / "cache"
    assert resolve_model_path(LlmSettings(models_dir=cache)) == local.resolve()
    # An explicit model path still wins over the active model.
    assert (
        resolve_model_path(LlmSettings(models_dir=cache, model_path=default_model_path()))
        == default_model_path()
    )
    assert runner.invoke(cli, ["models", "use", "--reset"]).exit_code == 0
    assert resolve_model_path(LlmSettings(models_dir=cache)) == default_model_path()
