"""Settings are validated once, name what is wrong, and are documented in full."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from service.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _fields(model: type[BaseModel], prefix: str = "CHARTBRIEF_") -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            found |= _fields(ann, f"{prefix}{name.upper()}__")
        else:
            found[f"{prefix}{name.upper()}"] = field.description
    return found


def test_every_setting_has_a_description_and_is_documented() -> None:
    doc = DOC.read_text()
    fields = _fields(Settings)
    assert [n for n, d in fields.items() if not d] == []
    assert [n for n in fields if f"`{n}`" not in doc] == [], "docs/configuration.md is missing settings"


def test_env_reaches_nested_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARTBRIEF_LLM__N_CTX", "4096")
    monkeypatch.setenv("CHARTBRIEF_FHIR__BASE_URL", "http://127.0.0.1:8080/fhir/")
    s = Settings()
    assert s.llm.n_ctx == 4096
    assert s.fhir.base_url == "http://127.0.0.1:8080/fhir"


def test_a_bad_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARTBRIEF_FHIR__PAGE_SIZE", "0")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert info.value.errors()[0]["loc"] == ("fhir", "page_size")


def test_production_refuses_plain_http_to_a_remote_ehr() -> None:
    with pytest.raises(ValidationError, match="CHARTBRIEF_FHIR__BASE_URL must use https"):
        Settings(environment="production", fhir={"base_url": "http://ehr.example.org/fhir"})  # type: ignore[arg-type]
    ok = Settings(environment="production", fhir={"base_url": "http://127.0.0.1:8080/fhir"})  # type: ignore[arg-type]
    assert ok.log_format == "json"
