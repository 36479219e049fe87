"""The CLI's contract with a person at a terminal: clear messages and exit codes, nothing lost."""

from __future__ import annotations

import socket

import httpx
import respx
from click.testing import CliRunner

from service.cli.main import cli
from service.llm.fake import FakeEngine

BASE = "http://fhir.test/fhir"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path) -> dict[str, str]:
    return {
        "CHARTBRIEF_DB__URL": f"sqlite:///{tmp_path}/cb.db",
        "CHARTBRIEF_FHIR__BACKOFF_INITIAL_SECONDS": "0.01",
        "CHARTBRIEF_FHIR__BACKOFF_MAX_SECONDS": "0.02",
    }


def test_unknown_patient_exits_2_with_the_servers_diagnostics(tmp_path) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "not-found", "diagnostics": "Resource Patient/nope is not known"}
        ],
    }
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        router.get("/Patient/nope").mock(return_value=httpx.Response(404, json=outcome))
        router.get(url__regex=r".*").mock(return_value=httpx.Response(200, json={"resourceType": "Bundle"}))
        result = CliRunner().invoke(
            cli,
            ["summarize", "--fhir-base", BASE, "--patient", "nope", "--dry-run"],
            obj={"engine": FakeEngine()},
            env=_env(tmp_path),
        )
    assert result.exit_code == 2, result.output
    assert "Resource Patient/nope is not known" in result.output
    assert "Traceback" not in result.output


def test_unreachable_server_exits_3_after_bounded_retries(tmp_path) -> None:
    base = f"http://127.0.0.1:{_free_port()}/fhir"
    result = CliRunner().invoke(
        cli,
        ["summarize", "--fhir-base", base, "--patient", "p1", "--dry-run"],
        obj={"engine": FakeEngine()},
        env=_env(tmp_path),
    )
    assert result.exit_code == 3, result.output
    assert "127.0.0.1" in result.output
    assert "Traceback" not in result.output


def test_missing_model_file_names_the_setting(tmp_path) -> None:
    env = _env(tmp_path) | {"CHARTBRIEF_LLM__MODEL_PATH": str(tmp_path / "absent.gguf")}
    result = CliRunner().invoke(cli, ["summarize", "--fhir-base", BASE, "--patient", "p1"], env=env)
    assert result.exit_code == 4, result.output
    assert "CHARTBRIEF_LLM__MODEL_PATH" in result.output
    assert "absent.gguf" in result.output


def test_bad_setting_names_the_variable(tmp_path) -> None:
    env = _env(tmp_path) | {"CHARTBRIEF_LLM__N_CTX": "12"}
    result = CliRunner().invoke(
        cli, ["summarize", "--fhir-base", BASE, "--patient", "p1"], obj={"engine": FakeEngine()}, env=env
    )
    assert result.exit_code == 2, result.output
    assert "CHARTBRIEF_LLM__N_CTX" in result.output


def test_sandbox_load_refuses_a_missing_file_before_contacting_the_server(tmp_path) -> None:
    with respx.mock(base_url=BASE) as router:
        result = CliRunner().invoke(
            cli, ["sandbox", "load", "--fhir-base", BASE, str(tmp_path / "nope.json")], env=_env(tmp_path)
        )
        assert not router.calls
    assert result.exit_code == 2
    assert "nope.json" in result.output


def test_summarize_help_lists_env_twins() -> None:
    result = CliRunner().invoke(cli, ["summarize", "--help"])
    assert result.exit_code == 0
    assert "CHARTBRIEF_FHIR__BASE_URL" in result.output


def test_keys_generate_writes_a_private_key_only_the_owner_reads_and_prints_the_jwks(tmp_path) -> None:
    import json
    import stat

    from fhir_adapters.auth.oauth import public_jwk

    out = tmp_path / "k" / "backend.pem"
    result = CliRunner().invoke(cli, ["keys", "generate", "--alg", "ES384", "--out", str(out)])
    assert result.exit_code == 0, result.output
    jwks = json.loads(result.stdout)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert jwks["keys"] == [public_jwk(out.read_bytes(), "ES384")]
    assert "PRIVATE" not in result.stdout
    again = CliRunner().invoke(cli, ["keys", "generate", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
